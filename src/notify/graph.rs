//! Microsoft Graph, app-only, for discovery: the teams of a tenant that consented to the app
//! (`GET /v1.0/teams`) and a team's channels (`GET /v1.0/teams/{id}/channels`, not
//! `/allChannels`), one page at a time. Graph pages with `@odata.nextLink`; the link goes back
//! to the caller as an opaque cursor and is followed only if it points at the same Graph list,
//! so a cursor cannot make the router send its token elsewhere.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use metrics::counter;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::connector::{Connector, TokenError};
use crate::registry::AppCredentials;
use crate::telemetry::CONNECTOR_REQUESTS;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Graph token: {0}")]
    Token(#[from] TokenError),
    #[error("Graph answered HTTP {status}: {detail}")]
    Refused { status: u16, detail: String },
    #[error("Graph unreachable: {0}")]
    Unreachable(String),
    #[error("Graph answered an invalid document: {0}")]
    Invalid(String),
    #[error("the cursor is not one this listing gave")]
    BadCursor,
}

/// Where an integration's Graph is and what its app-only tokens are for.
#[derive(Debug, Clone, Copy)]
pub struct GraphCloud<'a> {
    /// `https://graph.microsoft.com` (no trailing slash needed).
    pub base_url: &'a str,
    /// `https://graph.microsoft.com/.default`
    pub scope: &'a str,
}

/// A list Graph can page through.
#[derive(Debug, Clone, Copy)]
pub enum Listing<'a> {
    Teams,
    Channels { team_id: &'a str },
}

impl Listing<'_> {
    fn path(&self) -> String {
        match self {
            Self::Teams => "teams".to_owned(),
            Self::Channels { team_id } => format!(
                "teams/{}/channels",
                utf8_percent_encode(team_id, NON_ALPHANUMERIC)
            ),
        }
    }
}

/// One page: its items and the cursor of the next (none on the last).
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Value>,
    pub cursor: Option<String>,
}

pub struct Graph {
    http: reqwest::Client,
    connector: Arc<Connector>,
}

impl Graph {
    pub fn new(http: reqwest::Client, connector: Arc<Connector>) -> Self {
        Self { http, connector }
    }

    /// One page of `listing` in `tenant`: the first, or the one `cursor` names.
    pub async fn page(
        &self,
        credentials: &AppCredentials,
        tenant: &str,
        cloud: GraphCloud<'_>,
        listing: Listing<'_>,
        cursor: Option<&str>,
    ) -> Result<Page, GraphError> {
        let first = format!(
            "{}/v1.0/{}",
            cloud.base_url.trim_end_matches('/'),
            listing.path()
        );
        let url = match cursor.filter(|c| !c.is_empty()) {
            None => first.clone(),
            Some(cursor) => {
                let next = URL_SAFE_NO_PAD
                    .decode(cursor)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or(GraphError::BadCursor)?;
                if !follows(&next, &first) {
                    return Err(GraphError::BadCursor);
                }
                next
            }
        };
        let token = self
            .connector
            .tokens()
            .token_in_tenant(credentials, tenant, cloud.scope)
            .await?;
        let response = self
            .http
            .get(&url)
            .bearer_auth(&*token)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                counter!(CONNECTOR_REQUESTS, "op" => "graph", "status" => "error").increment(1);
                return Err(GraphError::Unreachable(error.without_url().to_string()));
            }
        };
        let status = response.status();
        counter!(CONNECTOR_REQUESTS, "op" => "graph", "status" => status.as_str().to_owned())
            .increment(1);
        let body: Value = response
            .json()
            .await
            .map_err(|e| GraphError::Invalid(e.to_string()))?;
        if !status.is_success() {
            let detail = body
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("no error code")
                .to_owned();
            return Err(GraphError::Refused {
                status: status.as_u16(),
                detail,
            });
        }
        let items = match body.get("value") {
            Some(Value::Array(items)) => items.clone(),
            _ => return Err(GraphError::Invalid("no `value` list".into())),
        };
        let cursor = body
            .get("@odata.nextLink")
            .and_then(Value::as_str)
            .filter(|next| follows(next, &first))
            .map(|next| URL_SAFE_NO_PAD.encode(next));
        Ok(Page { items, cursor })
    }
}

/// Whether `next` continues the list at `first` (same URL, another query).
fn follows(next: &str, first: &str) -> bool {
    next.strip_prefix(first)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
}

#[cfg(test)]
mod tests {
    use super::follows;

    #[test]
    fn a_cursor_follows_only_its_own_list() {
        let first = "https://graph.microsoft.com/v1.0/teams";
        assert!(follows(
            "https://graph.microsoft.com/v1.0/teams?$skiptoken=X",
            first
        ));
        assert!(!follows("https://evil.example.com/v1.0/teams?x", first));
        assert!(!follows(
            "https://graph.microsoft.com/v1.0/teamsX?$skiptoken=X",
            first
        ));
        assert!(!follows(
            "https://graph.microsoft.com/v1.0/teams/../users?x",
            first
        ));
    }
}
