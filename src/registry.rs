//! The live records of bots and Teams integrations that the data path reads on every activity.
//! Seeded from the config; the management API (issue 4) writes the same records. Lookups are by
//! `&str` into a sharded map, so the hot path allocates nothing and shares no global lock.

use std::sync::Arc;

use dashmap::DashMap;
use metrics::{Counter, counter};

use crate::config::{BackendSpec, BotRecord, Config, IntegrationRecord};
use crate::telemetry::{ACTIVITIES_RECEIVED, ACTIVITY_TYPES};

/// An integration as the data path needs it: the record plus what is derived from it once.
pub struct Integration {
    /// The record as configured (secrets included: never log or serialize this whole struct).
    pub record: IntegrationRecord,
    /// `id` shared with every conversation of this integration.
    pub id: Arc<str>,
    /// Bot Framework credentials; `None` is development mode (loopback only, unsigned).
    pub credentials: Option<Arc<AppCredentials>>,
    /// `activities_received_total` handles, one per activity type label, made once so that the
    /// hot path does not build metric keys.
    received: Vec<Counter>,
}

/// What the outbound token request needs for one Bot Framework app.
#[derive(Clone, PartialEq, Eq)]
pub struct AppCredentials {
    pub app_id: String,
    pub app_secret: String,
    /// Single-tenant apps ask their own tenant for tokens; multi-tenant ones `botframework.com`.
    pub tenant_id: Option<String>,
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

impl Integration {
    pub fn new(record: IntegrationRecord) -> Self {
        let credentials = record
            .bot_framework_app_id
            .as_deref()
            .filter(|id| !id.is_empty())
            .map(|app_id| {
                Arc::new(AppCredentials {
                    app_id: app_id.to_owned(),
                    app_secret: record.bot_framework_app_secret.clone().unwrap_or_default(),
                    tenant_id: record.tenant_id.clone().filter(|t| !t.is_empty()),
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
            record,
            credentials,
            received,
        }
    }

    /// Counts one received activity of the type at `type_index` in [`ACTIVITY_TYPES`].
    pub fn count_received(&self, type_index: usize) {
        if let Some(counter) = self.received.get(type_index) {
            counter.increment(1);
        }
    }

    pub fn app_id(&self) -> Option<&str> {
        self.credentials.as_deref().map(|c| c.app_id.as_str())
    }

    /// The tenant a single-tenant integration is bound to.
    pub fn tenant_id(&self) -> Option<&str> {
        self.credentials
            .as_deref()
            .and_then(|c| c.tenant_id.as_deref())
    }

    pub fn is_development(&self) -> bool {
        self.credentials.is_none()
    }
}

#[derive(Debug)]
pub struct Bot {
    pub record: BotRecord,
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
}

impl Registry {
    pub fn from_config(config: &Config) -> Self {
        let registry = Self::default();
        for bot in &config.bots {
            registry.put_bot(bot.clone());
        }
        for integration in &config.integrations {
            registry.put_integration(integration.clone());
        }
        registry
    }

    pub fn integration(&self, id: &str) -> Option<Arc<Integration>> {
        self.integrations.get(id).map(|e| Arc::clone(e.value()))
    }

    pub fn bot(&self, id: &str) -> Option<Arc<Bot>> {
        self.bots.get(id).map(|e| Arc::clone(e.value()))
    }

    pub fn put_integration(&self, record: IntegrationRecord) {
        let integration = Arc::new(Integration::new(record));
        self.integrations
            .insert(integration.record.id.as_str().into(), integration);
    }

    pub fn put_bot(&self, record: BotRecord) {
        self.bots
            .insert(record.id.as_str().into(), Arc::new(Bot { record }));
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
        self.integrations.iter().any(|e| !e.is_development())
    }
}
