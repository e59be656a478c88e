//! Tenant connections: the organizations an integration serves besides the app's home tenant.
//! A tenant is connected by an admin's consent (the management API's consent URL and callback)
//! or by installing the app (`installationUpdate` add). Under `tenantPolicy: connected` only
//! connected tenants reach the bot; the lookup on the request path is one map read.
//!
//! Stored as management records (kind `tenant_connections`, one per integration and tenant, so
//! two instances connecting two tenants at once do not overwrite each other); instances sharing
//! a Redis store pick up each other's connections with the other records.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;
use metrics::counter;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, StoreHealth, load_records, now_ms};
use crate::telemetry::TENANT_CONNECTIONS;

pub const STORE_KIND: &str = "tenant_connections";

/// How a tenant was connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionSource {
    /// An administrator of the tenant granted the app's permissions (Graph included).
    Consent,
    /// The app was installed in the tenant (no Graph consent).
    Installation,
}

impl ConnectionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consent => "consent",
            Self::Installation => "installation",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub integration_id: String,
    pub tenant_id: String,
    pub source: ConnectionSource,
    /// The permissions the consent granted (`scope` of Microsoft's redirect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub connected_at: u64,
    pub updated_at: u64,
}

impl Connection {
    /// Whether Graph may be asked about this tenant: only an admin's consent grants it.
    pub fn has_graph_consent(&self) -> bool {
        self.source == ConnectionSource::Consent
    }
}

/// The record id of a connection: length-prefixed, so no pair of ids collides.
fn record_id(integration: &str, tenant: &str) -> String {
    format!("{}:{integration}{tenant}", integration.len())
}

pub struct Tenants {
    /// Integration → tenant → connection.
    connections: DashMap<String, HashMap<String, Connection>>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
}

impl Tenants {
    pub async fn load(store: Arc<Store>, health: Arc<StoreHealth>) -> Arc<Self> {
        let tenants = Arc::new(Self {
            connections: DashMap::new(),
            store,
            health,
        });
        tenants.refresh().await;
        tenants
    }

    /// Reads every connection from the store again (what other instances wrote included).
    pub async fn refresh(&self) {
        let stored = load_records::<Connection>(&self.store, &self.health, STORE_KIND).await;
        let mut fresh: HashMap<String, HashMap<String, Connection>> = HashMap::new();
        for (_, connection) in stored {
            fresh
                .entry(connection.integration_id.clone())
                .or_default()
                .insert(connection.tenant_id.clone(), connection);
        }
        self.connections
            .retain(|integration, _| fresh.contains_key(integration));
        for (integration, tenants) in fresh {
            self.connections.insert(integration, tenants);
        }
        self.count();
    }

    fn count(&self) {
        let total: usize = self.connections.iter().map(|e| e.value().len()).sum();
        metrics::gauge!(TENANT_CONNECTIONS).set(total as f64);
    }

    pub fn is_connected(&self, integration: &str, tenant: &str) -> bool {
        self.connections
            .get(integration)
            .is_some_and(|tenants| tenants.contains_key(tenant))
    }

    pub fn get(&self, integration: &str, tenant: &str) -> Option<Connection> {
        self.connections
            .get(integration)
            .and_then(|tenants| tenants.get(tenant).cloned())
    }

    /// The integration's connections, oldest first.
    pub fn of_integration(&self, integration: &str) -> Vec<Connection> {
        let mut list: Vec<Connection> = self
            .connections
            .get(integration)
            .map(|tenants| tenants.values().cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| (a.connected_at, &a.tenant_id).cmp(&(b.connected_at, &b.tenant_id)));
        list
    }

    /// Connects a tenant (or records a consent over an installation), stored before it
    /// counts.
    pub async fn connect(
        &self,
        integration: &str,
        tenant: &str,
        source: ConnectionSource,
        scope: Option<String>,
    ) -> Result<Connection, StoreError> {
        let now = now_ms();
        let connection = match self.get(integration, tenant) {
            // An installation does not take a consent's place: the consent granted more.
            Some(known) if source == ConnectionSource::Installation => return Ok(known),
            Some(known) => Connection {
                source,
                scope,
                updated_at: now,
                ..known
            },
            None => Connection {
                integration_id: integration.to_owned(),
                tenant_id: tenant.to_owned(),
                source,
                scope,
                connected_at: now,
                updated_at: now,
            },
        };
        let bytes = serde_json::to_vec(&connection)
            .map_err(|e| StoreError::Corrupt(format!("connection does not serialize: {e}")))?;
        let result = self
            .store
            .put_records(STORE_KIND, vec![(record_id(integration, tenant), bytes)])
            .await;
        self.health.observe("records", &result);
        result?;
        self.connections
            .entry(integration.to_owned())
            .or_default()
            .insert(tenant.to_owned(), connection.clone());
        counter!(crate::telemetry::TENANT_CONNECTS, "source" => source.as_str()).increment(1);
        self.count();
        Ok(connection)
    }

    /// Removes a connection; false when there was none.
    pub async fn disconnect(&self, integration: &str, tenant: &str) -> Result<bool, StoreError> {
        if !self.is_connected(integration, tenant) {
            return Ok(false);
        }
        let result = self
            .store
            .delete_record(STORE_KIND, &record_id(integration, tenant))
            .await;
        self.health.observe("records", &result);
        result?;
        if let Some(mut tenants) = self.connections.get_mut(integration) {
            tenants.remove(tenant);
        }
        self.count();
        Ok(true)
    }

    /// Forgets every connection of a deleted integration.
    pub async fn remove_integration(&self, integration: &str) {
        let Some((_, tenants)) = self.connections.remove(integration) else {
            return;
        };
        for tenant in tenants.keys() {
            let result = self
                .store
                .delete_record(STORE_KIND, &record_id(integration, tenant))
                .await;
            self.health.observe("records", &result);
            if let Err(error) = result {
                tracing::warn!(%error, integration, "a deleted integration's connection stays in the store");
            }
        }
        self.count();
    }
}

#[cfg(test)]
mod tests {
    use super::record_id;

    #[test]
    fn record_ids_do_not_collide() {
        assert_ne!(record_id("a1", "b"), record_id("a", "1b"));
    }
}
