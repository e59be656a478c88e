//! `…/message/update` and `…/message/delete`: a message the router sent (a proactive message,
//! or a broadcast's copy) changed or deleted later. Activity ids are unique only within a
//! conversation, so both are given; a message the router did not send is 404.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{self, Invalid};
use super::{Admin, ApiError, ApiResult};
use crate::connector::{ConnectorError, Route};
use crate::ledger::addresses::CompactJson;
use crate::notify::proactive::{MessageRequest, SENT_KIND, sent_id};
use crate::registry::Integration;
use crate::store::now_ms;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateMessage {
    conversation_id: String,
    activity_id: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    attachments: Vec<Value>,
    #[serde(default)]
    text_format: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    mentions: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DeleteMessage {
    conversation_id: String,
    activity_id: String,
}

fn connector_failure(error: ConnectorError) -> ApiError {
    let message = error.to_string();
    match (&error, error.status()) {
        (_, Some(404)) => ApiError::new(StatusCode::NOT_FOUND, "message_not_found", message),
        (ConnectorError::QueueFull(_), _) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "connector_busy", message)
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "connector_failed", message),
    }
}

impl Admin {
    /// Remembers a proactive message, so that it can be changed later.
    pub(super) async fn remember_sent(&self, integration: &str, answer: &Value) {
        let (Some(conversation), Some(activity)) = (
            answer.get("conversationId").and_then(Value::as_str),
            answer.get("activityId").and_then(Value::as_str),
        ) else {
            return;
        };
        let record =
            json!({"conversationId": conversation, "activityId": activity, "sentAt": now_ms()});
        let result = self
            .parts
            .vault
            .store
            .put_records(
                SENT_KIND,
                vec![(
                    sent_id(integration, conversation, activity),
                    record.to_string().into_bytes(),
                )],
            )
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, "a sent message is not remembered: it cannot be updated or deleted later");
        }
    }

    /// Whether the router sent this message for the integration (proactively or in a
    /// broadcast).
    async fn sent_here(
        &self,
        integration: &Integration,
        conversation: &str,
        activity: &str,
    ) -> Result<bool, ApiError> {
        let id = sent_id(&integration.record.id, conversation, activity);
        let found = self
            .parts
            .vault
            .store
            .records_by_ids(SENT_KIND, vec![id])
            .await
            .map_err(ApiError::store)?;
        Ok(found.into_iter().any(|record| record.is_some()))
    }

    fn route_to<'a>(
        &self,
        integration: &'a Integration,
        address: &'a crate::ledger::addresses::Address,
        conversation: &'a str,
    ) -> Route<'a> {
        Route {
            credentials: integration.credentials.as_deref(),
            tenant: address.tenant_id.as_deref(),
            service_url: &address.service_url,
            conversation_id: conversation,
            budget_percent: 100,
        }
    }

    pub(super) async fn update_message(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let input: UpdateMessage = model::parse_body(body)?;
        let request = MessageRequest {
            conversation_id: Some(input.conversation_id.clone()),
            text: input.text,
            attachments: input.attachments,
            text_format: input.text_format,
            summary: input.summary,
            mentions: input.mentions,
            ..MessageRequest::default()
        };
        request
            .check()
            .map_err(|error| super::broadcasts::invalid_message("", error))?;
        let (address, conversation) = self
            .sent_message_address(&integration, &input.conversation_id, &input.activity_id)
            .await?;
        let mut activity = request.message(&address, conversation);
        activity["id"] = Value::from(input.activity_id.as_str());
        self.parts
            .connector
            .update(
                self.route_to(&integration, &address, &input.conversation_id),
                &input.activity_id,
                &activity,
            )
            .await
            .map_err(connector_failure)?;
        Ok(json!({"conversationId": input.conversation_id, "activityId": input.activity_id}))
    }

    pub(super) async fn delete_message(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let input: DeleteMessage = model::parse_body(body)?;
        let (address, _) = self
            .sent_message_address(&integration, &input.conversation_id, &input.activity_id)
            .await?;
        self.parts
            .connector
            .delete(
                self.route_to(&integration, &address, &input.conversation_id),
                &input.activity_id,
            )
            .await
            .map_err(connector_failure)?;
        if let Err(error) = self
            .parts
            .vault
            .store
            .delete_record(
                SENT_KIND,
                &sent_id(
                    &integration.record.id,
                    &input.conversation_id,
                    &input.activity_id,
                ),
            )
            .await
        {
            tracing::warn!(%error, "a deleted message stays remembered");
        }
        Ok(json!({"conversationId": input.conversation_id, "activityId": input.activity_id}))
    }

    /// The address of a message this router sent (404 for another).
    async fn sent_message_address(
        &self,
        integration: &Integration,
        conversation: &str,
        activity: &str,
    ) -> Result<(crate::ledger::addresses::Address, Value), ApiError> {
        for (field, value) in [("conversationId", conversation), ("activityId", activity)] {
            if value.trim().is_empty() || value.len() > 512 {
                return Err(Invalid::field(field, format!("{field}: 1 to 512 characters")).into());
            }
        }
        if !self.sent_here(integration, conversation, activity).await? {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "message_unknown",
                "this router did not send that message (activity ids are unique only within their conversation)",
            ));
        }
        let address = self
            .parts
            .addresses
            .find(&integration.record.id, &format!("conv:{conversation}"))
            .await
            .ok_or_else(|| ApiError::not_found("conversation"))?;
        let conversation_value = address
            .conversation
            .as_ref()
            .map_or_else(|| json!({"id": conversation}), CompactJson::value);
        Ok((address, conversation_value))
    }
}
