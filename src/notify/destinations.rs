//! Destinations: where notifications go, found and named once. A destination is a team channel,
//! a user (their personal chat with the bot), a conversation the router has seen, or a Teams
//! Workflows webhook; each may carry the id of a subscriber of the operator's product, a name and
//! `meta`, by which broadcasts pick their recipients. What Teams says about installations keeps
//! them true: a destination in a team or chat the bot was removed from is `not_installed`
//! (skipped by broadcasts, with that reason) until the app is installed there again.
//!
//! Kept in memory and in the store (kind `destinations`), like the other management records;
//! a Workflows URL carries its credential (`sig=`), so it is stored sealed by the management
//! API and never shown.

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{Store, StoreError, StoreHealth, load_records, now_ms};

pub const STORE_KIND: &str = "destinations";

/// Where a destination points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Target {
    /// A channel of a team the bot is installed in: a new thread there. `teamId` is the Graph
    /// group id or the Bot Framework team id (`19:…@thread.tacv2`).
    #[serde(rename_all = "camelCase")]
    Channel {
        team_id: String,
        channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
    },
    /// A user: their personal chat with the bot (created when there is none).
    #[serde(rename_all = "camelCase")]
    User {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        aad_object_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
    },
    /// A conversation the router has had traffic from.
    #[serde(rename_all = "camelCase")]
    Conversation { conversation_id: String },
    /// A Teams Workflows webhook: the message is POSTed there as an Adaptive Card. The URL is
    /// sealed (it carries its credential).
    #[serde(rename_all = "camelCase")]
    Workflow { url_sealed: String },
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Channel { .. } => "channel",
            Self::User { .. } => "user",
            Self::Conversation { .. } => "conversation",
            Self::Workflow { .. } => "workflow",
        }
    }

    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            Self::Channel { tenant_id, .. } | Self::User { tenant_id, .. } => tenant_id.as_deref(),
            Self::Conversation { .. } | Self::Workflow { .. } => None,
        }
    }
}

/// Whether the bot can reach a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    #[default]
    Active,
    /// The app was uninstalled there, or the bot removed (broadcasts skip it).
    NotInstalled,
}

impl Reachability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NotInstalled => "not_installed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub id: String,
    pub integration_id: String,
    pub target: Target,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, Value>,
    #[serde(default)]
    pub status: Reachability,
    /// Why it is `not_installed` (what Teams said, and when).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Creation order (microseconds, increasing): the position in listings.
    pub order: u64,
}

impl Destination {
    /// Whether it lies in `team` (the Graph group id or the Bot Framework team id of a team)
    /// or is the conversation `conversation`.
    fn is_in(&self, team_ids: &[&str], conversation: Option<&str>) -> bool {
        match &self.target {
            Target::Channel {
                team_id,
                channel_id,
                ..
            } => {
                team_ids.iter().any(|t| t == team_id)
                    || conversation.is_some_and(|c| c == channel_id)
            }
            Target::Conversation { conversation_id } => conversation == Some(conversation_id),
            Target::User { .. } | Target::Workflow { .. } => false,
        }
    }
}

/// What selects destinations: every given field must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub subscriber_id: Option<String>,
    pub kind: Option<String>,
    /// `meta[key]=value`: the key holds the value (a string, or the JSON text of another value).
    pub meta: Vec<(String, String)>,
}

impl Filter {
    pub fn matches(&self, destination: &Destination) -> bool {
        self.subscriber_id
            .as_deref()
            .is_none_or(|s| destination.subscriber_id.as_deref() == Some(s))
            && self
                .kind
                .as_deref()
                .is_none_or(|k| destination.target.kind() == k)
            && self.meta.iter().all(|(key, wanted)| {
                // As the other lists filter: a string as is, another value as JSON.
                destination.meta.get(key).is_some_and(|value| match value {
                    Value::String(s) => s == wanted,
                    other => serde_json::from_str::<Value>(wanted).ok().as_ref() == Some(other),
                })
            })
    }
}

pub struct Destinations {
    by_id: DashMap<String, Destination>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
}

impl Destinations {
    pub async fn load(store: Arc<Store>, health: Arc<StoreHealth>) -> Arc<Self> {
        let destinations = Arc::new(Self {
            by_id: DashMap::new(),
            store,
            health,
        });
        destinations.refresh().await;
        destinations
    }

    /// Reads every destination from the store again (other instances' writes included).
    pub async fn refresh(&self) {
        let stored = load_records::<Destination>(&self.store, &self.health, STORE_KIND).await;
        let ids: std::collections::HashSet<&String> = stored.iter().map(|(id, _)| id).collect();
        self.by_id.retain(|id, _| ids.contains(id));
        for (id, destination) in stored {
            self.by_id.insert(id, destination);
        }
    }

    pub fn get(&self, id: &str) -> Option<Destination> {
        self.by_id.get(id).map(|d| d.clone())
    }

    /// The integration's destinations that `filter` selects, in creation order.
    pub fn of_integration(&self, integration: &str, filter: &Filter) -> Vec<Destination> {
        let mut found: Vec<Destination> = self
            .by_id
            .iter()
            .filter(|d| d.integration_id == integration && filter.matches(d))
            .map(|d| d.clone())
            .collect();
        found.sort_by(|a, b| (a.order, &a.id).cmp(&(b.order, &b.id)));
        found
    }

    /// Stores a destination (new or changed), then shows it.
    pub async fn put(&self, destination: Destination) -> Result<Destination, StoreError> {
        let bytes = serde_json::to_vec(&destination)
            .map_err(|e| StoreError::Corrupt(format!("destination does not serialize: {e}")))?;
        let result = self
            .store
            .put_records(STORE_KIND, vec![(destination.id.clone(), bytes)])
            .await;
        self.health.observe("records", &result);
        result?;
        self.by_id
            .insert(destination.id.clone(), destination.clone());
        Ok(destination)
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let result = self.store.delete_record(STORE_KIND, id).await;
        self.health.observe("records", &result);
        result?;
        self.by_id.remove(id);
        Ok(())
    }

    /// Forgets every destination of a deleted integration.
    pub async fn remove_integration(&self, integration: &str) {
        let ids: Vec<String> = self
            .by_id
            .iter()
            .filter(|d| d.integration_id == integration)
            .map(|d| d.id.clone())
            .collect();
        for id in ids {
            if let Err(error) = self.delete(&id).await {
                tracing::warn!(%error, integration, "a deleted integration's destination stays in the store");
            }
        }
    }

    /// One destination is not reachable any more (Teams answered a send with
    /// `BotNotInConversationRoster`).
    pub async fn not_installed(&self, id: &str, reason: &str) {
        let Some(mut destination) = self.get(id) else {
            return;
        };
        if destination.status == Reachability::NotInstalled {
            return;
        }
        destination.status = Reachability::NotInstalled;
        destination.status_reason = Some(reason.to_owned());
        destination.updated_at = now_ms();
        if let Err(error) = self.put(destination).await {
            tracing::warn!(%error, "a destination's installation state was not stored");
        }
    }

    /// What Teams said about an installation: the destinations in `team_ids` (or the
    /// conversation) become `not_installed`, or active again on an installation. Returns how
    /// many changed.
    pub async fn mark(
        &self,
        integration: &str,
        team_ids: &[&str],
        conversation: Option<&str>,
        status: Reachability,
        reason: &str,
    ) -> usize {
        let changed: Vec<Destination> = self
            .by_id
            .iter()
            .filter(|d| {
                d.integration_id == integration
                    && d.status != status
                    && d.is_in(team_ids, conversation)
            })
            .map(|d| {
                let mut d = d.clone();
                d.status = status;
                d.status_reason = (status == Reachability::NotInstalled).then(|| reason.to_owned());
                d.updated_at = now_ms();
                d
            })
            .collect();
        let count = changed.len();
        for destination in changed {
            if let Err(error) = self.put(destination).await {
                tracing::warn!(%error, integration, "a destination's installation state was not stored");
            }
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(
        target: Target,
        subscriber: Option<&str>,
        meta: &[(&str, Value)],
    ) -> Destination {
        Destination {
            id: "d".into(),
            integration_id: "i".into(),
            target,
            subscriber_id: subscriber.map(str::to_owned),
            name: None,
            meta: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            status: Reachability::Active,
            status_reason: None,
            created_at: 0,
            updated_at: 0,
            order: 0,
        }
    }

    #[test]
    fn filters_select_by_subscriber_type_and_meta() {
        let channel = destination(
            Target::Channel {
                team_id: "t".into(),
                channel_id: "19:c@thread.tacv2".into(),
                tenant_id: None,
            },
            Some("sub-1"),
            &[("region", Value::from("emea")), ("tier", Value::from(2))],
        );
        let by = |subscriber: Option<&str>, kind: Option<&str>, meta: &[(&str, &str)]| Filter {
            subscriber_id: subscriber.map(str::to_owned),
            kind: kind.map(str::to_owned),
            meta: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        assert!(by(None, None, &[]).matches(&channel));
        assert!(
            by(
                Some("sub-1"),
                Some("channel"),
                &[("region", "emea"), ("tier", "2")]
            )
            .matches(&channel)
        );
        assert!(!by(Some("sub-2"), None, &[]).matches(&channel));
        assert!(!by(None, Some("user"), &[]).matches(&channel));
        assert!(!by(None, None, &[("region", "amer")]).matches(&channel));
        assert!(!by(None, None, &[("missing", "x")]).matches(&channel));
        assert!(channel.is_in(&["t"], None) && channel.is_in(&[], Some("19:c@thread.tacv2")));
        assert!(!channel.is_in(&["u"], Some("19:other")));
    }
}
