//! The reply actor: one per turn, linked to its conversation actor. It asks the bot's backend for
//! the answer, hands an invoke's answer back to the waiting HTTP request, and sends the message
//! through the connector addressed as the SDKs do (`from`/`recipient` swapped, same
//! `conversation`, `replyToId` = the activity). It stops when the turn is done; its conversation
//! actor starts the next turn only then, which keeps turns of a conversation in order.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, histogram};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::activity::TurnActivity;
use crate::admin::contacts::{ContactBook, Sender};
use crate::admin::events::{EventDraft, EventSink};
use crate::backend::{Answer, Backend, BackendClient, InvokeResponse, TurnInput};
use crate::connector::{Connector, Op, is_loopback_url};
use crate::conversation::ConversationMsg;
use crate::conversation::session::HistoryEntry;
use crate::registry::{Integration, Registry};
use crate::telemetry::{FIRST_REPLY, TURNS_FAILED};

/// What every reply needs, shared by all turns.
pub struct ReplyServices {
    pub registry: Arc<Registry>,
    pub connector: Arc<Connector>,
    /// Sent when the bot is added to a conversation; none when absent.
    pub welcome_message: Option<String>,
    /// Sent instead of an answer when the backend fails.
    pub apology: String,
    /// Each integration's event log.
    pub events: EventSink,
    /// Contact records of integrations with `contactCollection`.
    pub contacts: Option<Arc<ContactBook>>,
    /// What backends share (HTTP client, timeouts).
    pub backends: BackendClient,
}

pub struct ReplyArgs {
    pub services: Arc<ReplyServices>,
    pub integration: Arc<Integration>,
    pub activity: TurnActivity,
    /// When the router acknowledged the activity (for `first_reply_seconds`).
    pub accepted_at: Instant,
    /// The HTTP request of an invoke, waiting for the InvokeResponse.
    pub invoke: Option<oneshot::Sender<InvokeResponse>>,
    /// A fixed answer decided by the conversation (session commands) instead of the backend's.
    pub say: Option<String>,
    /// The session this turn belongs to, and its history up to this activity.
    pub session_id: String,
    pub history: Vec<HistoryEntry>,
    /// Told when the turn is finished, with what was sent.
    pub conversation: ActorRef<ConversationMsg>,
}

/// A message the Bot Connector accepted.
#[derive(Debug, Clone)]
pub struct SentReply {
    pub text: String,
    /// The id the Connector gave it (none when it answered 202 without a body).
    pub id: Option<String>,
}

pub struct ReplyActor;

impl Actor for ReplyActor {
    type Msg = ();
    type State = Option<ReplyArgs>;
    type Arguments = ReplyArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ReplyArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(args) = state.take() {
            let conversation = args.conversation.clone();
            let reply = run_turn(args).await;
            let _ = conversation.cast(ConversationMsg::TurnFinished {
                reply_actor: myself.get_id(),
                reply,
            });
        }
        myself.stop(None);
        Ok(())
    }
}

async fn run_turn(mut args: ReplyArgs) -> Option<SentReply> {
    observe(&args);
    if !args.integration.record.attachments {
        args.activity.attachments.clear();
    }
    let text = if let Some(fixed) = args.say.take() {
        Some(fixed)
    } else {
        // Every activity reaches the backend (a webhook gets lifecycle events, typed; echo and
        // models answer only what users say); it is answered only when the backend says something.
        let answer = answer(&args).await;
        if let (Some(waiting), Some(response)) = (args.invoke.take(), answer.invoke) {
            // The request may have timed out already; then nobody listens.
            let _ = waiting.send(response);
        }
        match answer.text {
            Some(text) => Some(text),
            None if args.activity.bot_was_added() => args.services.welcome_message.clone(),
            None => {
                tracing::debug!(integration = %args.integration.id, kind = %args.activity.kind, "nothing to answer");
                None
            }
        }
    };
    let op = if args.activity.kind == "conversationUpdate" {
        Op::Send
    } else {
        Op::Reply
    };
    send_message(&args, op, text?).await
}

/// What the integration's event log and contact book learn from the activity.
fn observe(args: &ReplyArgs) {
    let integration = &args.integration;
    let activity = &args.activity;
    let services = &args.services;
    match activity.kind.as_str() {
        "message" | "invoke" | "messageReaction" if integration.record.contact_collection => {
            if let (Some(contacts), Some(user)) = (&services.contacts, activity.from_field("id")) {
                contacts.touch(
                    &integration.owner.account,
                    &integration.record.id,
                    &Sender {
                        teams_user_id: user,
                        aad_object_id: activity.from_field("aadObjectId"),
                        name: activity.from_field("name"),
                        tenant_id: activity.tenant_id(),
                    },
                );
            }
        }
        "conversationUpdate" => services.events.record(
            &integration.id,
            EventDraft::new("conversationUpdate")
                .activity(&activity.kind, &activity.id)
                .message(format!(
                    "members added: {}, removed: {}{}",
                    activity.members_added.len(),
                    activity.members_removed.len(),
                    if activity.bot_was_added() {
                        " (the bot was added)"
                    } else {
                        ""
                    }
                )),
        ),
        "installationUpdate" => services.events.record(
            &integration.id,
            EventDraft::new("installationUpdate")
                .activity(&activity.kind, &activity.id)
                .reason(activity.action.clone().unwrap_or_else(|| "unknown".into())),
        ),
        _ => {}
    }
}

async fn answer(args: &ReplyArgs) -> Answer {
    let integration = &args.integration;
    let backend = args
        .services
        .registry
        .bot(&integration.record.bot_id)
        .ok_or_else(|| format!("bot {:?} does not exist", integration.record.bot_id))
        .and_then(|bot| Backend::from_spec(bot.backend()).map_err(|e| e.to_string()));
    let input = TurnInput {
        integration_id: &integration.record.id,
        bot_id: &integration.record.bot_id,
        session_id: &args.session_id,
        history: &args.history,
        activity: &args.activity,
    };
    let result = match backend {
        Ok(backend) => backend
            .answer(&args.services.backends, &input)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match result {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(integration = %integration.id, %error, "backend failed; sending the apology");
            args.services.events.record(
                &integration.id,
                EventDraft::new("backend.error")
                    .activity(&args.activity.kind, &args.activity.id)
                    .message(error.clone()),
            );
            counter!(TURNS_FAILED).increment(1);
            // Users hear an apology for what they said; a failed lifecycle event stays silent.
            let kind = args.activity.kind.as_str();
            Answer {
                text: matches!(kind, "message" | "invoke").then(|| args.services.apology.clone()),
                invoke: (kind == "invoke")
                    .then(|| InvokeResponse::error("BackendFailed", "the bot could not answer")),
            }
        }
    }
}

async fn send_message(args: &ReplyArgs, op: Op, text: String) -> Option<SentReply> {
    let activity = &args.activity;
    let integration = &args.integration;
    if integration.is_development() && !is_loopback_url(&activity.service_url) {
        tracing::warn!(
            integration = %integration.id,
            "development-mode integration: replies go only to loopback service URLs; reply dropped"
        );
        return None;
    }
    let outbound = outbound_message(activity, text.clone());
    let reply_to = (op == Op::Reply).then_some(activity.id.as_str());
    let result = args
        .services
        .connector
        .post_activity(
            op,
            integration.credentials.as_deref(),
            &activity.service_url,
            activity.conversation_id(),
            reply_to,
            &outbound,
        )
        .await;
    match result {
        Ok(id) => {
            histogram!(FIRST_REPLY).record(args.accepted_at.elapsed().as_secs_f64());
            tracing::debug!(integration = %integration.id, id = id.as_deref().unwrap_or(""), "reply sent");
            Some(SentReply { text, id })
        }
        Err(error) => {
            counter!(TURNS_FAILED).increment(1);
            tracing::warn!(integration = %integration.id, %error, "reply not delivered");
            args.services.events.record(
                &integration.id,
                EventDraft::new("connector.error")
                    .activity(&activity.kind, &activity.id)
                    .message(error.to_string()),
            );
            None
        }
    }
}

/// A message addressed back into the activity's conversation.
fn outbound_message(activity: &TurnActivity, text: String) -> Value {
    let mut message = Map::new();
    message.insert("type".into(), json!("message"));
    message.insert("text".into(), json!(text));
    message.insert("textFormat".into(), json!("plain"));
    message.insert("channelId".into(), json!(activity.channel_id));
    message.insert("serviceUrl".into(), json!(activity.service_url));
    message.insert("conversation".into(), activity.conversation.clone());
    if let Some(bot) = &activity.recipient {
        message.insert("from".into(), bot.clone());
    }
    if let Some(user) = &activity.from {
        message.insert("recipient".into(), user.clone());
    }
    if activity.kind != "conversationUpdate" {
        message.insert("replyToId".into(), json!(activity.id));
    }
    if let Some(locale) = &activity.locale {
        message.insert("locale".into(), json!(locale));
    }
    Value::Object(message)
}
