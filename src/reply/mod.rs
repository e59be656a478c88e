//! Running one turn: asking the bot's backend for the answer, handing an invoke's answer back to
//! the waiting HTTP request, and sending the message through the connector addressed as the SDKs
//! do (`from`/`recipient` swapped, same `conversation`, `replyToId` = the activity). A plain turn
//! is awaited by its conversation actor ([`turn_work`]; an invoke beside the turn order runs on a
//! task of its own, [`spawn_turn`]); a streamed one runs in a reply actor linked to it
//! ([`ReplyActor`]), whose lifetime is the stream's (paced updates, cancellation, Teams'
//! two-minute limit). The conversation actor starts the next turn only once one has finished:
//! turns of a conversation stay in order.

use crate::clock::Instant;
use std::sync::Arc;

use metrics::{counter, histogram};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Value, json};

use crate::activity::{TurnActivity, Verbatim};
use crate::backend::{
    Answer, Backend, BackendClient, Deltas, HistoryEntry, InvokeReply, TurnInput,
};
use crate::connector::{Connector, ConnectorError, Delivery, Route, is_loopback_url};
use crate::ledger::addresses::AddressBook;
use crate::ledger::contacts::{ContactBook, Sender};
use crate::ledger::events::{EventDraft, EventSink};
use crate::registry::{Integration, Registry};
use crate::telemetry::{FIRST_REPLY, TURNS_FAILED};
use streaming::{Ending, Stream, StreamSettings};

pub mod exchanges;
pub mod split;
pub mod streaming;

/// What every reply needs, shared by all turns.
pub struct ReplyServices {
    pub registry: Arc<Registry>,
    pub connector: Arc<Connector>,
    /// Sent when the bot is added to a conversation; none when absent.
    pub welcome_message: Option<String>,
    /// Sent instead of an answer when the backend fails.
    pub apology: String,
    /// How answers are streamed into personal chats.
    pub streaming: StreamSettings,
    /// Each integration's event log.
    pub events: EventSink,
    /// Contact records of integrations with `contactCollection`.
    pub contacts: Option<Arc<ContactBook>>,
    /// Where proactive messages can go, learned from every activity.
    pub addresses: Option<Arc<AddressBook>>,
    /// What backends share (HTTP client, timeouts).
    pub backends: BackendClient,
    /// SSO token exchanges in flight and done (duplicates from other clients are not re-run).
    pub exchanges: exchanges::TokenExchanges,
}

pub struct ReplyArgs {
    pub services: Arc<ReplyServices>,
    pub integration: Arc<Integration>,
    pub activity: TurnActivity,
    /// The activity's text without the mentions of the bot (stripped once, by the conversation).
    pub text: String,
    /// When the router acknowledged the activity (for `first_reply_seconds`).
    pub accepted_at: Instant,
    /// The HTTP request of an invoke, waiting for the InvokeResponse.
    pub invoke: Option<InvokeReply>,
    /// A fixed answer decided by the conversation (session commands) instead of the backend's.
    pub say: Option<String>,
    /// The session this turn belongs to, and its history up to this activity (both empty for a
    /// backend that reads neither: echo).
    pub session_id: String,
    pub history: Vec<HistoryEntry>,
    /// The address book learns from this activity (the conversation's first, or one from a
    /// new serviceUrl).
    pub learn_addresses: bool,
}

/// Told when a turn is finished: what was sent, and false when the turn panicked.
pub type TurnDone = Box<dyn FnOnce(Option<SentReply>, bool) + Send>;

/// A message the Bot Connector accepted.
#[derive(Debug, Clone)]
pub struct SentReply {
    pub text: String,
    /// The id the Connector gave it (none when it answered 202 without a body).
    pub id: Option<String>,
}

/// Runs a streamed turn; stops when it is done.
pub struct ReplyActor;

impl Actor for ReplyActor {
    type Msg = ();
    type State = Option<(ReplyArgs, TurnDone)>;
    type Arguments = (ReplyArgs, TurnDone);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: (ReplyArgs, TurnDone),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A panic here fails the actor: its supervisor (the conversation) ends the turn.
        if let Some((args, done)) = state.take() {
            done(run_turn(args).await, true);
        }
        myself.stop(None);
        Ok(())
    }
}

/// Whether this turn streams its answer (and so runs in a [`ReplyActor`]).
pub fn streams(args: &ReplyArgs) -> bool {
    deliverable(args)
        && args.integration.record.stream
        && args.activity.kind() == "message"
        && args.activity.is_personal()
}

/// A plain turn's work, for the conversation actor to await: what was sent, and false when the
/// turn panicked (caught: the conversation goes on).
pub type TurnWork =
    std::pin::Pin<Box<dyn std::future::Future<Output = (Option<SentReply>, bool)> + Send>>;

/// A plain turn, ready to be awaited where the conversation's state is: no actor to spawn, link
/// and stop, no task and no message back per turn. A panic in it is caught and reported as a
/// failed turn.
pub fn turn_work(args: ReplyArgs) -> TurnWork {
    // Boxed where it is made: a turn's state machine is kilobytes, and a future moved by value
    // (through its wrappers) is copied whole at each move (perf: the copies were a fifth of the
    // router's `memcpy` time).
    let turn: std::pin::Pin<Box<dyn std::future::Future<Output = Option<SentReply>> + Send>> =
        Box::pin(run_turn(args));
    Box::pin(catching(turn, |outcome| match outcome {
        Ok(reply) => (reply, true),
        Err(panic) => {
            tracing::error!(panic = %panic_message(panic.as_ref()), "turn failed");
            (None, false)
        }
    }))
}

/// Runs a plain turn on a task of its own (an invoke beside the turn order), and tells `done`.
pub fn spawn_turn(args: ReplyArgs, done: TurnDone) {
    let work = turn_work(args);
    tokio::spawn(async move {
        let (reply, ok) = work.await;
        done(reply, ok);
    });
}

/// Runs `work`, then hands `done` its output, or the payload of its panic. Not an `async fn`:
/// one would hold `work` twice (its argument and the wrapper awaiting it).
fn catching<T, U>(
    work: impl std::future::Future<Output = T>,
    done: impl FnOnce(Result<T, Box<dyn std::any::Any + Send>>) -> U,
) -> impl std::future::Future<Output = U> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(work).catch_unwind().map(done)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

async fn run_turn(mut args: ReplyArgs) -> Option<SentReply> {
    observe(&args);
    if !args.integration.record.attachments {
        args.activity.hide_attachments();
    }
    if let Some(fixed) = args.say.take() {
        let message = outbound_message(&args.activity, &fixed, Vec::new());
        return send_message(&args, message, fixed).await;
    }
    let invoke = args.invoke.take();
    let exchange = exchanges::ExchangeRequest::of(&args.activity);
    let exchanging = match &exchange {
        Some(request) => match args
            .services
            .exchanges
            .claim(&args.integration.id, &request.id)
            .await
        {
            exchanges::Claim::AlreadyExchanged => {
                // Another client's invoke of this sign-in was exchanged: 200, empty, no bot.
                if let Some(waiting) = invoke {
                    waiting.send(exchanges::already_exchanged());
                }
                return None;
            }
            exchanges::Claim::Exchange(exchanging) => Some(exchanging),
        },
        None => None,
    };
    // A development-mode integration speaks only to loopback: no stream, no typing elsewhere.
    let deliverable = deliverable(&args);
    let streamed = streams(&args);
    // Every activity reaches the backend (a webhook gets lifecycle events, typed; echo and
    // models answer only what users say); it is answered only when the backend says something.
    let (deltas, text) = Deltas::channel();
    let answering = async {
        let answer = answer(&args, &deltas).await;
        // The streamed text is complete: the stream's follower moves on to the final message.
        drop(deltas);
        answer
    };
    let route = route(&args);
    // A stream's updates are this message with their text; a plain turn builds none.
    let base = if streamed {
        outbound_message(&args.activity, "", Vec::new())
    } else {
        Value::Null
    };
    let (mut answer, stream) = if streamed {
        let mut stream = Stream::new(
            &args.services.connector,
            route,
            &base,
            &args.services.streaming,
        );
        let (answer, ()) = tokio::join!(answering, stream.follow(text));
        (answer, Some(stream))
    } else {
        // Like the SDKs' typing middleware: a user waiting for an answer sees the bot typing
        // (Teams shows it for a few seconds), a quick answer comes without one.
        let typing = async {
            if args.activity.kind() != "message" || !deliverable {
                return std::future::pending().await;
            }
            let settings = &args.services.streaming;
            tokio::time::sleep(settings.typing_delay).await;
            let mut typing = outbound_message(&args.activity, "", Vec::new());
            typing["type"] = json!("typing");
            if let Some(fields) = typing.as_object_mut() {
                fields.remove("text");
                fields.remove("textFormat");
            }
            loop {
                args.services.connector.send_typing(route, &typing).await;
                tokio::time::sleep(TYPING_REPEAT).await;
            }
        };
        let answer = tokio::select! {
            biased;
            answer = answering => answer,
            never = typing => never,
        };
        (answer, None)
    };
    if let Some(request) = &exchange {
        let succeeded = answer
            .invoke
            .as_ref()
            .is_some_and(|r| (200..300).contains(&r.status));
        if answer.invoke.is_none() {
            answer.invoke = Some(request.failed("the bot did not exchange the token"));
        }
        if let Some(exchanging) = exchanging {
            exchanging.finish(succeeded);
        }
    }
    if let (Some(waiting), Some(response)) = (invoke, answer.invoke.take()) {
        // The request may have timed out already; a redelivery of the invoke still gets it.
        waiting.send(response);
    }
    if answer.text.is_none() && answer.attachments.is_empty() && args.activity.bot_was_added() {
        answer.text = args.services.welcome_message.clone();
    }
    let text = answer.text.take();
    let attachments = std::mem::take(&mut answer.attachments);
    let sent = match (text, attachments.is_empty()) {
        (None, true) => {
            if let Some(stream) = stream {
                // A stream was started for an answer that says nothing: it must still end.
                let message = outbound_message(&args.activity, NOTHING_TO_SAY, Vec::new());
                finish_stream(&args, stream, message, NOTHING_TO_SAY.into()).await
            } else {
                tracing::debug!(integration = %args.integration.id, kind = %args.activity.kind(), "nothing to answer");
                None
            }
        }
        (Some(text), true) if stream.is_none() => send_text(&args, text).await,
        (text, _) => {
            let text = text.unwrap_or_default();
            let mut message = outbound_message(&args.activity, &text, attachments);
            message["textFormat"] = json!(text_format(&args).as_str());
            match stream {
                Some(stream) => finish_stream(&args, stream, message, text).await,
                None => send_message(&args, message, text).await,
            }
        }
    };
    follow_up(&args, answer).await;
    sent
}

/// Teams shows a typing indicator for about three seconds.
const TYPING_REPEAT: std::time::Duration = std::time::Duration::from_secs(3);

/// What a final message says when the backend streamed nothing (Teams refuses an empty one).
const NOTHING_TO_SAY: &str = "…";

/// Where this turn's activities go.
fn route(args: &ReplyArgs) -> Route<'_> {
    Route {
        credentials: args.integration.credentials.as_deref(),
        tenant: args.activity.tenant_id(),
        service_url: args.activity.service_url(),
        conversation_id: args.activity.conversation_id(),
        budget_percent: 100,
    }
}

async fn finish_stream(
    args: &ReplyArgs,
    stream: Stream<'_>,
    message: Value,
    text: String,
) -> Option<SentReply> {
    // A stream ends with what fits in one message; the rest follows in new messages.
    let size = split::message_size(&message);
    let (final_message, rest) = if size > args.services.streaming.max_message_bytes {
        // The final message also carries the stream's entity and channel data.
        let budget = text_budget(args, &message).saturating_sub(streaming::STREAM_ENTITY_BYTES);
        let parts = split::split(&text, budget);
        let first = parts.first().cloned().unwrap_or_default();
        let rest = text[first.len()..].to_owned();
        record_split(args, size, parts.len());
        (with_text(&message, &first), Some(rest))
    } else {
        (message.clone(), None)
    };
    match stream.finish(final_message).await {
        Ending::Completed { id } => {
            histogram!(FIRST_REPLY).record(args.accepted_at.elapsed().as_secs_f64());
            if let Some(rest) = rest {
                let mut following = message.clone();
                following["text"] = json!(rest);
                let last = send_message(args, following, rest).await?;
                return Some(SentReply { text, id: last.id });
            }
            Some(SentReply { text, id })
        }
        Ending::Cancelled => {
            args.services.events.record(
                &args.integration.id,
                EventDraft::new("stream.cancelled")
                    .activity(args.activity.kind(), args.activity.id())
                    .message("the user stopped the streamed answer"),
            );
            None
        }
        Ending::Fallback(reason) => {
            tracing::info!(integration = %args.integration.id, %reason, "stream refused; sending one message");
            args.services.events.record(
                &args.integration.id,
                EventDraft::new("stream.fallback")
                    .activity(args.activity.kind(), args.activity.id())
                    .message(reason),
            );
            send_message(args, message, text).await
        }
    }
}

/// The answer's further activities, then its updates and deletions of earlier messages.
async fn follow_up(args: &ReplyArgs, answer: Answer) {
    let connector = &args.services.connector;
    let route = route(args);
    if !deliverable(args) {
        return;
    }
    for extra in answer.activities {
        let activity = addressed(&args.activity, extra);
        if let Err(error) = connector
            .send(
                route,
                Some(args.activity.id()),
                &activity,
                Delivery::Retried,
            )
            .await
        {
            connector_failed(args, &error);
        }
    }
    for update in answer.updates {
        let Some(id) = update.get("id").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        let mut activity = addressed(&args.activity, update);
        if activity.get("text").is_some() && activity.get("textFormat").is_none() {
            activity["textFormat"] = json!(text_format(args).as_str());
        }
        if let Err(error) = connector.update(route, &id, &activity).await {
            connector_failed(args, &error);
        }
    }
    for id in answer.deletes {
        if let Err(error) = connector.delete(route, &id).await {
            connector_failed(args, &error);
        }
    }
}

fn deliverable(args: &ReplyArgs) -> bool {
    !args.integration.is_development() || is_loopback_url(args.activity.service_url())
}

fn delivery_allowed(args: &ReplyArgs) -> bool {
    if !deliverable(args) {
        tracing::warn!(
            integration = %args.integration.id,
            "development-mode integration: replies go only to loopback service URLs; reply dropped"
        );
        return false;
    }
    true
}

fn connector_failed(args: &ReplyArgs, error: &ConnectorError) {
    counter!(TURNS_FAILED).increment(1);
    tracing::warn!(integration = %args.integration.id, %error, "activity not delivered");
    args.services.events.record(
        &args.integration.id,
        EventDraft::new("connector.error")
            .activity(args.activity.kind(), args.activity.id())
            .message(error.to_string()),
    );
}

/// What the integration's event log and contact book learn from the activity.
fn observe(args: &ReplyArgs) {
    let integration = &args.integration;
    let activity = &args.activity;
    let services = &args.services;
    if let Some(addresses) = services.addresses.as_ref().filter(|_| args.learn_addresses) {
        addresses.learn(&integration.record.id, activity);
    }
    match activity.kind() {
        "message" | "invoke" | "messageReaction" if integration.record.contact_collection => {
            if let (Some(contacts), Some(user)) = (&services.contacts, activity.from_id()) {
                contacts.touch(
                    &integration.owner.account,
                    &integration.record.id,
                    &Sender {
                        teams_user_id: user,
                        aad_object_id: activity.from_aad_object_id(),
                        name: activity.from_name(),
                        tenant_id: activity.tenant_id(),
                    },
                );
            }
        }
        "conversationUpdate" => services.events.record(
            &integration.id,
            EventDraft::new("conversationUpdate")
                .activity(activity.kind(), activity.id())
                .message(format!(
                    "members added: {}, removed: {}{}",
                    activity.members_added().len(),
                    activity.members_removed().len(),
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
                .activity(activity.kind(), activity.id())
                .reason(
                    activity
                        .action()
                        .map(str::to_owned)
                        .unwrap_or_else(|| "unknown".into()),
                ),
        ),
        _ => {}
    }
}

async fn answer(args: &ReplyArgs, deltas: &Deltas) -> Answer {
    let integration = &args.integration;
    let backend = args
        .services
        .registry
        .bot(&integration.record.bot_id)
        .ok_or_else(|| format!("bot {:?} does not exist", integration.record.bot_id))
        .and_then(|bot| {
            if args.services.registry.bot_secret_unreadable(&bot.record.id) {
                // Calling without the secret would send the turn unsigned, or without the key.
                return Err(format!(
                    "the secret of bot {:?} cannot be opened with this router's master key; \
                     the bot is not called",
                    bot.record.id
                ));
            }
            Backend::from_spec(bot.backend()).map_err(|e| e.to_string())
        });
    let input = TurnInput {
        integration_id: &integration.record.id,
        bot_id: &integration.record.bot_id,
        session_id: &args.session_id,
        history: &args.history,
        activity: &args.activity,
        text: &args.text,
    };
    let result = match backend {
        Ok(backend) => backend
            .answer(&args.services.backends, &input, deltas)
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
                    .activity(args.activity.kind(), args.activity.id())
                    .message(error.clone()),
            );
            counter!(TURNS_FAILED).increment(1);
            // Users hear an apology for what they said; a failed lifecycle event stays silent,
            // and so does a failed invoke (its request is answered 501, as the SDKs answer).
            Answer {
                text: (args.activity.kind() == "message").then(|| args.services.apology.clone()),
                ..Answer::default()
            }
        }
    }
}

/// The message with `text` as its text and no attachments: what each part of a split answer is.
fn with_text(message: &Value, text: &str) -> Value {
    let mut part = message.clone();
    part["text"] = json!(text);
    if let Some(fields) = part.as_object_mut() {
        fields.remove("attachments");
    }
    part
}

/// Bytes of text a message like `message` can carry within `connector.max_message_bytes`.
fn text_budget(args: &ReplyArgs, message: &Value) -> usize {
    args.services
        .streaming
        .max_message_bytes
        .saturating_sub(split::message_size(&with_text(message, "")))
}

/// True when the message cannot be too large, told without serializing it: a UTF-8 byte of text
/// is at most 6 UTF-16 units once JSON-escaped, and the addressing is far below the margin.
fn surely_fits(args: &ReplyArgs, message: &Value, text: &str) -> bool {
    message.get("attachments").is_none() && text_surely_fits(args, text)
}

fn text_surely_fits(args: &ReplyArgs, text: &str) -> bool {
    const ADDRESSING_MARGIN: usize = 16 * 1024;
    text.len() * 12 + ADDRESSING_MARGIN <= args.services.streaming.max_message_bytes
}

/// An answer of text alone, as most turns give: serialized straight from the activity it
/// answers, unless it may need splitting.
async fn send_text(args: &ReplyArgs, text: String) -> Option<SentReply> {
    if !text_surely_fits(args, &text) {
        let mut message = outbound_message(&args.activity, &text, Vec::new());
        message["textFormat"] = json!(text_format(args).as_str());
        return send_message(args, message, text).await;
    }
    if !delivery_allowed(args) {
        return None;
    }
    let message = OutboundMessage::of(&args.activity, &text, text_format(args).as_str(), &[]);
    send_one(args, &message, &text).await
}

fn record_split(args: &ReplyArgs, size: usize, parts: usize) {
    args.services.events.record(
        &args.integration.id,
        EventDraft::new("reply.split")
            .activity(args.activity.kind(), args.activity.id())
            .message(format!(
                "the answer's message was {size} bytes (UTF-16), over connector.max_message_bytes \
                 ({}); it was sent as {parts} messages",
                args.services.streaming.max_message_bytes
            )),
    );
}

/// Sends the answer's message, as several when it is larger than Teams takes: the text in parts
/// (paragraphs, else lines, ...), in order, the attachments with the last part or after it.
async fn send_message(args: &ReplyArgs, message: Value, text: String) -> Option<SentReply> {
    if !delivery_allowed(args) {
        return None;
    }
    if surely_fits(args, &message, &text) {
        return send_one(args, &message, &text).await;
    }
    let size = split::message_size(&message);
    if size <= args.services.streaming.max_message_bytes {
        return send_one(args, &message, &text).await;
    }
    let parts = split::split(&text, text_budget(args, &message));
    let mut messages: Vec<Value> = parts.iter().map(|part| with_text(&message, part)).collect();
    if let Some(attachments) = message.get("attachments").filter(|a| !a.is_null()) {
        let fits = messages.last().is_some_and(|last| {
            let mut with = last.clone();
            with["attachments"] = attachments.clone();
            split::message_size(&with) <= args.services.streaming.max_message_bytes
        });
        match messages.last_mut() {
            Some(last) if fits => last["attachments"] = attachments.clone(),
            _ => {
                let mut cards = with_text(&message, "");
                cards["attachments"] = attachments.clone();
                messages.push(cards);
            }
        }
    }
    record_split(args, size, messages.len());
    let mut last_id = None;
    for part in messages {
        let part_text = part["text"].as_str().unwrap_or_default().to_owned();
        // A failed part (the connector said so) ends the answer: the parts after it would
        // arrive out of place.
        last_id = send_one(args, &part, &part_text).await?.id;
    }
    Some(SentReply { text, id: last_id })
}

async fn send_one(
    args: &ReplyArgs,
    message: &(impl serde::Serialize + Sync),
    text: &str,
) -> Option<SentReply> {
    let activity = &args.activity;
    // A bot added to a conversation speaks into it; anything else is a reply to the activity.
    let reply_to = (activity.kind() != "conversationUpdate").then_some(activity.id());
    let result = args
        .services
        .connector
        .send(route(args), reply_to, message, Delivery::Retried)
        .await;
    match result {
        Ok(id) => {
            histogram!(FIRST_REPLY).record(args.accepted_at.elapsed().as_secs_f64());
            tracing::debug!(integration = %args.integration.id, id = id.as_deref().unwrap_or(""), "reply sent");
            Some(SentReply {
                text: text.to_owned(),
                id,
            })
        }
        Err(error) => {
            connector_failed(args, &error);
            None
        }
    }
}

/// An activity of the bot's, addressed into the activity's conversation: what the backend gave
/// (a card, an edited message) with the addressing it left out filled in.
fn addressed(activity: &TurnActivity, given: Value) -> Value {
    let mut message = outbound_message(activity, "", Vec::new());
    if let (Some(fields), Value::Object(given)) = (message.as_object_mut(), given) {
        fields.remove("text");
        fields.remove("textFormat");
        fields.extend(given);
    }
    message
}

/// How the integration's bot wants its answers rendered (`textFormat`).
fn text_format(args: &ReplyArgs) -> crate::records::TextFormat {
    args.services
        .registry
        .bot(&args.integration.record.bot_id)
        .map(|bot| bot.record.text_format())
        .unwrap_or(crate::records::TextFormat::Plain)
}

/// A message addressed back into the activity's conversation, borrowed from it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutboundMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    text_format: &'a str,
    channel_id: &'a str,
    service_url: &'a str,
    conversation: Verbatim<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<Verbatim<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient: Option<Verbatim<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    locale: Option<&'a str>,
    #[serde(skip_serializing_if = "<[Value]>::is_empty")]
    attachments: &'a [Value],
}

impl<'a> OutboundMessage<'a> {
    fn of(
        activity: &'a TurnActivity,
        text: &'a str,
        text_format: &'a str,
        attachments: &'a [Value],
    ) -> Self {
        Self {
            kind: "message",
            text,
            text_format,
            channel_id: activity.channel_id(),
            service_url: activity.service_url(),
            // The request's checks made sure of the conversation (its id).
            conversation: Verbatim(activity.conversation_json().unwrap_or("{}")),
            // The bot speaks as the account the activity was sent to, to its sender.
            from: activity.recipient_json().map(Verbatim),
            recipient: activity.from_json().map(Verbatim),
            // A bot added to a conversation speaks into it, not in reply.
            reply_to_id: (activity.kind() != "conversationUpdate").then_some(activity.id()),
            locale: activity.locale(),
            attachments,
        }
    }
}

/// The same message as a JSON value, for the answers that are edited before they are sent
/// (split, streamed, given by the backend whole).
fn outbound_message(activity: &TurnActivity, text: &str, attachments: Vec<Value>) -> Value {
    serde_json::to_value(OutboundMessage::of(activity, text, "plain", &attachments))
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bot answers as the account the activity was sent to, to its sender, in its
    /// conversation: those three objects are written as Teams sent them.
    #[test]
    fn a_reply_is_addressed_with_the_objects_teams_sent() {
        let sent = json!({
            "type": "message", "id": "m1", "serviceUrl": "https://smba.example/amer/",
            "channelId": "msteams", "locale": "en-US",
            "conversation": {"id": "a:1", "conversationType": "personal", "tenantId": "t1"},
            "from": {"id": "29:u", "name": "Ann \"A\"", "aadObjectId": "o1"},
            "recipient": {"id": "28:bot", "name": "Bot"},
            "text": "hi",
        });
        let activity = TurnActivity::of_json(&sent);
        let message = outbound_message(&activity, "echo: hi", Vec::new());
        assert_eq!(message["conversation"], sent["conversation"]);
        assert_eq!(message["from"], sent["recipient"]);
        assert_eq!(message["recipient"], sent["from"]);
        assert_eq!(message["replyToId"], "m1");
        assert_eq!(message["serviceUrl"], sent["serviceUrl"]);
        let bytes = serde_json::to_vec(&OutboundMessage::of(&activity, "x", "plain", &[])).unwrap();
        let written: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(written["recipient"], sent["from"]);
        assert_eq!(written["locale"], "en-US");
    }

    #[tokio::test]
    async fn a_panicking_turn_is_reported_as_failed_with_its_message() {
        let (tx, rx) = std::sync::mpsc::channel();
        catching(
            async { panic!("turn blew up") },
            |outcome: Result<(), _>| {
                let message = outcome.err().map(|p| panic_message(p.as_ref()).to_owned());
                let _ = tx.send(message);
            },
        )
        .await;
        assert_eq!(rx.recv().ok().flatten().as_deref(), Some("turn blew up"));
        let (tx, rx) = std::sync::mpsc::channel();
        catching(async { 7 }, |outcome| {
            let _ = tx.send(outcome.ok());
        })
        .await;
        assert_eq!(rx.recv().ok().flatten(), Some(7));
    }
}
