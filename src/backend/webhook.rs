//! The webhook backend: the turn is POSTed to the bot's URL as
//! `{integrationId, botId, session: {id, history}, activity}`, signed with the bot's secret
//! (`X-Teams-Router-Timestamp: <unix seconds>`, `X-Teams-Router-Signature: sha256=<hex HMAC-SHA-256
//! of "<timestamp>.<body>">`, so a receiver can refuse replays of old requests). The answer is
//! read by its content type:
//! - `application/json`: `{"text"?, "attachments"?: [...], "invokeResponse"?: {"status", "body"},
//!   "activities"?: [...], "update"?: [{"id", ...activity}], "delete"?: ["id"]}`: the message,
//!   its cards, an invoke's answer, more activities sent as they are, and earlier messages of the
//!   bot to replace or delete (ids from the session history);
//! - `application/x-ndjson`: one such object per line, or `{"delta": "..."}` pieces of text,
//!   streamed into Teams as they arrive;
//! - `text/event-stream`: the same objects as SSE `data:` (until `[DONE]` or the end);
//! - `text/plain`: the message text.
//!
//! The whole exchange is bounded by `backend.webhook_timeout_ms`. A POST is not idempotent, so
//! only a request that never reached the server (connection refused) is tried again.

use std::time::Duration;

use aws_lc_rs::hmac;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Answer, BackendError, Deltas, InvokeResponse, MAX_ANSWER_BODY_BYTES, TurnInput, capped, lines,
};

pub const SIGNATURE_HEADER: &str = "x-teams-router-signature";
pub const TIMESTAMP_HEADER: &str = "x-teams-router-timestamp";
/// Text a webhook may send for one turn at most.
const MAX_TEXT_BYTES: usize = 1 << 20;
const CONNECT_ATTEMPTS: u32 = 3;
/// Activities, attachments and updates one answer may carry at most.
const MAX_ACTIVITIES: usize = 50;

pub struct Webhook {
    pub url: String,
    pub secret: Option<String>,
}

/// One object of a webhook answer (a whole JSON answer, an NDJSON line or an SSE event).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Piece {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    invoke_response: Option<InvokePiece>,
    #[serde(default)]
    attachments: Vec<Value>,
    #[serde(default)]
    activities: Vec<Value>,
    #[serde(default)]
    update: Vec<Value>,
    #[serde(default)]
    delete: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct InvokePiece {
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    body: Value,
}

fn ok_status() -> u16 {
    200
}

/// What kind of turn this is, for a bot that dispatches on it: the activity type, Teams'
/// `channelData.eventType` for conversation updates (channelCreated, teamRenamed, ...), the
/// member changes, an installation's action, an invoke's or event's name.
fn event_of(activity: &crate::activity::TurnActivity) -> Value {
    let mut event = json!({"type": activity.kind()});
    let channel_event = activity.event_type();
    if let Some(kind) = channel_event {
        event["eventType"] = json!(kind);
    }
    for (name, members) in [
        ("membersAdded", activity.members_added()),
        ("membersRemoved", activity.members_removed()),
    ] {
        if !members.is_empty() {
            event[name] = json!(members.len());
        }
    }
    if let Some(action) = activity.action() {
        event["action"] = json!(action);
    }
    if let Some(name) = activity.name() {
        event["name"] = json!(name);
    }
    event
}

/// The HMAC-SHA-256 signature of a request body, as the `X-Teams-Router-Signature` value.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl Webhook {
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
        input: &TurnInput<'_>,
        deltas: &Deltas,
    ) -> Result<Answer, BackendError> {
        let deadline = crate::clock::now() + timeout;
        let body = serde_json::to_vec(&json!({
            "integrationId": input.integration_id,
            "botId": input.bot_id,
            "event": event_of(input.activity),
            "session": {"id": input.session_id, "history": input.history},
            "activity": input.activity,
        }))
        .map_err(|e| BackendError::Failed(format!("the turn does not serialize: {e}")))?;
        let exchange = async {
            let response = self.send(http, body).await?;
            let status = response.status();
            if !status.is_success() {
                return Err(BackendError::Failed(format!(
                    "the webhook answered HTTP {}",
                    status.as_u16()
                )));
            }
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            read_answer(&content_type, response.bytes_stream(), Some(deltas)).await
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| {
                BackendError::Failed(format!(
                    "the webhook did not answer within {} ms",
                    timeout.as_millis()
                ))
            })?
    }

    /// Sends the turn; a connection that was never made is tried again, nothing else.
    async fn send(
        &self,
        http: &reqwest::Client,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, BackendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let timestamp = crate::clock::unix_secs();
            let mut request = http
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(
                    reqwest::header::ACCEPT,
                    "application/json, application/x-ndjson, text/event-stream",
                )
                .header(TIMESTAMP_HEADER, timestamp.to_string());
            if let Some(secret) = &self.secret {
                request = request.header(SIGNATURE_HEADER, signature(secret, timestamp, &body));
            }
            match request.body(body.clone()).send().await {
                Ok(response) => return Ok(response),
                Err(error) if error.is_connect() && attempt < CONNECT_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                Err(error) => {
                    return Err(BackendError::Failed(format!(
                        "the webhook cannot be reached: {}",
                        super::egress::error_chain(&error.without_url())
                    )));
                }
            }
        }
    }
}

/// Reads a webhook's answer body by its content type (see the module's documentation), streaming
/// text deltas to `deltas` as they arrive. The body is bounded by [`MAX_ANSWER_BODY_BYTES`].
pub async fn read_answer<S, B, E>(
    content_type: &str,
    body: S,
    deltas: Option<&Deltas>,
) -> Result<Answer, BackendError>
where
    S: Stream<Item = Result<B, E>>,
    B: Into<Bytes>,
    E: std::fmt::Display,
{
    let content_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut body = std::pin::pin!(capped(body, MAX_ANSWER_BODY_BYTES));
    let mut answer = Assembly {
        deltas,
        ..Assembly::default()
    };
    match content_type.as_str() {
        "text/event-stream" => {
            let mut events = Box::pin(lines(body, b"\r\n")).eventsource();
            while let Some(event) = events.next().await {
                let event = event
                    .map_err(|e| BackendError::Failed(format!("the event stream broke: {e}")))?;
                if event.data.trim() == "[DONE]" {
                    break;
                }
                answer.add_json(event.data.as_bytes())?;
            }
        }
        "application/x-ndjson" | "application/jsonl" => {
            let mut lines = std::pin::pin!(lines(body, b"\n"));
            while let Some(line) = lines.next().await {
                let line = line?;
                answer.check_size(line.len())?;
                answer.add_json(&line)?;
            }
        }
        _ => {
            let mut whole = Vec::new();
            while let Some(chunk) = body.next().await {
                whole.extend_from_slice(&chunk?);
            }
            if content_type.starts_with("text/plain") {
                answer.check_size(whole.len())?;
                answer.text.push_str(&String::from_utf8_lossy(&whole));
            } else {
                answer.add_json(&whole)?;
            }
        }
    }
    Ok(answer.finish())
}

/// The answer as it arrives piece by piece.
#[derive(Default)]
struct Assembly<'a> {
    text: String,
    invoke: Option<InvokeResponse>,
    attachments: Vec<Value>,
    activities: Vec<Value>,
    updates: Vec<Value>,
    deletes: Vec<String>,
    /// Where text deltas are streamed to as they arrive.
    deltas: Option<&'a Deltas>,
}

impl Assembly<'_> {
    fn check_size(&self, more: usize) -> Result<(), BackendError> {
        if self.text.len() + more > MAX_TEXT_BYTES {
            return Err(BackendError::Failed(format!(
                "the webhook's answer is over {MAX_TEXT_BYTES} bytes"
            )));
        }
        Ok(())
    }

    fn add_json(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let piece: Piece = serde_json::from_slice(bytes)
            .map_err(|e| BackendError::Failed(format!("the webhook sent invalid JSON: {e}")))?;
        if let Some(delta) = piece.delta {
            self.check_size(delta.len())?;
            self.text.push_str(&delta);
            if let Some(deltas) = self.deltas {
                deltas.push(&delta);
            }
        }
        if let Some(text) = piece.text {
            // A whole text replaces what the deltas built so far (a final summary).
            self.check_size(text.len())?;
            self.text = text;
        }
        let extra = piece.attachments.len() + piece.activities.len() + piece.update.len();
        if self.attachments.len() + self.activities.len() + self.updates.len() + extra
            > MAX_ACTIVITIES
        {
            return Err(BackendError::Failed(format!(
                "the webhook's answer has more than {MAX_ACTIVITIES} activities and attachments"
            )));
        }
        self.attachments.extend(piece.attachments);
        self.activities
            .extend(piece.activities.into_iter().filter(Value::is_object));
        for update in piece.update {
            if update.get("id").and_then(Value::as_str).is_none() {
                return Err(BackendError::Failed(
                    "an update of the webhook's answer names no message id".into(),
                ));
            }
            self.updates.push(update);
        }
        self.deletes.extend(piece.delete);
        if let Some(invoke) = piece.invoke_response {
            self.invoke = Some(InvokeResponse {
                status: invoke.status,
                body: invoke.body,
            });
        }
        Ok(())
    }

    fn finish(self) -> Answer {
        Answer {
            text: (!self.text.is_empty()).then_some(self.text),
            invoke: self.invoke,
            attachments: self.attachments,
            activities: self.activities,
            updates: self.updates,
            deletes: self.deletes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // Known answer: HMAC-SHA-256("key", "1.{}").
        let sig = signature("key", 1, b"{}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
        assert_ne!(sig, signature("key", 2, b"{}"));
        assert_ne!(sig, signature("other", 1, b"{}"));
    }

    fn read(content_type: &str, body: &[u8], chunk_len: usize) -> Result<Answer, BackendError> {
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> = body
            .chunks(chunk_len)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::FutureExt::now_or_never(read_answer(
            content_type,
            futures_util::stream::iter(chunks),
            None,
        ))
        .expect("a body that is all there reads without waiting")
    }

    #[test]
    fn answers_read_the_same_whatever_their_chunks() {
        let sse = b"data: {\"delta\": \"Hel\"}\r\n\r\n: a comment\rdata: {\"delta\": \"lo\"}\n\ndata: [DONE]\n\n";
        let ndjson = b"{\"delta\": \"Hel\"}\r\n\n{\"delta\": \"lo\"}";
        for (content_type, body) in [
            ("text/event-stream", &sse[..]),
            ("application/x-ndjson", &ndjson[..]),
        ] {
            for chunk_len in [1, 2, 3, 7, body.len()] {
                let answer = read(content_type, body, chunk_len).expect(content_type);
                assert_eq!(
                    answer.text.as_deref(),
                    Some("Hello"),
                    "{content_type} in {chunk_len}s"
                );
            }
        }
    }

    /// Found by fuzzing: a long line in 1-byte chunks was read again from its start at every
    /// chunk (over 10 s for 14 KB in a debug build).
    #[test]
    fn a_long_line_in_tiny_chunks_is_read_once() {
        let text = "x".repeat(200_000);
        for content_type in ["text/event-stream", "application/x-ndjson"] {
            let body = match content_type {
                "text/event-stream" => format!("data: {{\"delta\": \"{text}\"}}\n\n"),
                _ => format!("{{\"delta\": \"{text}\"}}\n"),
            };
            let started = std::time::Instant::now();
            let answer = read(content_type, body.as_bytes(), 1).expect(content_type);
            assert_eq!(answer.text.map(|t| t.len()), Some(text.len()));
            // Linear: well under a second even unoptimized (quadratic was minutes).
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "{content_type}: {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn pieces_assemble_deltas_texts_and_invoke_answers() {
        let mut a = Assembly::default();
        a.add_json(br#"{"delta": "Hel"}"#).unwrap();
        a.add_json(br#"{"delta": "lo"}"#).unwrap();
        a.add_json(b"  ").unwrap();
        a.add_json(br#"{"invokeResponse": {"body": {"ok": true}}}"#)
            .unwrap();
        let answer = a.finish();
        assert_eq!(answer.text.as_deref(), Some("Hello"));
        assert_eq!(answer.invoke.unwrap().status, 200);
        let mut b = Assembly::default();
        assert!(b.add_json(b"{not json").is_err());
        b.add_json(br#"{"activities": [{"type": "message", "text": "a"}, {"type": "message", "text": "b"}]}"#)
            .unwrap();
        b.add_json(br#"{"update": [{"id": "7", "text": "edited"}], "delete": ["8"]}"#)
            .unwrap();
        assert!(b.add_json(br#"{"update": [{"text": "no id"}]}"#).is_err());
        let answer = b.finish();
        assert_eq!(answer.text, None);
        assert_eq!(answer.activities.len(), 2);
        assert_eq!(answer.updates[0]["id"], "7");
        assert_eq!(answer.deletes, ["8"]);
    }
}
