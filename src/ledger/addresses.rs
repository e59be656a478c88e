//! Where proactive messages can go: the address book learns the serviceUrl, tenant and bot
//! account of every conversation (and team) from the activities an integration receives, as Teams
//! must be addressed with them (protocol.md §3.1, §3.2), and keeps them in the store (in batches,
//! once a second) so that a restarted router can still reach them.

use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::activity::TurnActivity;
use crate::store::{Store, StoreHealth, load_records};

pub const STORE_KIND: &str = "addresses";
/// Personal chats the router created itself (proactive messages, broadcasts): stored, and
/// looked up there, not held in memory, so that a broadcast to a million users costs no memory
/// per user.
pub const CREATED_KIND: &str = "addresses-created";

/// How to reach a conversation, a user's personal chat, a channel or a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub integration_id: String,
    /// `conv:`, `user:`, `channel:` or `tenant:` and the id.
    pub key: String,
    pub service_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The bot's channel account in that conversation (`28:<app id>`).
    pub bot: CompactJson,
    /// The conversation account (none for channels and tenants: a conversation is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<CompactJson>,
    /// Teams said the bot is not there any more (uninstalled, removed, deleted): proactive
    /// messages are refused instead of sent, until it is installed again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_installed: bool,
}

/// A JSON value kept as its compact text: one allocation of a few dozen bytes where a
/// `serde_json::Value` object is a map of them (the book holds two addresses per personal chat,
/// for every chat an integration ever saw), shared by its clones (both addresses of a personal
/// chat hold its conversation account). Read and written as the JSON value itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompactJson(Arc<str>);

impl CompactJson {
    pub fn of(value: &Value) -> Self {
        Self(value.to_string().into())
    }

    /// The value (the text was written from a value, so it parses; `null` if not).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

impl Serialize for CompactJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CompactJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(|value| Self::of(&value))
    }
}

impl Address {
    fn known(&self, book: &AddressBook) -> Known {
        Known {
            route: book.route(Route {
                integration_id: self.integration_id.as_str().into(),
                service_url: self.service_url.as_str().into(),
                tenant_id: self.tenant_id.as_deref().map(Into::into),
                bot: self.bot.clone(),
            }),
            key: self.key.as_str().into(),
            conversation: self.conversation.clone(),
            not_installed: self.not_installed,
        }
    }
}

/// Where the learned addresses of an integration send, shared by every conversation reached
/// from the same service URL, tenant and bot account: held once, not once per address.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Route {
    integration_id: Box<str>,
    service_url: Box<str>,
    tenant_id: Option<Box<str>>,
    bot: CompactJson,
}

/// An address as the book holds it (a few dozen bytes beside its key and its conversation
/// account): a million personal chats are two million of them.
#[derive(Debug, PartialEq)]
struct Known {
    route: Arc<Route>,
    key: Box<str>,
    conversation: Option<CompactJson>,
    not_installed: bool,
}

impl Known {
    fn address(&self) -> Address {
        Address {
            integration_id: self.route.integration_id.to_string(),
            key: self.key.to_string(),
            service_url: self.route.service_url.to_string(),
            tenant_id: self.route.tenant_id.as_deref().map(str::to_owned),
            bot: self.route.bot.clone(),
            conversation: self.conversation.clone(),
            not_installed: self.not_installed,
        }
    }

    /// The stored record: the [`Address`] it stands for.
    fn record(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(&self.address()).ok()
    }
}

/// An address's id: the first 12 bytes of SHA-256 over its integration and key. Its record in
/// the store is named after it ([`record_id`]).
type AddressId = [u8; 12];

pub struct AddressBook {
    addresses: DashMap<AddressId, Known>,
    /// Every [`Route`] the addresses use, once.
    routes: dashmap::DashSet<Arc<Route>>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    /// New and changed addresses, written to the store together once a second: a burst of new
    /// conversations must not become one store transaction each.
    unsaved: parking_lot::Mutex<Vec<(String, Vec<u8>)>>,
    /// The same for chats the router created ([`CREATED_KIND`]).
    unsaved_created: parking_lot::Mutex<Vec<(String, Vec<u8>)>>,
}

/// How often learned addresses reach the store.
const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn address_id(integration: &str, key: &str) -> AddressId {
    let mut context = Context::new(&SHA256);
    context.update(integration.as_bytes());
    context.update(&[0]);
    context.update(key.as_bytes());
    let mut id = AddressId::default();
    id.copy_from_slice(&context.finish().as_ref()[..12]);
    id
}

const RECORD_PREFIX: &str = "addr_";

/// The name of an address's record in the store: `addr_` and its id in hex.
fn record_id(id: &AddressId) -> String {
    use std::fmt::Write;
    id.iter()
        .fold(String::from(RECORD_PREFIX), |mut name, byte| {
            let _ = write!(name, "{byte:02x}");
            name
        })
}

/// The id a record's name stands for (`None` for a name [`record_id`] did not make).
fn parse_record_id(name: &str) -> Option<AddressId> {
    let hex = name.strip_prefix(RECORD_PREFIX)?;
    if hex.len() != 24 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = AddressId::default();
    for (byte, pair) in id.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

impl AddressBook {
    pub async fn load(store: Arc<Store>, health: Arc<StoreHealth>) -> Arc<Self> {
        let book = Arc::new(Self {
            addresses: DashMap::new(),
            routes: dashmap::DashSet::new(),
            store: Arc::clone(&store),
            health: Arc::clone(&health),
            unsaved: parking_lot::Mutex::new(Vec::new()),
            unsaved_created: parking_lot::Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&book);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAVE_INTERVAL);
            loop {
                tick.tick().await;
                let Some(book) = weak.upgrade() else {
                    return;
                };
                book.save().await;
            }
        });
        for (name, address) in load_records::<Address>(&store, &health, STORE_KIND).await {
            match parse_record_id(&name) {
                Some(id) => {
                    let known = address.known(&book);
                    book.addresses.insert(id, known);
                }
                None => {
                    tracing::warn!(record = %name, "stored address has a foreign name; skipped")
                }
            }
        }
        book
    }

    /// The book's one copy of `route` (two learning it at once share the first one's).
    fn route(&self, route: Route) -> Arc<Route> {
        if let Some(known) = self.routes.get(&route) {
            return Arc::clone(&known);
        }
        let route = Arc::new(route);
        if !self.routes.insert(Arc::clone(&route))
            && let Some(first) = self.routes.get(&*route)
        {
            return Arc::clone(&first);
        }
        route
    }

    /// Writes what was learned since the last save; a failed write is tried again next time.
    async fn save(&self) {
        for (kind, queue) in [
            (STORE_KIND, &self.unsaved),
            (CREATED_KIND, &self.unsaved_created),
        ] {
            // Left in the queue until stored: `find` looks there for what is on its way.
            let batch = queue.lock().clone();
            if batch.is_empty() {
                continue;
            }
            let written = batch.len();
            let result = self.store.put_records(kind, batch).await;
            self.health.observe("records", &result);
            match result {
                Ok(()) => drop(queue.lock().drain(..written)),
                Err(error) => {
                    tracing::warn!(%error, addresses = written, "addresses not stored; retried in a second");
                }
            }
        }
    }

    /// The address from memory, or else among the chats the router created (in the store, or
    /// about to be written there).
    pub async fn find(&self, integration: &str, key: &str) -> Option<Address> {
        if let Some(address) = self.get(integration, key) {
            return Some(address);
        }
        let id = record_id(&address_id(integration, key));
        let queued = self
            .unsaved_created
            .lock()
            .iter()
            .rev()
            .find(|(queued, _)| *queued == id)
            .map(|(_, bytes)| bytes.clone());
        let bytes = match queued {
            Some(bytes) => bytes,
            None => {
                let result = self.store.records_by_ids(CREATED_KIND, vec![id]).await;
                self.health.observe("records", &result);
                result.ok()?.into_iter().next().flatten()?
            }
        };
        serde_json::from_slice(&bytes).ok()
    }

    /// Marks addresses `not_installed` wherever they are: in memory or among the created chats.
    pub async fn mark_not_installed(&self, integration: &str, keys: &[String]) {
        for key in keys {
            let known_id = address_id(integration, key);
            let id = record_id(&known_id);
            if let Some(mut known) = self.addresses.get_mut(&known_id) {
                if !known.not_installed {
                    known.not_installed = true;
                    if let Some(bytes) = known.record() {
                        self.unsaved.lock().push((id, bytes));
                    }
                }
                continue;
            }
            if let Some(mut address) = self.find(integration, key).await
                && !address.not_installed
            {
                address.not_installed = true;
                if let Ok(bytes) = serde_json::to_vec(&address) {
                    self.unsaved_created.lock().push((id, bytes));
                }
            }
        }
    }

    pub fn get(&self, integration: &str, key: &str) -> Option<Address> {
        self.addresses
            .get(&address_id(integration, key))
            .map(|known| known.address())
    }

    /// Learns where the activity's conversation, sender (in a personal chat), channel, team and
    /// tenant can be reached. Only a new or changed address is written to the store.
    pub fn learn(self: &Arc<Self>, integration: &str, activity: &TurnActivity) {
        let Some(bot) = activity.recipient() else {
            return;
        };
        // What says the bot left teaches no address (and must not make one reachable again).
        if activity.says_bot_left() {
            return;
        }
        let tenant = activity.tenant_id();
        let route = self.route(Route {
            integration_id: integration.into(),
            service_url: activity.service_url().into(),
            tenant_id: tenant.map(Into::into),
            bot: CompactJson::of(&bot),
        });
        let address = |key: String, conversation: Option<&CompactJson>| Known {
            route: Arc::clone(&route),
            key: key.into(),
            conversation: conversation.cloned(),
            not_installed: false,
        };
        let compact = CompactJson::of(&activity.conversation());
        let conversation = Some(&compact);
        let by_conversation = address(format!("conv:{}", activity.conversation_id()), conversation);
        // A conversation seen before from the same address taught the rest already.
        if self
            .addresses
            .get(&address_id(integration, &by_conversation.key))
            .is_some_and(|a| *a == by_conversation)
        {
            return;
        }
        let mut learned = vec![by_conversation];
        if activity.is_personal() {
            for user in [activity.from_id(), activity.from_aad_object_id()]
                .into_iter()
                .flatten()
                .filter(|u| !u.is_empty())
            {
                learned.push(address(format!("user:{user}"), conversation));
            }
        }
        let channel_data = activity.channel_data();
        for pointer in ["/channel/id", "/team/id"] {
            if let Some(id) = channel_data
                .as_ref()
                .and_then(|c| c.pointer(pointer))
                .and_then(Value::as_str)
            {
                // A team's id is also its General channel's id.
                learned.push(address(format!("channel:{id}"), None));
            }
        }
        if let Some(tenant) = tenant {
            learned.push(address(format!("tenant:{tenant}"), None));
        }
        let mut to_store = Vec::new();
        for address in learned {
            let id = address_id(integration, &address.key);
            let known = self.addresses.get(&id).is_some_and(|a| *a == address);
            if !known {
                if let Some(bytes) = address.record() {
                    to_store.push((record_id(&id), bytes));
                }
                self.addresses.insert(id, address);
            }
        }
        if !to_store.is_empty() {
            self.unsaved.lock().extend(to_store);
        }
    }

    /// Marks the addresses of the conversation (and of its user, in a personal chat) and of
    /// the channels of a team (by its ids) as `not_installed`, or reachable again.
    pub fn set_installed(
        &self,
        integration: &str,
        team_ids: &[&str],
        conversation: Option<&str>,
        user: Option<&str>,
        installed: bool,
    ) {
        let keys: Vec<String> = team_ids
            .iter()
            .map(|team| format!("channel:{team}"))
            .chain(conversation.map(|c| format!("conv:{c}")))
            .chain(conversation.map(|c| format!("channel:{c}")))
            .chain(user.map(|u| format!("user:{u}")))
            .collect();
        let mut to_store = Vec::new();
        for key in keys {
            let id = address_id(integration, &key);
            if let Some(mut known) = self.addresses.get_mut(&id)
                && known.not_installed == installed
            {
                known.not_installed = !installed;
                if let Some(bytes) = known.record() {
                    to_store.push((record_id(&id), bytes));
                }
            }
        }
        if !to_store.is_empty() {
            self.unsaved.lock().extend(to_store);
        }
    }

    /// A personal chat the router created is known from now on, by user and by conversation
    /// (in the store: [`AddressBook::find`] finds it).
    pub fn remember(&self, address: Address, conversation_id: &str) {
        let by_conversation = Address {
            key: format!("conv:{conversation_id}"),
            ..address.clone()
        };
        let mut to_store = Vec::new();
        for address in [address, by_conversation] {
            let id = record_id(&address_id(&address.integration_id, &address.key));
            if let Ok(bytes) = serde_json::to_vec(&address) {
                to_store.push((id, bytes));
            }
        }
        self.unsaved_created.lock().extend(to_store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one router learned, another started on the same store finds: every address of a
    /// personal chat (conversation, user by both ids, tenant), with its route and account.
    #[tokio::test]
    async fn learned_addresses_are_found_again_after_a_restart() {
        let dir =
            std::env::temp_dir().join(format!("teams-router-addresses-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::EmbeddedStore::open(&dir, 1 << 20, false).unwrap();
        let store = Arc::new(Store::Embedded(Arc::new(store)));
        let health = Arc::new(StoreHealth::default());
        let body = include_bytes!("../../fixtures/activities/personal-message.json");
        let activity = crate::activity::parse_turn(body).unwrap();
        let keys = [
            format!("conv:{}", activity.conversation_id()),
            format!("user:{}", activity.from_id().unwrap()),
            format!("user:{}", activity.from_aad_object_id().unwrap()),
            format!("tenant:{}", activity.tenant_id().unwrap()),
        ];

        let first = AddressBook::load(Arc::clone(&store), Arc::clone(&health)).await;
        first.learn("int_1", &activity);
        first.save().await;
        let learned: Vec<Address> = keys
            .iter()
            .map(|key| first.get("int_1", key).expect(key))
            .collect();
        assert_eq!(
            learned[0].service_url,
            "https://smba.trafficmanager.net/amer/"
        );
        assert_eq!(learned[1].conversation, learned[0].conversation);
        assert_eq!(
            learned[1].bot.value()["id"],
            "28:c9e8c047-2a74-40a2-b28a-b162d5f5327c"
        );
        drop(first);

        let second = AddressBook::load(store, health).await;
        for (key, address) in keys.iter().zip(&learned) {
            assert_eq!(second.get("int_1", key).as_ref(), Some(address), "{key}");
        }
        assert_eq!(second.get("int_2", &keys[0]), None, "another integration's");
        assert_eq!(second.routes.len(), 1, "one route shared by all four");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn record_names_are_the_ones_stored_before_and_read_back() {
        let id = address_id("int_1", "conv:a:1");
        // The name every earlier version gave this address's record.
        let earlier = aws_lc_rs::digest::digest(&SHA256, "int_1\u{0}conv:a:1".as_bytes());
        let hex: String = earlier.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(record_id(&id), format!("addr_{hex}"));
        assert_eq!(parse_record_id(&record_id(&id)), Some(id));
        for foreign in [
            "addr_",
            "addr_zz",
            "tenant_0123456789abcdef01234567",
            "addr_0123",
            "addr_+123456789abcdef01234567",
        ] {
            assert_eq!(parse_record_id(foreign), None, "{foreign}");
        }
        assert_eq!(
            parse_record_id("addr_0123456789abcdef0123456z"),
            None,
            "not hex"
        );
    }
}
