//! Teams streaming of an answer into a personal chat (protocol.md §4): an informative update
//! starts the stream (`typing` with a `streaminfo` entity, sequence 1; the 201 answer's id is the
//! stream id), streaming updates carry the whole text so far with increasing sequence numbers,
//! at most one per `interval` and each only after the previous one finished, and a `message`
//! with `streamType: final` (no sequence) ends it. The stream fields are also mirrored in
//! `channelData`, as some Teams clients read them there.
//!
//! When Teams refuses the stream (not allowed, not enabled, ended, too long, throttled), no more
//! updates are sent and the answer goes as one plain message; when the user pressed Stop, nothing
//! more is sent.

use std::time::Duration;

use crate::clock::Instant;

use metrics::counter;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::config::StreamingConfig;
use crate::connector::{Connector, ConnectorError, Delivery, Route};
use crate::telemetry::STREAMS;

#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Without streaming, a typing indicator once the answer takes this long.
    pub typing_delay: Duration,
    pub interval: Duration,
    pub informative_text: String,
    pub max_duration: Duration,
    /// A message's size at most (`connector.max_message_bytes`, UTF-16): updates stop before it.
    pub max_message_bytes: usize,
}

impl From<&StreamingConfig> for StreamSettings {
    fn from(config: &StreamingConfig) -> Self {
        Self {
            typing_delay: Duration::from_millis(config.typing_delay_ms),
            interval: Duration::from_millis(config.interval_ms),
            informative_text: config.informative_text.clone(),
            max_duration: Duration::from_millis(config.max_duration_ms),
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Why a stream stopped before its final message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// Teams refused an update (or the stream ran too long): the answer goes as one message.
    Fallback(String),
    /// The user pressed Stop: nothing more is sent.
    Cancelled,
}

/// How a streamed answer ended.
#[derive(Debug, PartialEq)]
pub enum Ending {
    /// The final message closed the stream; its id is the stream id.
    Completed {
        id: Option<String>,
    },
    /// Send the answer as one plain message instead.
    Fallback(String),
    Cancelled,
}

/// What the `streaminfo` entity and channel data add to an update, at most (UTF-16 bytes).
pub const STREAM_ENTITY_BYTES: usize = 512;

/// One answer being streamed.
pub struct Stream<'a> {
    connector: &'a Connector,
    route: Route<'a>,
    /// The addressing every update carries (conversation, from, recipient, replyToId, ...).
    base: &'a Value,
    settings: &'a StreamSettings,
    started: Instant,
    stream_id: Option<String>,
    sequence: u32,
    /// The text of the last streaming update Teams accepted.
    streamed: String,
    broken: Option<Broken>,
}

impl<'a> Stream<'a> {
    pub fn new(
        connector: &'a Connector,
        route: Route<'a>,
        base: &'a Value,
        settings: &'a StreamSettings,
    ) -> Self {
        Self {
            connector,
            route,
            base,
            settings,
            started: crate::clock::now(),
            stream_id: None,
            sequence: 0,
            streamed: String::new(),
            broken: None,
        }
    }

    /// Starts the stream with the informative update, then streams the growing `text` until its
    /// writer is dropped (the backend finished).
    pub async fn follow(&mut self, mut text: watch::Receiver<String>) {
        let informative = self.settings.informative_text.clone();
        self.update("informative", &informative).await;
        let mut last_update = crate::clock::now();
        loop {
            if text.changed().await.is_err() {
                return;
            }
            if self.broken.is_some() {
                continue;
            }
            // Coalesce: wait for the interval, taking whatever arrives meanwhile.
            let next = last_update + self.settings.interval;
            let mut finished = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    changed = text.changed() => if changed.is_err() {
                        finished = true;
                        break;
                    },
                }
            }
            if finished {
                // The final message carries the whole text; an update now would only delay it.
                return;
            }
            if self.started.elapsed() >= self.settings.max_duration {
                self.broken = Some(Broken::Fallback(
                    "the answer took longer than Teams lets a stream run".into(),
                ));
                continue;
            }
            let current = text.borrow_and_update().clone();
            // An update as large as a message would be refused (403, message size): the stream
            // stays where it is, and its final message and the ones after carry the rest.
            let room = self
                .settings
                .max_message_bytes
                .saturating_sub(super::split::message_size(self.base) + STREAM_ENTITY_BYTES);
            if super::split::text_cost(&current) > room {
                last_update = crate::clock::now();
                continue;
            }
            // Teams rejects an update that does not extend the text it has.
            if current.len() > self.streamed.len() && current.starts_with(&self.streamed) {
                self.update("streaming", &current).await;
                if self.broken.is_none() {
                    self.streamed = current;
                }
            }
            last_update = crate::clock::now();
        }
    }

    /// Sends one `typing` update of the stream.
    async fn update(&mut self, stream_type: &str, text: &str) {
        self.sequence += 1;
        let mut info = json!({
            "type": "streaminfo",
            "streamType": stream_type,
            "streamSequence": self.sequence,
        });
        let mut channel_data = json!({"streamType": stream_type, "streamSequence": self.sequence});
        if let Some(id) = &self.stream_id {
            info["streamId"] = json!(id);
            channel_data["streamId"] = json!(id);
        }
        let mut activity = self.base.clone();
        activity["type"] = json!("typing");
        activity["text"] = json!(text);
        activity["entities"] = json!([info]);
        merge_channel_data(&mut activity, channel_data);
        if let Some(id) = &self.stream_id {
            activity["id"] = json!(id);
        }
        match self
            .connector
            .send(self.route, None, &activity, Delivery::Once)
            .await
        {
            Ok(Some(id)) if self.stream_id.is_none() => self.stream_id = Some(id),
            Ok(None) if self.stream_id.is_none() => {
                self.broken = Some(Broken::Fallback(
                    "Teams gave the stream no id (streaming is not supported here)".into(),
                ));
            }
            Ok(_) => {}
            // Throttled: this update is skipped; the next one carries the whole text so far.
            Err(error) if error.status() == Some(429) => {
                tracing::debug!("a streaming update was throttled (429); skipped");
            }
            Err(error) => self.broken = Some(classify(&error)),
        }
    }

    /// Ends the stream with `final_message` (a message activity carrying the answer), or says
    /// how the answer must go instead.
    pub async fn finish(mut self, mut final_message: Value) -> Ending {
        if self.broken.is_none() && self.started.elapsed() >= self.settings.max_duration {
            self.broken = Some(Broken::Fallback(
                "the answer took longer than Teams lets a stream run".into(),
            ));
        }
        let over_time = self.started.elapsed() >= self.settings.max_duration;
        let stream_id = match (self.broken.take(), self.stream_id.clone()) {
            (Some(Broken::Cancelled), _) => return count(Ending::Cancelled),
            // A stream that started is closed by its final message, not left open beside a
            // second message; only if Teams refuses that too does a new message follow.
            (Some(Broken::Fallback(_)), Some(id)) if !over_time => id,
            (Some(Broken::Fallback(reason)), _) => return count(Ending::Fallback(reason)),
            (None, None) => return count(Ending::Fallback("the stream never started".into())),
            (None, Some(id)) => id,
        };
        let entities = final_message
            .get_mut("entities")
            .and_then(Value::as_array_mut)
            .map(std::mem::take)
            .unwrap_or_default();
        let mut entities = entities;
        entities.push(json!({"type": "streaminfo", "streamId": stream_id, "streamType": "final"}));
        final_message["entities"] = Value::Array(entities);
        final_message["id"] = json!(stream_id);
        merge_channel_data(
            &mut final_message,
            json!({"streamId": stream_id, "streamType": "final"}),
        );
        match self
            .connector
            .send(self.route, None, &final_message, Delivery::Retried)
            .await
        {
            Ok(_) => count(Ending::Completed {
                id: Some(stream_id),
            }),
            Err(error) => match classify(&error) {
                Broken::Cancelled => count(Ending::Cancelled),
                Broken::Fallback(reason) => count(Ending::Fallback(reason)),
            },
        }
    }
}

fn count(ending: Ending) -> Ending {
    let outcome = match ending {
        Ending::Completed { .. } => "completed",
        Ending::Fallback(_) => "fallback",
        Ending::Cancelled => "cancelled",
    };
    counter!(STREAMS, "outcome" => outcome).increment(1);
    ending
}

/// protocol.md §4.4: a 403 that says the user cancelled ends the answer; anything else (403 not
/// allowed or ended, 400 not enabled, 429, errors) falls back to one message.
fn classify(error: &ConnectorError) -> Broken {
    let detail = error.detail().to_ascii_lowercase();
    if error.status() == Some(403) && detail.contains("cancel") {
        return Broken::Cancelled;
    }
    Broken::Fallback(error.to_string())
}

fn merge_channel_data(activity: &mut Value, fields: Value) {
    match (activity.get_mut("channelData"), fields) {
        (Some(Value::Object(existing)), Value::Object(fields)) => existing.extend(fields),
        (_, fields) => activity["channelData"] = fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancellation_is_told_apart_from_refusals() {
        let refused = |status, detail: &str| ConnectorError::Rejected {
            status,
            detail: detail.into(),
        };
        assert_eq!(
            classify(&refused(
                403,
                r#"{"error":{"code":"ContentStreamNotAllowed","message":"Content stream was cancelled by user."}}"#
            )),
            Broken::Cancelled
        );
        assert!(matches!(
            classify(&refused(
                403,
                r#"{"error":{"code":"ContentStreamNotAllowed","message":"Content stream is not allowed"}}"#
            )),
            Broken::Fallback(_)
        ));
        assert!(matches!(
            classify(&refused(429, "API calls quota exceeded")),
            Broken::Fallback(_)
        ));
    }

    #[test]
    fn channel_data_is_merged() {
        let mut a = json!({"channelData": {"feedbackLoopEnabled": true}});
        merge_channel_data(&mut a, json!({"streamType": "final"}));
        assert_eq!(
            a["channelData"],
            json!({"feedbackLoopEnabled": true, "streamType": "final"})
        );
        let mut b = json!({});
        merge_channel_data(&mut b, json!({"streamId": "1"}));
        assert_eq!(b["channelData"]["streamId"], "1");
    }
}
