//! `…/destination/create|list|{id}/fetch|update|delete`: the management side of
//! [`crate::notify::destinations`]. A Workflows URL is checked against the outbound policy and
//! sealed before it reaches the store; it is never shown again.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::model::{self, Invalid, nullable};
use super::paging::{ListQuery, Position};
use super::{Admin, ApiError, ApiResult, new_id, now_micros, sealed_context};
use crate::ledger::events::EventDraft;
use crate::notify::destinations::{Destination, Filter, Reachability, Target};
use crate::notify::workflows::Opener;
use crate::store::now_ms;
use std::sync::Arc;

use super::secrets::Sealer;

const KIND: &str = "destination";
/// Destinations one integration may have (a broadcast to more addresses them inline).
const MAX_PER_INTEGRATION: usize = 100_000;
const MAX_ID: usize = 512;
const KINDS: &[&str] = &["channel", "user", "conversation", "workflow"];

/// The body of `…/destination/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateDestination {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    aad_object_id: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    subscriber_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
}

/// The body of `…/destination/{id}/update`: the fields given change (the type stays); `null`
/// clears `subscriberId`, `name` and `tenantId`; `meta` is merged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateDestination {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    team_id: Option<String>,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    tenant_id: Option<Option<String>>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    aad_object_id: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    subscriber_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    name: Option<Option<String>>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
}

fn required(field: &'static str, value: Option<String>) -> Result<String, Invalid> {
    let value = value
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| Invalid::field(field, format!("{field} is required for this type")))?;
    model::check_text(field, Some(&value), MAX_ID)?;
    Ok(value)
}

fn optional(field: &'static str, value: Option<String>) -> Result<Option<String>, Invalid> {
    let value = value.filter(|v| !v.trim().is_empty());
    model::check_text(field, value.as_deref(), MAX_ID)?;
    Ok(value)
}

/// Fields that belong to another type than the one given.
fn refuse_foreign(kind: &str, given: &[(&'static str, bool)]) -> Result<(), Invalid> {
    let allowed: &[&str] = match kind {
        "channel" => &["teamId", "channelId", "tenantId"],
        "user" => &["userId", "aadObjectId", "tenantId"],
        "conversation" => &["conversationId"],
        _ => &["url"],
    };
    match given
        .iter()
        .find(|(field, present)| *present && !allowed.contains(field))
    {
        Some((field, _)) => Err(Invalid::field(
            field,
            format!("{field} does not apply to a {kind} destination"),
        )),
        None => Ok(()),
    }
}

/// Opens a destination's sealed Workflows URL, for the broadcasts that post to it.
pub fn workflow_opener(sealer: Arc<Sealer>) -> Opener {
    Arc::new(move |id: &str, sealed: &str| sealer.open(&sealed_context(KIND, id), sealed).ok())
}

impl Admin {
    fn owned_destination(
        &self,
        account: &str,
        integration: &str,
        id: &str,
    ) -> Result<Destination, ApiError> {
        let integration = self.owned_integration(account, integration)?;
        self.parts
            .destinations
            .get(id)
            .filter(|d| d.integration_id == integration.record.id)
            .ok_or_else(|| ApiError::not_found(KIND))
    }

    /// A Workflows URL, checked and sealed for destination `id`.
    async fn seal_workflow_url(&self, id: &str, url: &str) -> Result<String, ApiError> {
        model::check_text("url", Some(url), 4096)?;
        let parsed = url::Url::parse(url)
            .map_err(|e| Invalid::field("url", format!("url: not an absolute URL ({e})")))?;
        if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
            return Err(Invalid::field("url", "url: an http(s) URL").into());
        }
        self.parts.egress.admit(url).await.map_err(|refused| {
            ApiError::from(Invalid::field(
                "url",
                format!("url: refused by the outbound policy: {refused}"),
            ))
        })?;
        Ok(self.parts.vault.sealer.seal(&sealed_context(KIND, id), url))
    }

    pub(super) async fn create_destination(
        &self,
        account: &str,
        integration_id: &str,
        body: &[u8],
    ) -> ApiResult {
        let integration = self.owned_integration(account, integration_id)?;
        let input: CreateDestination = model::parse_body(body)?;
        if !KINDS.contains(&input.kind.as_str()) {
            return Err(Invalid::field(
                "type",
                format!(
                    "type: channel, user, conversation or workflow, not {:?}",
                    input.kind
                ),
            )
            .into());
        }
        let id = new_id("dest");
        refuse_foreign(
            &input.kind,
            &[
                ("teamId", input.team_id.is_some()),
                ("channelId", input.channel_id.is_some()),
                ("tenantId", input.tenant_id.is_some()),
                ("userId", input.user_id.is_some()),
                ("aadObjectId", input.aad_object_id.is_some()),
                ("conversationId", input.conversation_id.is_some()),
                ("url", input.url.is_some()),
            ],
        )?;
        let target = match input.kind.as_str() {
            "channel" => Target::Channel {
                team_id: required("teamId", input.team_id)?,
                channel_id: required("channelId", input.channel_id)?,
                tenant_id: optional("tenantId", input.tenant_id)?,
            },
            "user" => {
                let user_id = optional("userId", input.user_id)?;
                let aad_object_id = optional("aadObjectId", input.aad_object_id)?;
                if user_id.is_none() && aad_object_id.is_none() {
                    return Err(Invalid::field(
                        "userId",
                        "a user destination needs userId or aadObjectId",
                    )
                    .into());
                }
                Target::User {
                    user_id,
                    aad_object_id,
                    tenant_id: optional("tenantId", input.tenant_id)?,
                }
            }
            "conversation" => Target::Conversation {
                conversation_id: required("conversationId", input.conversation_id)?,
            },
            _ => {
                let url = required("url", input.url)?;
                Target::Workflow {
                    url_sealed: self.seal_workflow_url(&id, &url).await?,
                }
            }
        };
        let subscriber_id = optional("subscriberId", input.subscriber_id)?;
        model::check_text("name", input.name.as_deref(), 256)?;
        let meta = input
            .meta
            .map(|m| m.into_iter().filter(|(_, v)| !v.is_null()).collect())
            .unwrap_or_default();
        model::check_meta(&meta)?;
        let existing = self
            .parts
            .destinations
            .of_integration(&integration.record.id, &Filter::default())
            .len();
        if existing >= MAX_PER_INTEGRATION {
            return Err(ApiError::new(
                hyper::StatusCode::CONFLICT,
                "too_many_destinations",
                format!("an integration has at most {MAX_PER_INTEGRATION} destinations"),
            ));
        }
        let now = now_ms();
        let destination = Destination {
            id,
            integration_id: integration.record.id.clone(),
            target,
            subscriber_id,
            name: input.name.filter(|n| !n.is_empty()),
            meta,
            status: Reachability::Active,
            status_reason: None,
            created_at: now,
            updated_at: now,
            order: now_micros(),
        };
        let stored = self
            .parts
            .destinations
            .put(destination)
            .await
            .map_err(ApiError::store)?;
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("destination.created").message(format!(
                "{} {}",
                stored.target.kind(),
                stored.id
            )),
        );
        Ok(json!({"id": stored.id}))
    }

    pub(super) fn list_destinations(
        &self,
        account: &str,
        integration_id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        let integration = self.owned_integration(account, integration_id)?;
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let filter = Filter {
            subscriber_id: query.extra("subscriberId").map(str::to_owned),
            kind: query.extra("type").map(str::to_owned),
            meta: query.meta.clone(),
        };
        let items = self
            .parts
            .destinations
            .of_integration(&integration.record.id, &filter)
            .into_iter()
            .map(|d| {
                (
                    Position {
                        order: d.order,
                        id: d.id.clone(),
                    },
                    d,
                )
            })
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(destination_view).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    pub(super) fn fetch_destination(
        &self,
        account: &str,
        integration_id: &str,
        id: &str,
    ) -> ApiResult {
        self.owned_destination(account, integration_id, id)
            .map(|d| destination_view(&d))
    }

    pub(super) async fn update_destination(
        &self,
        account: &str,
        integration_id: &str,
        id: &str,
        body: &[u8],
    ) -> ApiResult {
        let mut destination = self.owned_destination(account, integration_id, id)?;
        let input: UpdateDestination = model::parse_body(body)?;
        let kind = destination.target.kind();
        if let Some(given) = &input.kind
            && given != kind
        {
            return Err(Invalid::field("type", "type: a destination keeps its type").into());
        }
        refuse_foreign(
            kind,
            &[
                ("teamId", input.team_id.is_some()),
                ("channelId", input.channel_id.is_some()),
                ("tenantId", input.tenant_id.is_some()),
                ("userId", input.user_id.is_some()),
                ("aadObjectId", input.aad_object_id.is_some()),
                ("conversationId", input.conversation_id.is_some()),
                ("url", input.url.is_some()),
            ],
        )?;
        match &mut destination.target {
            Target::Channel {
                team_id,
                channel_id,
                tenant_id,
            } => {
                if input.team_id.is_some() {
                    *team_id = required("teamId", input.team_id)?;
                }
                if input.channel_id.is_some() {
                    *channel_id = required("channelId", input.channel_id)?;
                }
                if let Some(given) = input.tenant_id {
                    *tenant_id = optional("tenantId", given)?;
                }
            }
            Target::User {
                user_id,
                aad_object_id,
                tenant_id,
            } => {
                if input.user_id.is_some() {
                    *user_id = optional("userId", input.user_id)?;
                }
                if input.aad_object_id.is_some() {
                    *aad_object_id = optional("aadObjectId", input.aad_object_id)?;
                }
                if let Some(given) = input.tenant_id {
                    *tenant_id = optional("tenantId", given)?;
                }
            }
            Target::Conversation { conversation_id } => {
                if input.conversation_id.is_some() {
                    *conversation_id = required("conversationId", input.conversation_id)?;
                }
            }
            Target::Workflow { url_sealed } => {
                if let Some(url) = input.url {
                    *url_sealed = self
                        .seal_workflow_url(&destination.id, &required("url", Some(url))?)
                        .await?;
                }
            }
        }
        if let Some(subscriber) = input.subscriber_id {
            destination.subscriber_id = optional("subscriberId", subscriber)?;
        }
        if let Some(name) = input.name {
            model::check_text("name", name.as_deref(), 256)?;
            destination.name = name.filter(|n| !n.is_empty());
        }
        if let Some(patch) = input.meta {
            model::merge_meta(&mut destination.meta, patch);
            model::check_meta(&destination.meta)?;
        }
        destination.updated_at = now_ms();
        let stored = self
            .parts
            .destinations
            .put(destination)
            .await
            .map_err(ApiError::store)?;
        Ok(destination_view(&stored))
    }

    pub(super) async fn delete_destination(
        &self,
        account: &str,
        integration_id: &str,
        id: &str,
        body: &[u8],
    ) -> ApiResult {
        let _: model::NoFields = model::parse_body(body)?;
        let destination = self.owned_destination(account, integration_id, id)?;
        self.parts
            .destinations
            .delete(&destination.id)
            .await
            .map_err(ApiError::store)?;
        Ok(json!({"id": destination.id}))
    }
}

/// A destination as the API shows it: a Workflows URL never.
pub(super) fn destination_view(destination: &Destination) -> Value {
    let mut view = json!({
        "id": destination.id,
        "integrationId": destination.integration_id,
        "type": destination.target.kind(),
        "subscriberId": destination.subscriber_id,
        "name": destination.name,
        "meta": destination.meta,
        "status": destination.status.as_str(),
        "statusReason": destination.status_reason,
        "createdAt": model::iso_time(destination.created_at),
        "updatedAt": model::iso_time(destination.updated_at),
    });
    let fields = match &destination.target {
        Target::Channel {
            team_id,
            channel_id,
            tenant_id,
        } => json!({"teamId": team_id, "channelId": channel_id, "tenantId": tenant_id}),
        Target::User {
            user_id,
            aad_object_id,
            tenant_id,
        } => json!({"userId": user_id, "aadObjectId": aad_object_id, "tenantId": tenant_id}),
        Target::Conversation { conversation_id } => json!({"conversationId": conversation_id}),
        Target::Workflow { .. } => json!({}),
    };
    if let (Some(view), Value::Object(fields)) = (view.as_object_mut(), fields) {
        view.extend(fields);
    }
    view
}
