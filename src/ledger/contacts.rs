//! Contacts: one record per Teams user who talked to an integration with `contactCollection`.
//! The id is derived from (integration, Teams user id), so every instance behind one store
//! writes the same record for the same user. `lastSeenAt` is written at most once per
//! `admin.contact_touch_interval_ms`; the record in memory is always current.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use dashmap::DashMap;
use metrics::gauge;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreHealth, load_records, now_ms};
use crate::telemetry::CONTACTS;

pub const STORE_KIND: &str = "contacts";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub id: String,
    pub account: String,
    pub integration_id: String,
    pub teams_user_id: String,
    pub aad_object_id: Option<String>,
    pub name: Option<String>,
    pub tenant_id: Option<String>,
    pub first_seen_at: u64,
    pub last_seen_at: u64,
    /// When `lastSeenAt` last reached the store.
    #[serde(default)]
    pub stored_at: u64,
}

/// Who sent an activity, as the contact book needs it.
pub struct Sender<'a> {
    pub teams_user_id: &'a str,
    pub aad_object_id: Option<&'a str>,
    pub name: Option<&'a str>,
    pub tenant_id: Option<&'a str>,
}

pub struct ContactBook {
    contacts: DashMap<String, Contact>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    touch_interval: Duration,
}

pub fn contact_id(integration: &str, teams_user_id: &str) -> String {
    let hash = digest(
        &SHA256,
        format!("{integration}\u{0}{teams_user_id}").as_bytes(),
    );
    let hex: String = hash.as_ref()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("contact_{hex}")
}

impl ContactBook {
    pub async fn load(
        store: Arc<Store>,
        health: Arc<StoreHealth>,
        touch_interval: Duration,
    ) -> Arc<Self> {
        let book = Arc::new(Self {
            contacts: DashMap::new(),
            store: Arc::clone(&store),
            health: Arc::clone(&health),
            touch_interval,
        });
        for (id, contact) in load_records::<Contact>(&store, &health, STORE_KIND).await {
            book.contacts.insert(id, contact);
        }
        gauge!(CONTACTS).set(book.contacts.len() as f64);
        book
    }

    /// Records that `sender` talked to the integration now: a new contact, or a later
    /// `lastSeenAt` (and a changed name).
    pub fn touch(self: &Arc<Self>, account: &str, integration: &str, sender: &Sender<'_>) {
        if sender.teams_user_id.is_empty() {
            return;
        }
        let id = contact_id(integration, sender.teams_user_id);
        let now = now_ms();
        let to_store = {
            let mut entry = self.contacts.entry(id.clone()).or_insert_with(|| Contact {
                id: id.clone(),
                account: account.to_owned(),
                integration_id: integration.to_owned(),
                teams_user_id: sender.teams_user_id.to_owned(),
                aad_object_id: None,
                name: None,
                tenant_id: None,
                first_seen_at: now,
                last_seen_at: now,
                stored_at: 0,
            });
            let contact = entry.value_mut();
            let mut changed = contact.stored_at == 0;
            for (field, value) in [
                (&mut contact.aad_object_id, sender.aad_object_id),
                (&mut contact.name, sender.name),
                (&mut contact.tenant_id, sender.tenant_id),
            ] {
                if let Some(value) = value.filter(|v| !v.is_empty())
                    && field.as_deref() != Some(value)
                {
                    *field = Some(value.to_owned());
                    changed = true;
                }
            }
            contact.last_seen_at = now;
            let stale =
                now.saturating_sub(contact.stored_at) >= self.touch_interval.as_millis() as u64;
            if changed || stale {
                contact.stored_at = now;
                serde_json::to_vec(&*contact).ok()
            } else {
                None
            }
        };
        gauge!(CONTACTS).set(self.contacts.len() as f64);
        if let Some(bytes) = to_store {
            let book = Arc::clone(self);
            tokio::spawn(async move {
                let result = book
                    .store
                    .put_records(STORE_KIND, vec![(id.clone(), bytes)])
                    .await;
                book.health.observe("records", &result);
                if let Err(error) = result {
                    tracing::warn!(%error, "contact not stored; it is written again at the next message");
                    if let Some(mut contact) = book.contacts.get_mut(&id) {
                        contact.stored_at = 0;
                    }
                }
            });
        }
    }

    pub fn get(&self, id: &str) -> Option<Contact> {
        self.contacts.get(id).map(|c| c.value().clone())
    }

    /// Every contact of an account (optionally of one integration).
    pub fn of_account(&self, account: &str, integration: Option<&str>) -> Vec<Contact> {
        self.contacts
            .iter()
            .filter(|c| c.account == account && integration.is_none_or(|i| c.integration_id == i))
            .map(|c| c.value().clone())
            .collect()
    }
}
