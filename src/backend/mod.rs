//! The bot's brain behind one interface. A backend gets the turn (the activity and the session's
//! history) and answers with a message text and, for invokes, the InvokeResponse. It knows
//! nothing of Teams' wire protocol.

pub mod egress;
pub mod openai;
pub mod webhook;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::activity::TurnActivity;
use crate::records::BackendSpec;

/// Who said a line of a session's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Bot,
}

/// One line of a session's history, as backends are sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub role: Role,
    pub text: String,
    pub at_ms: u64,
    /// The user's activity id, or the id the Bot Connector gave the bot's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Where the answer to an invoke is published, once: the request that brought the invoke and any
/// redelivery of it wait on the same answer, so each of them gets the bot's InvokeResponse.
pub struct InvokeReply(watch::Sender<Option<InvokeResponse>>);

/// The waiting side of an [`InvokeReply`]; it ends without a value when the turn ends unanswered.
pub type InvokeAnswer = watch::Receiver<Option<InvokeResponse>>;

impl InvokeReply {
    pub fn new() -> (Self, InvokeAnswer) {
        let (tx, rx) = watch::channel(None);
        (Self(tx), rx)
    }

    pub fn send(self, response: InvokeResponse) {
        self.0.send_replace(Some(response));
    }

    pub fn subscribe(&self) -> InvokeAnswer {
        self.0.subscribe()
    }
}

/// What a backend is asked.
pub struct TurnInput<'a> {
    pub integration_id: &'a str,
    pub bot_id: &'a str,
    /// Names the session (its key and start), so a bot can keep its own state per session.
    pub session_id: &'a str,
    /// The session's earlier turns, oldest first (this activity's text is the last user entry).
    pub history: &'a [HistoryEntry],
    pub activity: &'a TurnActivity,
    /// The activity's text without the mentions of the bot, as the user typed it (stripped once,
    /// by the conversation, which records it in the history).
    pub text: &'a str,
}

/// What backends share: the HTTP client, the outbound policy and the limits.
pub struct BackendClient {
    /// Built by [`BackendClient::http_client`]: no redirects, no proxy, the policy's resolver.
    pub http: reqwest::Client,
    pub egress: std::sync::Arc<egress::EgressPolicy>,
    pub webhook_timeout: Duration,
    pub openai_timeout: Duration,
    /// Characters of history sent to a model at most.
    pub openai_history_max_chars: usize,
}

impl BackendClient {
    /// The client backends are called with: it follows no redirect (a 302 would turn the POST
    /// into a GET to wherever the backend points), ignores proxy variables (the policy judges
    /// the destination, not a proxy) and connects only to addresses the policy allows.
    pub fn http_client(
        egress: &std::sync::Arc<egress::EgressPolicy>,
        connect_timeout: Duration,
    ) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(egress::PolicyResolver {
                policy: std::sync::Arc::clone(egress),
            })
            .build()
    }

    /// The URL a backend may be called at, or why not (checked before every call: the policy
    /// may have changed since the backend was saved, and address hosts never reach the resolver).
    pub fn screen(&self, field: &str, url: &str) -> Result<(), BackendError> {
        self.egress.screen(url).map(drop).map_err(|refused| {
            BackendError::Failed(format!(
                "backend.{field} is refused by the outbound policy: {refused}"
            ))
        })
    }
}

/// The synchronous answer to an `invoke` activity (protocol.md §5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct InvokeResponse {
    pub status: u16,
    pub body: Value,
}

impl InvokeResponse {
    /// The Action.Execute error shape, used when the bot cannot answer in time or at all.
    pub fn error(code: &str, message: &str) -> Self {
        Self {
            status: 200,
            body: json!({
                "statusCode": 500,
                "type": "application/vnd.microsoft.error",
                "value": {"code": code, "message": message},
            }),
        }
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    /// The answer's message (streamed into Teams as it was produced); none for nothing to say.
    pub text: Option<String>,
    pub invoke: Option<InvokeResponse>,
    /// Attachments (cards) of the answer's message.
    pub attachments: Vec<Value>,
    /// More activities to send after the message, in order, each as given (addressing added).
    pub activities: Vec<Value>,
    /// Earlier messages of the bot to replace: each activity names the message by its `id`.
    pub updates: Vec<Value>,
    /// Ids of earlier messages of the bot to delete.
    pub deletes: Vec<String>,
}

impl Answer {
    pub fn text(text: Option<String>) -> Self {
        Self {
            text,
            ..Self::default()
        }
    }
}

/// Where a backend puts the text of its answer as it is produced, so the reply can stream it
/// into Teams while the rest is still coming. Pieces are appended to one growing text: Teams'
/// streaming updates carry the whole text so far, and a reader that falls behind just sees more.
pub struct Deltas {
    text: watch::Sender<String>,
}

impl Deltas {
    /// A sink and the reader of its growing text.
    pub fn channel() -> (Self, watch::Receiver<String>) {
        let (text, reader) = watch::channel(String::new());
        (Self { text }, reader)
    }

    /// A sink nobody reads (the answer is sent as one message).
    pub fn unread() -> Self {
        Self::channel().0
    }

    pub fn push(&self, piece: &str) {
        if !piece.is_empty() {
            self.text.send_modify(|text| text.push_str(piece));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    Failed(String),
}

/// Bytes of one answer's body a backend may send at most, whatever its framing: a line with no
/// end, an SSE event that never closes or a huge JSON document fails the turn instead of growing
/// the router's memory until the deadline.
pub const MAX_ANSWER_BODY_BYTES: usize = 4 << 20;

/// `body` with its total length bounded by `limit`; the first chunk past it is an error.
pub fn capped<S, B, E>(
    body: S,
    limit: usize,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BackendError>>
where
    S: futures_util::Stream<Item = Result<B, E>>,
    B: Into<bytes::Bytes>,
    E: std::fmt::Display,
{
    use futures_util::StreamExt;
    let mut total = 0usize;
    body.map(move |chunk| {
        let chunk: bytes::Bytes = chunk
            .map_err(|e| BackendError::Failed(format!("the answer broke: {e}")))?
            .into();
        total = total.saturating_add(chunk.len());
        if total > limit {
            return Err(BackendError::Failed(format!(
                "the answer's body is over {limit} bytes"
            )));
        }
        Ok(chunk)
    })
}

/// `body` cut into whole lines, each with its end (any byte of `ends`), the last one as it
/// ends. Each byte is looked at once, and each line is handed over without a copy: a parser that
/// reads its buffer from the start whenever more comes (the SSE parser does) then reads each
/// line once, instead of the whole unfinished line again at every chunk of a body sent in tiny
/// chunks (found by fuzzing: 14 KB in 1-byte chunks took over 10 s).
pub fn lines<S>(
    body: S,
    ends: &'static [u8],
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, BackendError>>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, BackendError>>,
{
    use futures_util::StreamExt;
    struct Cutting<S> {
        body: std::pin::Pin<Box<S>>,
        pending: bytes::BytesMut,
        cut: std::collections::VecDeque<bytes::Bytes>,
        ended: bool,
    }
    let start = Cutting {
        body: Box::pin(body),
        pending: bytes::BytesMut::new(),
        cut: std::collections::VecDeque::new(),
        ended: false,
    };
    futures_util::stream::unfold(start, move |mut state| async move {
        loop {
            if let Some(line) = state.cut.pop_front() {
                return Some((Ok(line), state));
            }
            if state.ended {
                if state.pending.is_empty() {
                    return None;
                }
                let rest = state.pending.split().freeze();
                return Some((Ok(rest), state));
            }
            match state.body.next().await {
                Some(Ok(chunk)) => {
                    // What was pending before holds no line end: only the new bytes are looked at.
                    let mut from = state.pending.len();
                    state.pending.extend_from_slice(&chunk);
                    while let Some(at) = state.pending[from..].iter().position(|b| ends.contains(b))
                    {
                        let line = state.pending.split_to(from + at + 1).freeze();
                        state.cut.push_back(line);
                        from = 0;
                    }
                }
                Some(Err(error)) => {
                    state.ended = true;
                    state.pending.clear();
                    state.cut.clear();
                    return Some((Err(error), state));
                }
                None => state.ended = true,
            }
        }
    })
}

pub enum Backend {
    Echo { word_delay: Option<Duration> },
    Webhook(webhook::Webhook),
    OpenAi(openai::OpenAi),
}

impl Backend {
    pub fn from_spec(spec: &BackendSpec) -> Result<Self, BackendError> {
        match spec {
            BackendSpec::Echo { word_delay_ms } => Ok(Self::Echo {
                word_delay: word_delay_ms
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis),
            }),
            BackendSpec::Webhook { url, secret } => Ok(Self::Webhook(webhook::Webhook {
                url: url.clone(),
                secret: secret.clone(),
            })),
            BackendSpec::Openai {
                base_url,
                api_key,
                model,
                system_prompt,
            } => Ok(Self::OpenAi(openai::OpenAi {
                base_url: base_url.clone(),
                api_key: api_key.clone(),
                model: model.clone(),
                system_prompt: system_prompt.clone(),
            })),
        }
    }

    /// The answer to the turn; its text is also pushed into `deltas` as it is produced.
    pub async fn answer(
        &self,
        client: &BackendClient,
        input: &TurnInput<'_>,
        deltas: &Deltas,
    ) -> Result<Answer, BackendError> {
        match self {
            Self::Echo { word_delay } => {
                let answer = echo(input.activity, input.text);
                if let Some(text) = &answer.text {
                    stream_words(text, *word_delay, deltas).await;
                }
                Ok(answer)
            }
            Self::Webhook(hook) => {
                client.screen("url", &hook.url)?;
                hook.answer(&client.http, client.webhook_timeout, input, deltas)
                    .await
            }
            // A model answers messages; other activities (invokes, reactions) get nothing.
            Self::OpenAi(_) if input.activity.kind() != "message" => Ok(Answer::default()),
            Self::OpenAi(model) => {
                client.screen("baseUrl", &model.base_url)?;
                model
                    .answer(
                        &client.http,
                        client.openai_timeout,
                        client.openai_history_max_chars,
                        input,
                        deltas,
                    )
                    .await
            }
        }
    }
}

/// Pushes `text` word by word (each piece a word and the space before it), `delay` apart.
async fn stream_words(text: &str, delay: Option<Duration>, deltas: &Deltas) {
    let Some(delay) = delay else {
        deltas.push(text);
        return;
    };
    let mut start = 0;
    for (i, _) in text.match_indices(' ') {
        if i > start {
            deltas.push(&text[start..i]);
            start = i;
            tokio::time::sleep(delay).await;
        }
    }
    deltas.push(&text[start..]);
}

/// Echo answers a message with `echo: <text>` (bot mentions stripped), a card submission with its
/// data, and a card action with a short message.
fn echo(activity: &TurnActivity, text: &str) -> Answer {
    match activity.kind() {
        "message" => {
            let said = if !text.is_empty() {
                Some(text.to_owned())
            } else {
                activity.value().as_ref().map(Value::to_string)
            };
            // Attachments reach the backend only when the integration allows them.
            let attached = match activity.attachment_count() {
                0 => String::new(),
                1 => " [1 attachment]".to_owned(),
                n => format!(" [{n} attachments]"),
            };
            let said = match (said, attached.is_empty()) {
                (Some(s), _) => Some(format!("{s}{attached}")),
                (None, false) => Some(attached.trim_start().to_owned()),
                (None, true) => None,
            };
            Answer::text(said.map(|s| format!("echo: {s}")))
        }
        "invoke" => {
            let body = match activity.name() {
                Some("adaptiveCard/action") => {
                    let data = activity
                        .value()
                        .as_ref()
                        .and_then(|v| v.get("action"))
                        .and_then(|a| a.get("data"))
                        .map(Value::to_string)
                        .unwrap_or_else(|| "{}".into());
                    // A card, as a real bot updates the card that was clicked.
                    json!({
                        "statusCode": 200,
                        "type": "application/vnd.microsoft.card.adaptive",
                        "value": {
                            "type": "AdaptiveCard",
                            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                            "version": "1.4",
                            "body": [{
                                "type": "TextBlock",
                                "text": format!("echo: {data}"),
                                "wrap": true,
                            }],
                        },
                    })
                }
                Some("task/fetch" | "task/submit") => json!({
                    "task": {"type": "message", "value": "echo"}
                }),
                _ => json!({}),
            };
            Answer {
                invoke: Some(InvokeResponse { status: 200, body }),
                ..Answer::default()
            }
        }
        _ => Answer::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(json: Value) -> TurnActivity {
        TurnActivity::of_json(&json)
    }

    #[tokio::test]
    async fn echo_strips_the_bot_mention() {
        let a = activity(json!({
            "type": "message", "id": "1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "c"}, "recipient": {"id": "28:bot"},
            "text": "<at>Bot</at> hello",
            "entities": [{"type": "mention", "mentioned": {"id": "28:bot"}, "text": "<at>Bot</at>"}],
        }));
        let answer = echo(&a, &a.text_without_bot_mentions());
        assert_eq!(answer.text.as_deref(), Some("echo: hello"));
    }

    #[tokio::test]
    async fn words_stream_one_by_one() {
        let (deltas, mut reader) = Deltas::channel();
        let seen = tokio::spawn(async move {
            let mut seen = Vec::new();
            while reader.changed().await.is_ok() {
                seen.push(reader.borrow_and_update().clone());
            }
            seen
        });
        stream_words("echo: a  b", Some(Duration::from_millis(20)), &deltas).await;
        drop(deltas);
        let seen = seen.await.unwrap();
        assert_eq!(seen, ["echo:", "echo: a", "echo: a ", "echo: a  b"]);
    }

    #[tokio::test]
    async fn echo_answers_card_actions_with_a_card() {
        let a = activity(json!({
            "type": "invoke", "id": "f:1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "c"}, "name": "adaptiveCard/action",
            "value": {"action": {"type": "Action.Execute", "data": {"x": 1}}},
        }));
        let answer = echo(&a, &a.text_without_bot_mentions());
        let invoke = answer.invoke.unwrap();
        assert_eq!(invoke.status, 200);
        assert_eq!(
            invoke.body["type"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(invoke.body["value"]["type"], "AdaptiveCard");
        assert_eq!(invoke.body["value"]["body"][0]["text"], "echo: {\"x\":1}");
        assert_eq!(answer.text, None);
    }
}
