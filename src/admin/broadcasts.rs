//! `…/broadcast/…`: the management side of [`crate::notify::broadcasts`]: jobs created with
//! their recipients (destinations, subscribers, inline users, channels and conversations, or
//! every destination of a type or `meta`), started, watched, paused, resumed, cancelled, and
//! their failed recipients retried.

use std::collections::HashSet;
use std::sync::Arc;

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::model::{self, Invalid};
use super::paging::{ListQuery, Position};
use super::{Admin, ApiError, ApiResult, new_id, now_micros};
use crate::ledger::events::EventDraft;
use crate::notify::broadcasts::{
    Edit, Held, Job, JobStatus, Message, Recipient, RecipientStatus, To,
};
use crate::notify::destinations::{Destination, Filter, Reachability, Target};
use crate::registry::Integration;
use crate::store::now_ms;

/// Recipients one call may add (larger lists are appended in pages).
const MAX_PER_CALL: usize = 10_000;

/// An inline user: a Teams user id or Entra object id, with the tenant when the router has
/// not seen the user.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InlineUser {
    Id(String),
    #[serde(rename_all = "camelCase")]
    With {
        #[serde(default)]
        user_id: Option<String>,
        #[serde(default)]
        aad_object_id: Option<String>,
        #[serde(default)]
        tenant_id: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InlineChannel {
    Id(String),
    #[serde(rename_all = "camelCase")]
    With {
        channel_id: String,
        #[serde(default)]
        tenant_id: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AllDestinations {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Recipients {
    #[serde(default)]
    destination_ids: Vec<String>,
    #[serde(default)]
    subscriber_ids: Vec<String>,
    #[serde(default)]
    users: Vec<InlineUser>,
    #[serde(default)]
    channels: Vec<InlineChannel>,
    #[serde(default)]
    conversation_ids: Vec<String>,
    #[serde(default)]
    all_destinations: Option<AllDestinations>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateBroadcast {
    message: Message,
    #[serde(default)]
    recipients: Recipients,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    start: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AppendRecipients {
    recipients: Recipients,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UpdateBroadcast {
    message: Message,
}

fn id_field(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.trim().is_empty() || value.len() > 512 {
        return Err(Invalid::field(
            field,
            format!("{field}: 1 to 512 characters"),
        ));
    }
    Ok(())
}

/// A destination as a recipient (failed at once when Teams said the bot is not there).
fn from_destination(destination: &Destination) -> Recipient {
    let to = match &destination.target {
        Target::Channel {
            channel_id,
            tenant_id,
            ..
        } => To::Channel {
            channel_id: channel_id.clone(),
            tenant_id: tenant_id.clone(),
        },
        Target::User {
            user_id,
            aad_object_id,
            tenant_id,
        } => To::User {
            user_id: user_id
                .clone()
                .or_else(|| aad_object_id.clone())
                .unwrap_or_default(),
            tenant_id: tenant_id.clone(),
        },
        Target::Conversation { conversation_id } => To::Conversation {
            conversation_id: conversation_id.clone(),
        },
        Target::Workflow { .. } => To::Workflow {
            destination_id: destination.id.clone(),
        },
    };
    let mut recipient = Recipient::new(0, to);
    recipient.destination_id = Some(destination.id.clone());
    recipient.subscriber_id = destination.subscriber_id.clone();
    if destination.status == Reachability::NotInstalled {
        recipient.status = RecipientStatus::Failed;
        recipient.reason = Some("not_installed".into());
    }
    recipient
}

impl Admin {
    /// The recipients a request names, each once (the job numbers them).
    fn resolve_recipients(
        &self,
        integration: &Integration,
        recipients: Recipients,
    ) -> Result<Vec<Recipient>, ApiError> {
        let mut found: Vec<Recipient> = Vec::new();
        let destinations = &self.parts.destinations;
        let integration_id = &integration.record.id;
        let push_destination = |destination: &Destination, found: &mut Vec<Recipient>| {
            found.push(from_destination(destination));
        };
        for id in &recipients.destination_ids {
            let destination = destinations
                .get(id)
                .filter(|d| d.integration_id == *integration_id)
                .ok_or_else(|| {
                    ApiError::from(Invalid::field(
                        "recipients",
                        format!("destination {id:?} is not one of this integration's"),
                    ))
                })?;
            push_destination(&destination, &mut found);
        }
        for subscriber in &recipients.subscriber_ids {
            id_field("subscriberIds", subscriber)?;
            let filter = Filter {
                subscriber_id: Some(subscriber.clone()),
                ..Filter::default()
            };
            for destination in destinations.of_integration(integration_id, &filter) {
                push_destination(&destination, &mut found);
            }
        }
        if let Some(all) = recipients.all_destinations {
            let filter = Filter {
                subscriber_id: None,
                kind: all.kind,
                meta: all
                    .meta
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect(),
            };
            for destination in destinations.of_integration(integration_id, &filter) {
                push_destination(&destination, &mut found);
            }
        }
        for user in recipients.users {
            let (user_id, tenant_id) = match user {
                InlineUser::Id(id) => (id, None),
                InlineUser::With {
                    user_id,
                    aad_object_id,
                    tenant_id,
                } => (
                    user_id.or(aad_object_id).unwrap_or_default(),
                    tenant_id.filter(|t| !t.is_empty()),
                ),
            };
            id_field("users", &user_id)?;
            found.push(Recipient::new(0, To::User { user_id, tenant_id }));
        }
        for channel in recipients.channels {
            let (channel_id, tenant_id) = match channel {
                InlineChannel::Id(id) => (id, None),
                InlineChannel::With {
                    channel_id,
                    tenant_id,
                } => (channel_id, tenant_id.filter(|t| !t.is_empty())),
            };
            id_field("channels", &channel_id)?;
            found.push(Recipient::new(
                0,
                To::Channel {
                    channel_id,
                    tenant_id,
                },
            ));
        }
        for conversation_id in recipients.conversation_ids {
            id_field("conversationIds", &conversation_id)?;
            found.push(Recipient::new(0, To::Conversation { conversation_id }));
        }
        let mut seen = HashSet::new();
        let mut unique: Vec<Recipient> = Vec::with_capacity(found.len());
        for mut recipient in found {
            // A user's tenant defaults to a single-tenant integration's own.
            if let To::User { tenant_id, .. } = &mut recipient.to
                && tenant_id.is_none()
            {
                tenant_id.clone_from(&integration.record.tenant_id);
            }
            if seen.insert(recipient.to.clone()) {
                unique.push(recipient);
            }
        }
        if unique.len() > MAX_PER_CALL {
            return Err(Invalid::field(
                "recipients",
                format!(
                    "recipients: at most {MAX_PER_CALL} per call; append more with …/broadcast/{{jobId}}/recipients"
                ),
            )
            .into());
        }
        Ok(unique)
    }

    fn owned_broadcast(
        &self,
        account: &str,
        integration: &str,
        job: &str,
    ) -> Result<(Arc<Integration>, Arc<Held>), ApiError> {
        let integration = self.owned_integration(account, integration)?;
        let held = self
            .parts
            .broadcasts
            .get(job)
            .filter(|h| h.job().integration_id == integration.record.id)
            .ok_or_else(|| ApiError::not_found("broadcast"))?;
        Ok((integration, held))
    }

    pub(super) async fn create_broadcast(
        &self,
        account: &str,
        integration_id: &str,
        body: &[u8],
    ) -> ApiResult {
        let integration = self.owned_integration(account, integration_id)?;
        let input: CreateBroadcast = model::parse_body(body)?;
        input
            .message
            .check()
            .map_err(|error| invalid_message("message.", error))?;
        if let Some(key) = &input.idempotency_key {
            id_field("idempotencyKey", key)?;
            let _guard = self.broadcast_lock.lock().await;
            if let Some(held) = self
                .parts
                .broadcasts
                .by_idempotency_key(&integration.record.id, key)
            {
                return Ok(broadcast_view(&held));
            }
            return self.create_broadcast_now(&integration, input).await;
        }
        self.create_broadcast_now(&integration, input).await
    }

    async fn create_broadcast_now(
        &self,
        integration: &Arc<Integration>,
        input: CreateBroadcast,
    ) -> ApiResult {
        let recipients = self.resolve_recipients(integration, input.recipients)?;
        let job = Job {
            id: new_id("bc"),
            integration_id: integration.record.id.clone(),
            idempotency_key: input.idempotency_key,
            message: input.message,
            status: JobStatus::Pending,
            error: None,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            order: now_micros(),
            resumed_in_flight: 0,
            total: 0,
            lanes: Default::default(),
        };
        let held = self
            .parts
            .broadcasts
            .create(job, recipients)
            .await
            .map_err(ApiError::store)?;
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("broadcast.created").message(format!(
                "{} with {} recipient(s)",
                held.job().id,
                held.job().total
            )),
        );
        if input.start.unwrap_or(true) {
            self.change_broadcast(&held, JobStatus::Running).await?;
        }
        Ok(broadcast_view(&held))
    }

    /// The job's event log entry is written by `set_status`, for the runner's changes too.
    async fn change_broadcast(&self, held: &Arc<Held>, status: JobStatus) -> Result<(), ApiError> {
        self.parts
            .broadcasts
            .set_status(held, status)
            .await
            .map_err(ApiError::store)?;
        Ok(())
    }

    pub(super) async fn append_broadcast_recipients(
        &self,
        account: &str,
        integration_id: &str,
        job: &str,
        body: &[u8],
    ) -> ApiResult {
        let (integration, held) = self.owned_broadcast(account, integration_id, job)?;
        let input: AppendRecipients = model::parse_body(body)?;
        let _guard = self.broadcast_lock.lock().await;
        if held.job().status != JobStatus::Pending {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "broadcast_started",
                "recipients are added before the broadcast starts",
            ));
        }
        let targets = self.resolve_recipients(&integration, input.recipients)?;
        let (count, total) = self
            .parts
            .broadcasts
            .append(&held, targets)
            .await
            .map_err(ApiError::store)?;
        Ok(json!({"id": held.job().id, "added": count, "recipients": total}))
    }

    /// `start`, `pause`, `resume`, `cancel`, `retry`.
    pub(super) async fn control_broadcast(
        &self,
        account: &str,
        integration_id: &str,
        job: &str,
        action: &str,
        body: &[u8],
    ) -> ApiResult {
        let _: model::NoFields = model::parse_body(body)?;
        let (_, held) = self.owned_broadcast(account, integration_id, job)?;
        let _guard = self.broadcast_lock.lock().await;
        let current = held.job().status;
        let conflict = |why: &str| {
            ApiError::new(
                StatusCode::CONFLICT,
                "invalid_state",
                format!("the broadcast is {}: {why}", current.as_str()),
            )
        };
        let next = match (action, current) {
            ("start", JobStatus::Pending) => JobStatus::Running,
            ("start", _) => return Err(conflict("it has started")),
            ("pause", JobStatus::Running | JobStatus::Pending) => JobStatus::Paused,
            ("pause", _) => return Err(conflict("only a running or pending one pauses")),
            ("resume", JobStatus::Paused) => JobStatus::Running,
            ("resume", _) => return Err(conflict("only a paused one resumes")),
            ("cancel", JobStatus::Done | JobStatus::Cancelled) => {
                return Err(conflict("it is over"));
            }
            ("cancel", _) => JobStatus::Cancelled,
            ("retry", JobStatus::Running) => {
                return Err(conflict("retry once it is done, paused or cancelled"));
            }
            ("retry", _) => {
                let again = self
                    .parts
                    .broadcasts
                    .retry_failed(&held)
                    .await
                    .map_err(ApiError::store)?;
                if again == 0 {
                    return Ok(broadcast_view(&held));
                }
                JobStatus::Running
            }
            _ => return Err(ApiError::not_found("route")),
        };
        self.change_broadcast(&held, next).await?;
        Ok(broadcast_view(&held))
    }

    /// `update` (every delivered copy replaced with a new message) and `recall` (every
    /// delivered copy deleted), paced like the sends.
    pub(super) async fn edit_broadcast(
        &self,
        account: &str,
        integration_id: &str,
        job: &str,
        verb: &str,
        body: &[u8],
    ) -> ApiResult {
        let (integration, held) = self.owned_broadcast(account, integration_id, job)?;
        let (edit, message) = if verb == "update" {
            let input: UpdateBroadcast = model::parse_body(body)?;
            input
                .message
                .check()
                .map_err(|error| invalid_message("message.", error))?;
            (Edit::Update, Some(input.message))
        } else {
            let _: model::NoFields = model::parse_body(body)?;
            (Edit::Recall, None)
        };
        let _guard = self.broadcast_lock.lock().await;
        let status = held.job().status;
        if matches!(status, JobStatus::Running | JobStatus::Pending) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_state",
                format!(
                    "the broadcast is {}: pause it (or let it finish) before changing what it delivered",
                    status.as_str()
                ),
            ));
        }
        let copies = self
            .parts
            .broadcasts
            .edit_delivered(&held, edit, message)
            .await
            .map_err(ApiError::store)?;
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("broadcast.edit").message(format!(
                "{} {verb} of {copies} delivered copies",
                held.job().id
            )),
        );
        if copies > 0 {
            self.change_broadcast(&held, JobStatus::Running).await?;
        }
        Ok(broadcast_view(&held))
    }

    pub(super) fn fetch_broadcast(
        &self,
        account: &str,
        integration_id: &str,
        job: &str,
    ) -> ApiResult {
        let (_, held) = self.owned_broadcast(account, integration_id, job)?;
        Ok(broadcast_view(&held))
    }

    pub(super) fn list_broadcasts(
        &self,
        account: &str,
        integration_id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        let integration = self.owned_integration(account, integration_id)?;
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let items = self
            .parts
            .broadcasts
            .of_integration(&integration.record.id)
            .into_iter()
            .map(|held| {
                let job = held.job();
                (
                    Position {
                        order: job.order,
                        id: job.id,
                    },
                    held,
                )
            })
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(|h| broadcast_view(h)).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    pub(super) async fn list_broadcast_recipients(
        &self,
        account: &str,
        integration_id: &str,
        job: &str,
        query: Option<&str>,
    ) -> ApiResult {
        let (_, held) = self.owned_broadcast(account, integration_id, job)?;
        let order_asked = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .any(|(key, _)| key == "order");
        let mut query = ListQuery::parse(query, self.settings.list_max_take)?;
        // Recipients are listed in their order unless asked otherwise (on every page).
        if !order_asked {
            query.order = super::paging::Order::Asc;
        }
        let status = query.extra("status").map(str::to_owned);
        if let Some(status) = &status
            && !matches!(status.as_str(), "pending" | "sent" | "failed")
        {
            return Err(Invalid::field("status", "status: pending, sent or failed").into());
        }
        let reason = query.extra("reason").map(str::to_owned);
        let after = query
            .cursor
            .as_ref()
            .map(|position| u32::try_from(position.order).unwrap_or(u32::MAX));
        let (page, more) = self
            .parts
            .broadcasts
            .page_recipients(
                &held,
                after,
                query.order == super::paging::Order::Asc,
                query.take,
                |r| {
                    status.as_deref().is_none_or(|s| r.status.as_str() == s)
                        && reason
                            .as_deref()
                            .is_none_or(|w| r.reason.as_deref() == Some(w))
                },
            )
            .await
            .map_err(ApiError::store)?;
        let cursor = more.then(|| page.last()).flatten().map(|last| {
            super::paging::encode_cursor(&Position {
                order: u64::from(last.index),
                id: String::new(),
            })
        });
        Ok(json!({
            "items": page.iter().map(recipient_view).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }
}

/// A message that is not one Teams takes, as a 400 naming the field (after `prefix`).
pub(super) fn invalid_message(
    prefix: &str,
    error: crate::notify::proactive::ProactiveError,
) -> ApiError {
    match error {
        crate::notify::proactive::ProactiveError::Invalid { field, message } => {
            ApiError::from(Invalid::field(field, format!("{prefix}{field}: {message}")))
        }
        other => ApiError::from(Invalid::field("message", other.to_string())),
    }
}

fn recipient_view(recipient: &Recipient) -> Value {
    let mut view = json!({
        "index": recipient.index,
        "to": recipient.to,
        "destinationId": recipient.destination_id,
        "subscriberId": recipient.subscriber_id,
        "status": recipient.status.as_str(),
        "reason": recipient.reason,
        "conversationId": recipient.conversation_id,
        "activityId": recipient.activity_id,
        "attempts": recipient.attempts,
        "edit": recipient.edit,
        "recalled": recipient.recalled,
        "editError": recipient.edit_error,
        "updatedAt": model::iso_time(recipient.updated_at),
    });
    if let Some(fields) = view.as_object_mut() {
        fields.retain(|_, value| !value.is_null());
    }
    view
}

/// A job as the API shows it: its state, counts by status and reason, rate and ETA.
fn broadcast_view(held: &Held) -> Value {
    let job = held.job();
    let tally = held.tally();
    let pending = tally.pending;
    let rate = held.rate();
    let eta = (job.status == JobStatus::Running && rate > 0.0 && pending > 0)
        .then(|| model::iso_time(now_ms() + (pending as f64 / rate * 1000.0) as u64));
    json!({
        "id": job.id,
        "integrationId": job.integration_id,
        "idempotencyKey": job.idempotency_key,
        "status": job.status.as_str(),
        "error": job.error,
        "message": job.message,
        "recipients": job.total,
        "counts": {
            "pending": pending,
            "sent": tally.sent,
            "failed": tally.failed,
        },
        "failures": tally.reasons,
        "resumedInFlight": job.resumed_in_flight,
        "rate": (rate * 100.0).round() / 100.0,
        "eta": eta,
        "createdAt": model::iso_time(job.created_at),
        "startedAt": job.started_at.map(model::iso_time),
        "finishedAt": job.finished_at.map(model::iso_time),
    })
}
