//! The OpenAI-compatible backend: Chat Completions with `stream: true` at
//! `{baseUrl}/chat/completions`. The request holds the system prompt and the session's history
//! (oldest turns dropped first to stay within `backend.openai_history_max_chars`); the answer is
//! read as server-sent events, `data: {"choices":[{"delta":{"content":"..."}}]}` until
//! `data: [DONE]`, with a well-kept SSE parser (eventsource-stream).

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};

use super::{Answer, BackendError, Deltas, MAX_ANSWER_BODY_BYTES, TurnInput, capped};
use super::{HistoryEntry, Role};

/// Text a model may send for one turn at most.
const MAX_TEXT_BYTES: usize = 1 << 20;

pub struct OpenAi {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub system_prompt: Option<String>,
}

/// The messages of a turn: the system prompt, then as much recent history as fits in
/// `budget_chars` (the newest entry, the user's message, always goes).
pub fn messages(system: Option<&str>, history: &[HistoryEntry], budget_chars: usize) -> Vec<Value> {
    let mut kept = Vec::new();
    let mut used = 0;
    for entry in history.iter().rev() {
        let size = entry.text.chars().count();
        if !kept.is_empty() && used + size > budget_chars {
            break;
        }
        used += size;
        kept.push(entry);
    }
    let mut messages = Vec::with_capacity(kept.len() + 1);
    if let Some(system) = system.filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for entry in kept.into_iter().rev() {
        let role = match entry.role {
            Role::User => "user",
            Role::Bot => "assistant",
        };
        messages.push(json!({"role": role, "content": entry.text}));
    }
    messages
}

/// Reads a streamed Chat Completion (server-sent events until `data: [DONE]`), pushing each
/// content delta to `deltas`. The body is bounded by [`MAX_ANSWER_BODY_BYTES`].
pub async fn read_completion<S, B, E>(body: S, deltas: &Deltas) -> Result<Answer, BackendError>
where
    S: Stream<Item = Result<B, E>>,
    B: Into<Bytes>,
    E: std::fmt::Display,
{
    let body = std::pin::pin!(capped(body, MAX_ANSWER_BODY_BYTES));
    let mut text = String::new();
    let mut events = Box::pin(super::lines(body, b"\r\n")).eventsource();
    while let Some(event) = events.next().await {
        let event =
            event.map_err(|e| BackendError::Failed(format!("the event stream broke: {e}")))?;
        let data = event.data.trim();
        if data == "[DONE]" {
            break;
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| BackendError::Failed(format!("the model sent invalid JSON: {e}")))?;
        if let Some(error) = chunk.get("error") {
            return Err(BackendError::Failed(format!("the model failed: {error}")));
        }
        if let Some(delta) = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            if text.len() + delta.len() > MAX_TEXT_BYTES {
                return Err(BackendError::Failed(format!(
                    "the model's answer is over {MAX_TEXT_BYTES} bytes"
                )));
            }
            text.push_str(delta);
            deltas.push(delta);
        }
    }
    Ok(Answer::text((!text.is_empty()).then_some(text)))
}

impl OpenAi {
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
        history_budget: usize,
        input: &TurnInput<'_>,
        deltas: &Deltas,
    ) -> Result<Answer, BackendError> {
        let url = format!("{}/chat/completions", self.base_url.trim_end_matches('/'));
        let body = json!({
            "model": self.model,
            "stream": true,
            "messages": messages(self.system_prompt.as_deref(), input.history, history_budget),
            "user": input.session_id,
        });
        let exchange = async {
            let mut request = http.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.map_err(|e| {
                BackendError::Failed(format!(
                    "the model cannot be reached: {}",
                    super::egress::error_chain(&e.without_url())
                ))
            })?;
            let status = response.status();
            if !status.is_success() {
                return Err(BackendError::Failed(format!(
                    "the model answered HTTP {}",
                    status.as_u16()
                )));
            }
            read_completion(response.bytes_stream(), deltas).await
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            BackendError::Failed(format!(
                "the model did not answer within {} ms",
                timeout.as_millis()
            ))
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(role: Role, text: &str) -> HistoryEntry {
        HistoryEntry {
            role,
            text: text.into(),
            at_ms: 0,
            id: None,
        }
    }

    #[test]
    fn history_fits_the_budget_newest_first() {
        let history = [
            entry(Role::User, "aaaa"),
            entry(Role::Bot, "bbbb"),
            entry(Role::User, "cc"),
        ];
        let all = messages(Some("sys"), &history, 100);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0]["role"], "system");
        assert_eq!(all[2]["role"], "assistant");
        let some = messages(None, &history, 6);
        assert_eq!(some.len(), 2);
        assert_eq!(some[0]["content"], "bbbb");
        // The user's message goes even when it alone is over the budget.
        assert_eq!(messages(None, &history, 0).len(), 1);
    }
}
