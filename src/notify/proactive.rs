//! Proactive messages (`POST /api/v1/integration/teams/{id}/message`): what notification systems
//! built on Teams need. A message goes into a conversation the router has seen, into the personal
//! chat with a user (created with `POST v3/conversations` when there is none yet), or starts a new
//! thread in a team channel. Teams must be addressed with the serviceUrl, tenant and bot account
//! of that conversation or team (protocol.md §3.1, §3.2), so the address book learns them from
//! every activity an integration receives, and keeps them in the store (in batches, once a second)
//! so that a restarted router can still reach them.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::connector::{Connector, ConnectorError, Delivery, Route, is_loopback_url};
use crate::registry::Integration;

use crate::ledger::addresses::{Address, AddressBook, CompactJson};

/// The request body.
#[derive(Debug, Clone, Default, Deserialize)]
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
    /// `markdown`, `plain` or `xml`.
    #[serde(default)]
    pub text_format: Option<String>,
    /// What the activity feed and notifications show.
    #[serde(default)]
    pub summary: Option<String>,
    /// Shown in the user's activity feed (`channelData.notification.alert`).
    #[serde(default)]
    pub alert: bool,
    /// `mention` entities for `<at>` tags in the text.
    #[serde(default)]
    pub mentions: Vec<Value>,
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
    #[error("Teams said the bot is no longer there (uninstalled, removed, or deleted)")]
    NotInstalled,
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
    pub(crate) fn check(&self) -> Result<(), ProactiveError> {
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
        if self
            .text_format
            .as_deref()
            .is_some_and(|f| !matches!(f, "markdown" | "plain" | "xml"))
        {
            return Err(invalid("textFormat", "markdown, plain or xml"));
        }
        if self.summary.as_deref().is_some_and(|s| s.len() > 1024) {
            return Err(invalid("summary", "1024 characters at most"));
        }
        if self.mentions.len() > 20 || !self.mentions.iter().all(Value::is_object) {
            return Err(invalid("mentions", "at most 20 mention entities"));
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

    pub(crate) fn message(&self, address: &Address, conversation: Value) -> Value {
        let mut message = json!({
            "type": "message",
            "channelId": "msteams",
            "serviceUrl": address.service_url,
            "from": address.bot.value(),
            "conversation": conversation,
        });
        // Every proactive send names its tenant (protocol.md §3.2).
        if let Some(tenant) = &address.tenant_id {
            message["channelData"] = json!({"tenant": {"id": tenant}});
        }
        if self.alert {
            message["channelData"]["notification"] = json!({"alert": true});
        }
        if let Some(format) = self.text_format.as_deref().filter(|f| !f.is_empty()) {
            message["textFormat"] = json!(format);
        }
        if let Some(summary) = self.summary.as_deref().filter(|s| !s.is_empty()) {
            message["summary"] = json!(summary);
        }
        if !self.mentions.is_empty() {
            message["entities"] = json!(self.mentions);
        }
        if let Some(text) = self.text.as_deref().filter(|t| !t.is_empty()) {
            message["text"] = json!(text);
        }
        if !self.attachments.is_empty() {
            message["attachments"] = json!(self.attachments);
        }
        message
    }
}

/// Messages the router sent (through `…/message` or a broadcast), so that only its own are
/// changed or deleted later: one record each, by integration, conversation and activity.
pub const SENT_KIND: &str = "sent_messages";

/// A sent message's record id: activity ids are unique only within a conversation.
pub fn sent_id(integration: &str, conversation: &str, activity: &str) -> String {
    format!(
        "{}:{integration}{}:{conversation}{activity}",
        integration.len(),
        conversation.len()
    )
}

/// Sends the message; answers `{"conversationId", "activityId"}`. Where Teams says the bot is
/// no longer in the conversation (403 `BotNotInConversationRoster`), the learned address is
/// marked `not_installed` until Teams says it is installed again.
pub async fn send(
    book: &Arc<AddressBook>,
    connector: &Connector,
    integration: &Integration,
    request: MessageRequest,
    budget_percent: u32,
) -> Result<Value, ProactiveError> {
    let (conversation, user, channel) = (
        request.conversation_id.clone(),
        request.user_id.clone(),
        request.channel_id.clone(),
    );
    let result = send_request(book, connector, integration, request, budget_percent).await;
    if let Err(ProactiveError::Connector(error)) = &result
        && error.status() == Some(403)
        && ["BotNotInConversationRoster", "ForbiddenOperationException"]
            .iter()
            .any(|code| error.detail().contains(code))
    {
        let mut keys: Vec<String> = conversation
            .iter()
            .map(|c| format!("conv:{c}"))
            .chain(channel.iter().map(|c| format!("channel:{c}")))
            .collect();
        if let Some(user) = &user {
            keys.push(format!("user:{user}"));
            let chat = book
                .find(&integration.record.id, &format!("user:{user}"))
                .await
                .and_then(|a| a.conversation.as_ref().map(CompactJson::value))
                .and_then(|c| c.get("id").and_then(Value::as_str).map(str::to_owned));
            keys.extend(chat.map(|c| format!("conv:{c}")));
        }
        book.mark_not_installed(&integration.record.id, &keys).await;
    }
    result
}

async fn send_request(
    book: &Arc<AddressBook>,
    connector: &Connector,
    integration: &Integration,
    request: MessageRequest,
    budget_percent: u32,
) -> Result<Value, ProactiveError> {
    request.check()?;
    let integration_id = integration.record.id.as_str();
    let credentials = integration.credentials.as_deref();
    let reachable = |address: &Address| {
        if integration.is_development() && !is_loopback_url(&address.service_url) {
            return Err(ProactiveError::Development);
        }
        if address.not_installed {
            return Err(ProactiveError::NotInstalled);
        }
        Ok(())
    };
    if let Some(conversation_id) = &request.conversation_id {
        let address = book
            .find(integration_id, &format!("conv:{conversation_id}"))
            .await
            .ok_or_else(|| {
                ProactiveError::Unknown(format!(
                    "this integration has not seen conversation {conversation_id:?}"
                ))
            })?;
        reachable(&address)?;
        let conversation = address
            .conversation
            .as_ref()
            .map_or_else(|| json!({"id": conversation_id}), CompactJson::value);
        return send_into(
            connector,
            credentials,
            &request,
            &address,
            conversation,
            budget_percent,
        )
        .await;
    }
    if let Some(user) = &request.user_id {
        if let Some(address) = book.find(integration_id, &format!("user:{user}")).await {
            reachable(&address)?;
            let conversation = address
                .conversation
                .as_ref()
                .map_or(Value::Null, CompactJson::value);
            let sent = send_into(
                connector,
                credentials,
                &request,
                &address,
                conversation,
                budget_percent,
            )
            .await;
            match sent {
                // Teams no longer knows the chat (ConversationNotFound): created once more
                // below, in the tenant the chat was in.
                Err(ProactiveError::Connector(error)) if error.status() == Some(404) => {
                    tracing::info!(
                        integration = integration_id,
                        "a personal chat is gone; creating it again"
                    );
                    return create_and_send(
                        book,
                        connector,
                        integration,
                        &request,
                        user,
                        request.tenant_id.clone().or(address.tenant_id.clone()),
                        budget_percent,
                    )
                    .await;
                }
                other => return other,
            }
        }
        return create_and_send(
            book,
            connector,
            integration,
            &request,
            user,
            request.tenant_id.clone(),
            budget_percent,
        )
        .await;
    }
    let channel = request.channel_id.clone().unwrap_or_default();
    // A channel not seen yet: its team's tenant's address (or the cloud's global endpoint).
    let address = match book.get(integration_id, &format!("channel:{channel}")) {
        Some(address) => address,
        None => {
            let tenant = request
                .tenant_id
                .clone()
                .or_else(|| integration.record.tenant_id.clone());
            tenant
                .as_deref()
                .and_then(|tenant| {
                    book.get(integration_id, &format!("tenant:{tenant}"))
                        .or_else(|| fallback_address(connector, integration, tenant))
                })
                .ok_or_else(|| {
                    ProactiveError::Unknown(format!(
                        "this integration has not seen team channel {channel:?}; name its tenant"
                    ))
                })?
        }
    };
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
                budget_percent,
            },
            &json!({
                "isGroup": true,
                "bot": address.bot.value(),
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

/// An address in `tenant` where the router has had no traffic: the cloud's global endpoint,
/// with the bot as Teams names it (`28:{app id}`).
fn fallback_address(
    connector: &Connector,
    integration: &Integration,
    tenant: &str,
) -> Option<Address> {
    let service_url = connector.proactive_service_url(integration.record.cloud.as_deref())?;
    let app_id = integration.app_id()?;
    Some(Address {
        integration_id: integration.record.id.clone(),
        key: format!("tenant:{tenant}"),
        service_url,
        tenant_id: Some(tenant.to_owned()),
        bot: CompactJson::of(&json!({"id": format!("28:{app_id}")})),
        conversation: None,
        not_installed: false,
    })
}

/// Creates the user's personal chat in their tenant (get-or-create) and sends into it.
async fn create_and_send(
    book: &Arc<AddressBook>,
    connector: &Connector,
    integration: &Integration,
    request: &MessageRequest,
    user: &str,
    tenant: Option<String>,
    budget_percent: u32,
) -> Result<Value, ProactiveError> {
    let integration_id = integration.record.id.as_str();
    let credentials = integration.credentials.as_deref();
    let tenant = tenant
        .or_else(|| integration.record.tenant_id.clone())
        .ok_or_else(|| {
            invalid(
                "tenantId",
                "the user has not talked to this bot; name their tenant",
            )
        })?;
    let base = match book.get(integration_id, &format!("tenant:{tenant}")) {
        Some(base) => base,
        None => fallback_address(connector, integration, &tenant).ok_or_else(|| {
            ProactiveError::Unknown(format!(
                "this integration has had no traffic from tenant {tenant:?}, and its cloud has no global endpoint"
            ))
        })?,
    };
    if integration.is_development() && !is_loopback_url(&base.service_url) {
        return Err(ProactiveError::Development);
    }
    let created = connector
        .create_conversation(
            Route {
                credentials,
                tenant: Some(&tenant),
                service_url: &base.service_url,
                conversation_id: user,
                budget_percent,
            },
            &json!({
                "isGroup": false,
                "bot": base.bot.value(),
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
        conversation: Some(CompactJson::of(&conversation)),
        ..base
    };
    let answer = send_into(
        connector,
        credentials,
        request,
        &address,
        conversation,
        budget_percent,
    )
    .await?;
    book.remember(address, &conversation_id);
    Ok(answer)
}

async fn send_into(
    connector: &Connector,
    credentials: Option<&crate::registry::AppCredentials>,
    request: &MessageRequest,
    address: &Address,
    conversation: Value,
    budget_percent: u32,
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
                budget_percent,
            },
            None,
            &message,
            Delivery::Retried,
        )
        .await?;
    Ok(json!({"conversationId": conversation_id, "activityId": id}))
}
