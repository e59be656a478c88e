//! Teams Workflows webhooks as broadcast recipients: the message is POSTed to the workflow's
//! URL as an Adaptive Card (Workflows take cards only, about 28 KB), with no bot identity. The
//! URL carries its credential (`sig=`), so it is stored sealed and opened only to send; it goes
//! through the same outbound policy as backend URLs. Workflows answer 202 before they post, so
//! an accepted request is `sent` (without an activity id: its copy cannot be updated later).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::broadcasts::Message;
use super::destinations::{Destination, Target};
use crate::backend::egress::EgressPolicy;

/// Opens a sealed Workflows URL of a destination (its id, the sealed value).
pub type Opener = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// What Workflows accept at most.
const MAX_CARD_BYTES: usize = 28 * 1024;
const ATTEMPTS: u32 = 3;

pub struct Workflows {
    http: reqwest::Client,
    egress: Arc<EgressPolicy>,
    open: Opener,
}

impl Workflows {
    pub fn new(http: reqwest::Client, egress: Arc<EgressPolicy>, open: Opener) -> Self {
        Self { http, egress, open }
    }

    /// Posts `message` to the destination's workflow; the reason when it was not accepted.
    pub async fn post(
        &self,
        destination: &Destination,
        message: &Message,
    ) -> Result<(), &'static str> {
        let Target::Workflow { url_sealed } = &destination.target else {
            return Err("error");
        };
        let url = (self.open)(&destination.id, url_sealed).ok_or("sealed_url_unreadable")?;
        let url = self
            .egress
            .admit(&url)
            .await
            .map_err(|_| "refused_by_policy")?;
        let payload = json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": card(message),
            }],
        });
        let body = payload.to_string();
        if body.len() > MAX_CARD_BYTES {
            return Err("too_large");
        }
        let mut wait = Duration::from_millis(500);
        for attempt in 1..=ATTEMPTS {
            let response = self
                .http
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            let retry = match response {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => match response.status().as_u16() {
                    404 => return Err("not_found"),
                    413 => return Err("too_large"),
                    429 | 500..=599 => true,
                    _ => return Err("error"),
                },
                // A connection refused never reached the workflow; a timeout may have.
                Err(error) if error.is_connect() => true,
                Err(_) => return Err("ambiguous"),
            };
            if !retry || attempt == ATTEMPTS {
                break;
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        Err("throttled_out")
    }
}

/// The message as one Adaptive Card: its first card attachment, else its text in a card.
fn card(message: &Message) -> Value {
    if let Some(card) = message.attachments.iter().find_map(|a| {
        (a.get("contentType").and_then(Value::as_str)
            == Some("application/vnd.microsoft.card.adaptive"))
        .then(|| a.get("content").cloned())
        .flatten()
    }) {
        return card;
    }
    json!({
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4",
        "body": [{
            "type": "TextBlock",
            "text": message.text.clone().unwrap_or_default(),
            "wrap": true,
        }],
    })
}
