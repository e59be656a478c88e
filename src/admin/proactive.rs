//! Proactive messages (`POST /api/v1/integration/teams/{id}/message`): what notification systems
//! built on Teams need. A message goes into a conversation the router has seen, into the personal
//! chat with a user (created with `POST v3/conversations` when there is none yet), or starts a new
//! thread in a team channel. Teams must be addressed with the serviceUrl, tenant and bot account
//! of that conversation or team (protocol.md §3.1, §3.2), so the address book learns them from
//! every activity an integration receives, and keeps them in the store (in batches, once a second)
//! so that a restarted router can still reach them.

use std::sync::Arc;

use aws_lc_rs::digest::{SHA256, digest};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::activity::TurnActivity;
use crate::connector::{Connector, ConnectorError, Delivery, Route, is_loopback_url};
use crate::registry::Integration;
use crate::store::{Store, StoreHealth, load_records};

pub const STORE_KIND: &str = "addresses";

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
    pub bot: Value,
    /// The conversation account (none for channels and tenants: a conversation is created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Value>,
}

pub struct AddressBook {
    addresses: DashMap<String, Address>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    /// New and changed addresses, written to the store together once a second: a burst of new
    /// conversations must not become one store transaction each.
    unsaved: parking_lot::Mutex<Vec<(String, Vec<u8>)>>,
}

/// How often learned addresses reach the store.
const SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn record_id(integration: &str, key: &str) -> String {
    let hash = digest(&SHA256, format!("{integration}\u{0}{key}").as_bytes());
    let hex: String = hash.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("addr_{hex}")
}

impl AddressBook {
    pub async fn load(store: Arc<Store>, health: Arc<StoreHealth>) -> Arc<Self> {
        let book = Arc::new(Self {
            addresses: DashMap::new(),
            store: Arc::clone(&store),
            health: Arc::clone(&health),
            unsaved: parking_lot::Mutex::new(Vec::new()),
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
        for (id, address) in load_records::<Address>(&store, &health, STORE_KIND).await {
            book.addresses.insert(id, address);
        }
        book
    }

    /// Writes what was learned since the last save; a failed write is tried again next time.
    async fn save(&self) {
        let batch = std::mem::take(&mut *self.unsaved.lock());
        if batch.is_empty() {
            return;
        }
        let result = self.store.put_records(STORE_KIND, batch.clone()).await;
        self.health.observe("records", &result);
        if let Err(error) = result {
            tracing::warn!(%error, addresses = batch.len(), "addresses not stored; retried in a second");
            let mut unsaved = self.unsaved.lock();
            let newer = std::mem::replace(&mut *unsaved, batch);
            unsaved.extend(newer);
        }
    }

    pub fn get(&self, integration: &str, key: &str) -> Option<Address> {
        self.addresses
            .get(&record_id(integration, key))
            .map(|a| a.value().clone())
    }

    /// Learns where the activity's conversation, sender (in a personal chat), channel, team and
    /// tenant can be reached. Only a new or changed address is written to the store.
    pub fn learn(self: &Arc<Self>, integration: &str, activity: &TurnActivity) {
        let Some(bot) = &activity.recipient else {
            return;
        };
        let tenant = activity.tenant_id().map(str::to_owned);
        let address = |key: String, conversation: Option<&Value>| Address {
            integration_id: integration.to_owned(),
            key,
            service_url: activity.service_url.clone(),
            tenant_id: tenant.clone(),
            bot: bot.clone(),
            conversation: conversation.cloned(),
        };
        let conversation = Some(&activity.conversation);
        let by_conversation = address(format!("conv:{}", activity.conversation_id()), conversation);
        // A conversation seen before from the same address taught the rest already.
        if self
            .addresses
            .get(&record_id(integration, &by_conversation.key))
            .is_some_and(|a| *a == by_conversation)
        {
            return;
        }
        let mut learned = vec![by_conversation];
        if activity.is_personal() {
            for user in [
                activity.from_field("id"),
                activity.from_field("aadObjectId"),
            ]
            .into_iter()
            .flatten()
            .filter(|u| !u.is_empty())
            {
                learned.push(address(format!("user:{user}"), conversation));
            }
        }
        let channel_data = activity.channel_data.as_ref();
        for pointer in ["/channel/id", "/team/id"] {
            if let Some(id) = channel_data
                .and_then(|c| c.pointer(pointer))
                .and_then(Value::as_str)
            {
                // A team's id is also its General channel's id.
                learned.push(address(format!("channel:{id}"), None));
            }
        }
        if let Some(tenant) = &tenant {
            learned.push(address(format!("tenant:{tenant}"), None));
        }
        let mut to_store = Vec::new();
        for address in learned {
            let id = record_id(integration, &address.key);
            let known = self.addresses.get(&id).is_some_and(|a| *a == address);
            if !known {
                if let Ok(bytes) = serde_json::to_vec(&address) {
                    to_store.push((id.clone(), bytes));
                }
                self.addresses.insert(id, address);
            }
        }
        if !to_store.is_empty() {
            self.unsaved.lock().extend(to_store);
        }
    }
}

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MessageRequest {
    /// A conversation the router has seen.
    #[serde(default)]
    pub conversation_id: Option<String>,
    /// A Teams user id (`29:...`) or AAD object id: their personal chat with the bot.
    #[serde(default)]
    pub user_id: Option<String>,
    /// A team channel (`19:...@thread.tacv2`, or the team id for General): a new thread.
    #[serde(default)]
    pub channel_id: Option<String>,
    /// The tenant of a user the router has not seen yet (default: the integration's tenant).
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    /// Cards and other attachments of the message.
    #[serde(default)]
    pub attachments: Vec<Value>,
}

/// Characters a proactive message may have at most (Teams refuses messages over ~100 KB).
const MAX_TEXT_CHARS: usize = 28_000;
const MAX_ATTACHMENTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ProactiveError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unknown(String),
    #[error("a development-mode integration sends only to loopback service URLs")]
    Development,
    #[error("Teams refused the message: {0}")]
    Connector(#[from] ConnectorError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> ProactiveError {
    ProactiveError::Invalid {
        field,
        message: message.into(),
    }
}

impl MessageRequest {
    fn check(&self) -> Result<(), ProactiveError> {
        let targets = [&self.conversation_id, &self.user_id, &self.channel_id]
            .iter()
            .filter(|t| t.is_some())
            .count();
        if targets != 1 {
            return Err(invalid(
                "conversationId",
                "give exactly one of conversationId, userId and channelId",
            ));
        }
        for (field, value) in [
            ("conversationId", &self.conversation_id),
            ("userId", &self.user_id),
            ("channelId", &self.channel_id),
            ("tenantId", &self.tenant_id),
        ] {
            if value
                .as_deref()
                .is_some_and(|v| v.trim().is_empty() || v.len() > 512)
            {
                return Err(invalid(field, "must have 1 to 512 characters"));
            }
        }
        let text = self.text.as_deref().unwrap_or_default();
        if text.trim().is_empty() && self.attachments.is_empty() {
            return Err(invalid("text", "a message needs text or attachments"));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(invalid(
                "text",
                format!("longer than {MAX_TEXT_CHARS} characters"),
            ));
        }
        if self.attachments.len() > MAX_ATTACHMENTS
            || !self.attachments.iter().all(Value::is_object)
        {
            return Err(invalid(
                "attachments",
                format!("at most {MAX_ATTACHMENTS} attachment objects"),
            ));
        }
        Ok(())
    }

    fn message(&self, address: &Address, conversation: Value) -> Value {
        let mut message = json!({
            "type": "message",
            "channelId": "msteams",
            "serviceUrl": address.service_url,
            "from": address.bot,
            "conversation": conversation,
        });
        if let Some(text) = self.text.as_deref().filter(|t| !t.is_empty()) {
            message["text"] = json!(text);
        }
        if !self.attachments.is_empty() {
            message["attachments"] = json!(self.attachments);
        }
        message
    }
}

/// Sends the message; answers `{"conversationId", "activityId"}`.
pub async fn send(
    book: &Arc<AddressBook>,
    connector: &Connector,
    integration: &Integration,
    request: MessageRequest,
) -> Result<Value, ProactiveError> {
    request.check()?;
    let integration_id = integration.record.id.as_str();
    let credentials = integration.credentials.as_deref();
    let reachable = |address: &Address| {
        if integration.is_development() && !is_loopback_url(&address.service_url) {
            return Err(ProactiveError::Development);
        }
        Ok(())
    };
    if let Some(conversation_id) = &request.conversation_id {
        let address = book
            .get(integration_id, &format!("conv:{conversation_id}"))
            .ok_or_else(|| {
                ProactiveError::Unknown(format!(
                    "this integration has not seen conversation {conversation_id:?}"
                ))
            })?;
        reachable(&address)?;
        let conversation = address
            .conversation
            .clone()
            .unwrap_or_else(|| json!({"id": conversation_id}));
        return send_into(connector, credentials, &request, &address, conversation).await;
    }
    if let Some(user) = &request.user_id {
        if let Some(address) = book.get(integration_id, &format!("user:{user}")) {
            reachable(&address)?;
            let conversation = address.conversation.clone().unwrap_or(Value::Null);
            return send_into(connector, credentials, &request, &address, conversation).await;
        }
        // No personal chat yet: create one in the user's tenant.
        let tenant = request
            .tenant_id
            .clone()
            .or_else(|| integration.record.tenant_id.clone())
            .ok_or_else(|| {
                invalid(
                    "tenantId",
                    "the user has not talked to this bot; name their tenant",
                )
            })?;
        let base = book
            .get(integration_id, &format!("tenant:{tenant}"))
            .ok_or_else(|| {
                ProactiveError::Unknown(format!(
                    "this integration has had no traffic from tenant {tenant:?}, so its service URL is unknown"
                ))
            })?;
        reachable(&base)?;
        let created = connector
            .create_conversation(
                Route {
                    credentials,
                    tenant: Some(&tenant),
                    service_url: &base.service_url,
                    conversation_id: user,
                },
                &json!({
                    "isGroup": false,
                    "bot": base.bot,
                    "members": [{"id": user}],
                    "tenantId": tenant,
                    "channelData": {"tenant": {"id": tenant}},
                }),
            )
            .await?;
        let conversation_id = created
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ProactiveError::Unknown("Teams created the conversation without an id".into())
            })?
            .to_owned();
        let conversation =
            json!({"id": conversation_id, "conversationType": "personal", "tenantId": tenant});
        let address = Address {
            key: format!("user:{user}"),
            conversation: Some(conversation.clone()),
            ..base
        };
        let answer = send_into(connector, credentials, &request, &address, conversation).await?;
        remember(book, address, &conversation_id);
        return Ok(answer);
    }
    let channel = request.channel_id.clone().unwrap_or_default();
    let address = book
        .get(integration_id, &format!("channel:{channel}"))
        .ok_or_else(|| {
            ProactiveError::Unknown(format!(
                "this integration has not seen team channel {channel:?}"
            ))
        })?;
    reachable(&address)?;
    let tenant = address.tenant_id.clone();
    let first = request.message(&address, json!({"id": channel, "isGroup": true}));
    let created = connector
        .create_conversation(
            Route {
                credentials,
                tenant: tenant.as_deref(),
                service_url: &address.service_url,
                conversation_id: &channel,
            },
            &json!({
                "isGroup": true,
                "bot": address.bot,
                "tenantId": tenant,
                "channelData": {"channel": {"id": channel}, "tenant": {"id": tenant}},
                "activity": first,
            }),
        )
        .await?;
    Ok(json!({
        "conversationId": created.get("id").cloned().unwrap_or(Value::Null),
        "activityId": created.get("activityId").cloned().unwrap_or(Value::Null),
    }))
}

async fn send_into(
    connector: &Connector,
    credentials: Option<&crate::registry::AppCredentials>,
    request: &MessageRequest,
    address: &Address,
    conversation: Value,
) -> Result<Value, ProactiveError> {
    let conversation_id = conversation
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let message = request.message(address, conversation);
    let id = connector
        .send(
            Route {
                credentials,
                tenant: address.tenant_id.as_deref(),
                service_url: &address.service_url,
                conversation_id: &conversation_id,
            },
            None,
            &message,
            Delivery::Retried,
        )
        .await?;
    Ok(json!({"conversationId": conversation_id, "activityId": id}))
}

/// A personal chat the router created is known from now on, by user and by conversation.
fn remember(book: &Arc<AddressBook>, address: Address, conversation_id: &str) {
    let by_conversation = Address {
        key: format!("conv:{conversation_id}"),
        ..address.clone()
    };
    let mut to_store = Vec::new();
    for address in [address, by_conversation] {
        let id = record_id(&address.integration_id, &address.key);
        if let Ok(bytes) = serde_json::to_vec(&address) {
            to_store.push((id.clone(), bytes));
        }
        book.addresses.insert(id, address);
    }
    book.unsaved.lock().extend(to_store);
}
