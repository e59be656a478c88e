//! The live records of bots and Teams integrations that the data path reads on every activity.
//! Seeded from the config and written by the management API ([`crate::admin`]); a change
//! replaces the record's `Arc`, so the next activity sees it and running turns keep the one they
//! started with. Lookups are by `&str` into a sharded map, so the hot path allocates nothing and
//! shares no global lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use metrics::{Counter, counter};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::records::{BackendSpec, BotRecord, IntegrationRecord};
use crate::telemetry::{ACTIVITIES_RECEIVED, ACTIVITY_TYPES, REJECT_REASONS};

/// An integration as the data path needs it: the record plus what is derived from it once.
pub struct Integration {
    /// The record as configured (secrets included: never log or serialize this whole struct).
    pub record: IntegrationRecord,
    /// `id` shared with every conversation of this integration.
    pub id: Arc<str>,
    /// Bot Framework credentials; `None` accepts nothing, unless in development mode.
    pub credentials: Option<Arc<AppCredentials>>,
    /// Its cloud's keys, issuer and token endpoint; `None`: the `[microsoft]` section's.
    pub cloud: Option<Arc<crate::auth::cloud::CloudAuth>>,
    /// Who owns the record and when it changed.
    pub owner: Owner,
    /// The latest setup check.
    pub setup: SetupResult,
    /// `allowFrom`, parsed once; `None` lets everybody in.
    pub allow_from: Option<AllowFrom>,
    /// `activities_received_total` handles, one per activity type label, made once so that the
    /// hot path does not build metric keys.
    received: Vec<Counter>,
    /// Activities acknowledged since the event log last summed them up, per activity type.
    accepted: Vec<AtomicU64>,
    /// Unauthenticated requests refused since then, per reason ([`REJECT_REASONS`]): summed up
    /// too, so that forged traffic cannot push real events out of the bounded log.
    refused: Vec<AtomicU64>,
}

/// What the outbound token request needs for one Bot Framework app.
#[derive(Clone, PartialEq, Eq)]
pub struct AppCredentials {
    pub app_id: String,
    pub app_secret: String,
    /// Single-tenant apps ask their own tenant for tokens; multi-tenant ones their cloud's
    /// token tenant (`botframework.com` in the public cloud).
    pub tenant_id: Option<String>,
    /// Where its tokens come from; `None`: the `[microsoft]` section's login URL and scope.
    pub cloud: Option<Arc<crate::auth::cloud::CloudAuth>>,
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("app_id", &self.app_id)
            .field("app_secret", &"***")
            .field("tenant_id", &self.tenant_id.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The account a record belongs to, and its timestamps (milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub account: String,
    pub created_at: u64,
    pub updated_at: u64,
    /// Creation order (microseconds, unique per record): lists sort by it.
    #[serde(default)]
    pub order: u64,
    /// For a record seeded from the config: the keyed digest of that config entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SetupStatus {
    /// Never checked.
    #[default]
    Unchecked,
    /// A check is queued or running.
    Pending,
    Succeeded,
    Failed,
}

/// The outcome of the latest setup check (a live client-credentials request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SetupResult {
    pub status: SetupStatus,
    pub checked_at: Option<u64>,
    /// Why it failed: a stable code and a message that never quotes a secret or a tenant.
    pub code: Option<String>,
    pub message: Option<String>,
}

/// Who may talk to a bot: comma-separated entries, each matched against the sender's
/// `aadObjectId` or `id`, or `tenant:<tenantId>` against the activity's tenant; `*` matches any
/// run of characters (so `*` alone lets everybody in). Matching ignores ASCII case (the ids are
/// GUIDs and Teams user ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowFrom {
    senders: Vec<String>,
    tenants: Vec<String>,
}

impl AllowFrom {
    /// `None` for an absent or blank list (nobody is excluded).
    pub fn parse(list: Option<&str>) -> Option<Self> {
        let list = list?.trim();
        if list.is_empty() {
            return None;
        }
        let mut allow = Self {
            senders: Vec::new(),
            tenants: Vec::new(),
        };
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.strip_prefix("tenant:") {
                Some(tenant) => allow.tenants.push(tenant.trim().to_ascii_lowercase()),
                None => allow.senders.push(entry.to_ascii_lowercase()),
            }
        }
        Some(allow)
    }

    pub fn allows(
        &self,
        sender_id: Option<&str>,
        aad_object_id: Option<&str>,
        tenant: Option<&str>,
    ) -> bool {
        let any = |patterns: &[String], value: Option<&str>| {
            value.is_some_and(|v| patterns.iter().any(|p| glob_match(p, v)))
        };
        any(&self.senders, aad_object_id)
            || any(&self.senders, sender_id)
            || any(&self.tenants, tenant)
    }
}

/// `*` matches any run of characters; everything else matches itself, ignoring ASCII case.
fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && p[pi].eq_ignore_ascii_case(&v[vi]) {
            pi += 1;
            vi += 1;
        } else if let Some((star_p, star_v)) = star {
            pi = star_p + 1;
            vi = star_v + 1;
            star = Some((star_p, star_v + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// The non-zero counts, by label, each reset to zero.
fn take_counts(labels: &[&'static str], counts: &[AtomicU64]) -> Vec<(&'static str, u64)> {
    labels
        .iter()
        .zip(counts)
        .filter_map(|(label, count)| {
            let n = count.swap(0, Ordering::Relaxed);
            (n > 0).then_some((*label, n))
        })
        .collect()
}

impl Integration {
    pub fn new(record: IntegrationRecord, owner: Owner, setup: SetupResult) -> Self {
        // Checked when the record was configured or written; a record that no longer resolves
        // (an edited store) is served by the [microsoft] section, and says so.
        let cloud = crate::auth::cloud::resolve(record.cloud.as_deref(), record.cloud_settings.as_ref())
            .unwrap_or_else(|why| {
                tracing::error!(integration = %record.id, %why, "cloud not resolved; using the [microsoft] section");
                None
            });
        let credentials = record
            .bot_framework_app_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .map(|app_id| {
                Arc::new(AppCredentials {
                    app_id: app_id.to_owned(),
                    app_secret: record.bot_framework_app_secret.clone().unwrap_or_default(),
                    // The app's home tenant issues its tokens; a single-tenant integration's
                    // own tenant is that home.
                    tenant_id: record
                        .tenant_id
                        .clone()
                        .or_else(|| record.app_tenant_id.clone())
                        .filter(|t| !t.is_empty()),
                    cloud: cloud.clone(),
                })
            });
        let id: Arc<str> = Arc::from(record.id.as_str());
        let received = ACTIVITY_TYPES
            .iter()
            .map(|kind| {
                let counter = counter!(ACTIVITIES_RECEIVED, "integration" => Arc::clone(&id), "type" => *kind);
                counter.increment(0);
                counter
            })
            .collect();
        Self {
            id,
            allow_from: AllowFrom::parse(record.allow_from.as_deref()),
            record,
            cloud,
            credentials,
            owner,
            setup,
            received,
            accepted: ACTIVITY_TYPES.iter().map(|_| AtomicU64::new(0)).collect(),
            refused: REJECT_REASONS.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts one refusal of an unauthenticated request, for the event log's summary.
    pub fn count_refused(&self, reason: &str) {
        if let Some(index) = REJECT_REASONS.iter().position(|r| *r == reason)
            && let Some(count) = self.refused.get(index)
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The unauthenticated requests refused since the last call, as (reason, count), and resets
    /// them.
    pub fn take_refused(&self) -> Vec<(&'static str, u64)> {
        take_counts(REJECT_REASONS, &self.refused)
    }

    /// Counts one received activity of the type at `type_index` in [`ACTIVITY_TYPES`].
    pub fn count_received(&self, type_index: usize) {
        if let Some(counter) = self.received.get(type_index) {
            counter.increment(1);
        }
        if let Some(count) = self.accepted.get(type_index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The activities acknowledged since the last call, as (type, count), and resets them.
    pub fn take_accepted(&self) -> Vec<(&'static str, u64)> {
        take_counts(ACTIVITY_TYPES, &self.accepted)
    }

    pub fn app_id(&self) -> Option<&str> {
        self.credentials.as_deref().map(|c| c.app_id.as_str())
    }

    /// The tenant a single-tenant integration is bound to (an `appTenantId` binds nothing).
    pub fn tenant_id(&self) -> Option<&str> {
        self.record
            .tenant_id
            .as_deref()
            .filter(|t| !t.is_empty() && self.credentials.is_some())
    }

    /// `tenantPolicy: connected`: only tenants with a connection are served.
    pub fn connected_tenants_only(&self) -> bool {
        self.record.tenant_policy == crate::records::TenantPolicy::Connected
    }

    /// Whether activities of `channel_id` are taken: `msteams`, and the channels the record
    /// lists.
    pub fn takes_channel(&self, channel_id: &str) -> bool {
        channel_id == "msteams"
            || self
                .record
                .channels
                .as_ref()
                .is_some_and(|listed| listed.iter().any(|c| c == channel_id))
    }

    /// Development mode: said so in the config, and no App ID (an integration without one that
    /// is not in development mode accepts nothing).
    pub fn is_development(&self) -> bool {
        self.record.development && self.credentials.is_none()
    }
}

#[derive(Debug)]
pub struct Bot {
    pub record: BotRecord,
    pub owner: Owner,
}

impl Bot {
    pub fn backend(&self) -> &BackendSpec {
        &self.record.backend
    }
}

#[derive(Default)]
pub struct Registry {
    integrations: DashMap<Box<str>, Arc<Integration>>,
    bots: DashMap<Box<str>, Arc<Bot>>,
    /// Records ("bot/ID", "integration/ID") whose stored secret cannot be opened here.
    unreadable_secrets: arc_swap::ArcSwap<std::collections::BTreeSet<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("integrations", &self.integrations.len())
            .field("bots", &self.bots.len())
            .finish()
    }
}

impl Registry {
    /// The config's records as they are, owned by the first account (tools and benches; the
    /// router itself loads through [`crate::admin`], which also reads the store).
    pub fn from_config(config: &Config) -> Self {
        let registry = Self::default();
        let owner = Owner {
            account: config
                .accounts
                .first()
                .map(|a| a.id.clone())
                .unwrap_or_else(|| "default".into()),
            created_at: 0,
            updated_at: 0,
            order: 0,
            seed: None,
        };
        for bot in &config.bots {
            registry.put_bot(bot.clone(), owner.clone());
        }
        for integration in &config.integrations {
            registry.put_integration(integration.clone(), owner.clone(), SetupResult::default());
        }
        registry
    }

    pub fn set_unreadable_secrets(&self, records: std::collections::BTreeSet<String>) {
        metrics::gauge!(crate::telemetry::SECRETS_UNREADABLE).set(records.len() as f64);
        self.unreadable_secrets.store(Arc::new(records));
    }

    /// Records whose stored secret cannot be opened with this process's master key.
    pub fn unreadable_secrets(&self) -> Arc<std::collections::BTreeSet<String>> {
        self.unreadable_secrets.load_full()
    }

    /// Unready while records' stored secrets cannot be opened: names them.
    pub fn readiness_check(self: &Arc<Self>) -> crate::telemetry::ReadinessCheck {
        let registry = Arc::downgrade(self);
        Box::new(move || {
            let unreadable = registry.upgrade()?.unreadable_secrets();
            if unreadable.is_empty() {
                return None;
            }
            let names: Vec<&str> = unreadable.iter().map(String::as_str).collect();
            Some(
                format!(
                    "stored secrets of {} cannot be opened with this router's master key (sealed \
                     by a router with another key?); these records are not used",
                    names.join(", ")
                )
                .into(),
            )
        })
    }

    /// Whether the bot's stored secret cannot be opened here (it must not be called without it).
    pub fn bot_secret_unreadable(&self, bot_id: &str) -> bool {
        let unreadable = self.unreadable_secrets.load();
        !unreadable.is_empty() && unreadable.contains(&format!("bot/{bot_id}"))
    }

    pub fn integration(&self, id: &str) -> Option<Arc<Integration>> {
        self.integrations.get(id).map(|e| Arc::clone(e.value()))
    }

    pub fn bot(&self, id: &str) -> Option<Arc<Bot>> {
        self.bots.get(id).map(|e| Arc::clone(e.value()))
    }

    pub fn put_integration(
        &self,
        record: IntegrationRecord,
        owner: Owner,
        setup: SetupResult,
    ) -> Arc<Integration> {
        let integration = Arc::new(Integration::new(record, owner, setup));
        let replaced = self.integrations.insert(
            integration.record.id.as_str().into(),
            Arc::clone(&integration),
        );
        // Counts the event log has not summed up yet move to the new version of the record.
        if let Some(old) = replaced {
            for (from, to) in old.accepted.iter().zip(&integration.accepted) {
                to.fetch_add(from.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            }
            for (from, to) in old.refused.iter().zip(&integration.refused) {
                to.fetch_add(from.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        integration
    }

    pub fn put_bot(&self, record: BotRecord, owner: Owner) -> Arc<Bot> {
        let bot = Arc::new(Bot { record, owner });
        self.bots
            .insert(bot.record.id.as_str().into(), Arc::clone(&bot));
        bot
    }

    pub fn remove_integration(&self, id: &str) -> Option<Arc<Integration>> {
        self.integrations.remove(id).map(|(_, i)| i)
    }

    pub fn remove_bot(&self, id: &str) -> Option<Arc<Bot>> {
        self.bots.remove(id).map(|(_, b)| b)
    }

    pub fn bots(&self) -> Vec<Arc<Bot>> {
        self.bots.iter().map(|e| Arc::clone(e.value())).collect()
    }

    /// Every integration, for metric pre-registration and readiness.
    pub fn integrations(&self) -> Vec<Arc<Integration>> {
        self.integrations
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect()
    }

    /// True when at least one integration verifies tokens (so readiness needs signing keys).
    pub fn needs_signing_keys(&self) -> bool {
        self.integrations.iter().any(|e| e.credentials.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_from_matches_ids_tenants_and_wildcards() {
        let allow = AllowFrom::parse(Some(" 29:1abc , AAD-1*, tenant:T-9 ")).unwrap();
        assert!(allow.allows(Some("29:1ABC"), None, None));
        assert!(allow.allows(Some("29:other"), Some("aad-1234"), None));
        assert!(allow.allows(None, None, Some("t-9")));
        assert!(!allow.allows(Some("29:other"), Some("aad-2"), Some("t-8")));
        assert!(!allow.allows(None, None, None));
        assert!(
            AllowFrom::parse(Some("*"))
                .unwrap()
                .allows(Some("x"), None, None)
        );
        assert!(AllowFrom::parse(Some("  ")).is_none());
        assert!(AllowFrom::parse(None).is_none());
    }

    #[test]
    fn glob_matches_runs() {
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*c", "abbbd"));
        assert!(!glob_match("abc", "abcd"));
    }
}
