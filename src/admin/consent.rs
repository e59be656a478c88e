//! Admin consent: how an organization connects itself to an integration (protocol.md §1.2).
//! The management API makes Microsoft's admin-consent URL for the integration's app with a
//! `state` the router signs (integration, a nonce, an expiry five minutes on, where to send the
//! admin afterwards, the caller's own state); Microsoft sends the admin back to the public
//! callback with that state and the consenting `tenant`. The callback trusts neither: the
//! state must carry the router's signature, be unexpired and unused (its nonce is claimed in the
//! store, once for every instance), and the tenant is connected only once Microsoft issued the
//! app a client-credentials token in it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::model::{self, Invalid};
use super::paging::{ListQuery, Position};
use super::secrets::Sealer;
use super::{Admin, ApiError, ApiResult};
use crate::front::Body;
use crate::ledger::events::EventDraft;
use crate::notify::{Connection, ConnectionSource};
use crate::registry::Integration;
use crate::store::now_ms;
use crate::telemetry::CONSENT_CALLBACKS;

/// Where Microsoft sends the admin back (on `server.listen`, without an API key).
const CALLBACK_PATH: &str = crate::front::CONSENT_CALLBACK;
/// The caller's own `state`, carried through untouched.
const MAX_CALLER_STATE: usize = 512;
const STATE_CONTEXT: &[u8] = b"teams-router consent state\0";

/// What the signed state holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StateClaims {
    #[serde(rename = "i")]
    integration: String,
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "x")]
    expires_at_ms: u64,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    redirect_url: Option<String>,
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    caller_state: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum StateError {
    Forged,
    Expired,
}

fn signature(sealer: &Sealer, payload: &str) -> String {
    let mut data = STATE_CONTEXT.to_vec();
    data.extend_from_slice(payload.as_bytes());
    sealer.fingerprint(&data)
}

fn seal_state(sealer: &Sealer, claims: &StateClaims) -> String {
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signature = signature(sealer, &payload);
    format!("{payload}.{signature}")
}

fn open_state(sealer: &Sealer, raw: &str, now_ms: u64) -> Result<StateClaims, StateError> {
    let (payload, presented) = raw.split_once('.').ok_or(StateError::Forged)?;
    let expected = signature(sealer, payload);
    if !bool::from(expected.as_bytes().ct_eq(presented.as_bytes())) {
        return Err(StateError::Forged);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| StateError::Forged)?;
    let claims: StateClaims = serde_json::from_slice(&bytes).map_err(|_| StateError::Forged)?;
    if claims.expires_at_ms <= now_ms {
        return Err(StateError::Expired);
    }
    Ok(claims)
}

fn new_nonce() -> String {
    let bytes: [u8; 16] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `{login_url}/organizations/v2.0/adminconsent?client_id=…&scope=…&redirect_uri=…&state=…`
fn admin_consent_url(
    login_url: &str,
    app_id: &str,
    scope: &str,
    redirect_uri: &str,
    state: &str,
) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", app_id)
        .append_pair("scope", scope)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("state", state)
        .finish();
    format!(
        "{}/organizations/v2.0/adminconsent?{query}",
        login_url.trim_end_matches('/')
    )
}

/// The body of `POST …/connection/url`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConsentUrlRequest {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    redirect_url: Option<String>,
}

/// Microsoft's redirect to the callback.
#[derive(Debug, Default)]
struct CallbackQuery {
    state: Option<String>,
    tenant: Option<String>,
    scope: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl CallbackQuery {
    fn parse(query: Option<&str>) -> Self {
        let mut parsed = Self::default();
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let value = Some(value.into_owned());
            match key.as_ref() {
                "state" => parsed.state = value,
                "tenant" => parsed.tenant = value,
                "scope" => parsed.scope = value,
                "error" => parsed.error = value,
                "error_description" => parsed.error_description = value,
                _ => {}
            }
        }
        parsed
    }
}

/// A tenant id as Entra writes them (a GUID), or a verified domain name.
fn plausible_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 256
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl Admin {
    /// `POST /api/v1/integration/teams/{id}/connection/url`.
    pub(super) async fn consent_url(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let request: ConsentUrlRequest = if body.iter().all(u8::is_ascii_whitespace) {
            ConsentUrlRequest::default()
        } else {
            model::parse_body(body)?
        };
        if let Some(state) = &request.state
            && state.len() > MAX_CALLER_STATE
        {
            return Err(Invalid::field(
                "state",
                format!("state: {MAX_CALLER_STATE} bytes at most"),
            )
            .into());
        }
        let redirect_url = request.redirect_url.filter(|u| !u.is_empty());
        model::check_redirect_url("redirectUrl", redirect_url.as_deref())?;
        let Some(app_id) = integration.app_id() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "missing_credentials",
                "the integration has no botFrameworkAppId to ask consent for",
            ));
        };
        let Some(public_url) = self.settings.public_url.as_deref() else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "public_url_missing",
                "admin.public_url is not set: Microsoft needs the router's public address to send the admin back to",
            ));
        };
        let expires_at_ms = now_ms() + self.settings.consent_ttl_ms.max(1);
        let state = seal_state(
            &self.parts.vault.sealer,
            &StateClaims {
                integration: integration.record.id.clone(),
                nonce: new_nonce(),
                expires_at_ms,
                redirect_url,
                caller_state: request.state,
            },
        );
        let (login_url, scope) = self.consent_authority(&integration);
        let redirect_uri = format!("{}{CALLBACK_PATH}", public_url.trim_end_matches('/'));
        Ok(json!({
            "url": admin_consent_url(login_url, app_id, scope, &redirect_uri, &state),
            "expiresAt": model::iso_time(expires_at_ms),
        }))
    }

    /// The login URL and Graph scope of the integration's cloud.
    fn consent_authority<'a>(&'a self, integration: &'a Integration) -> (&'a str, &'a str) {
        match &integration.cloud {
            Some(cloud) => (cloud.login_url.as_str(), cloud.graph_scope.as_str()),
            None => (
                self.microsoft.login_url.as_str(),
                self.microsoft.graph_scope.as_str(),
            ),
        }
    }

    /// `GET /api/v1/integration/teams/{id}/connection/list`.
    pub(super) fn list_connections(
        &self,
        account: &str,
        id: &str,
        query: Option<&str>,
    ) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let items = self
            .parts
            .tenants
            .of_integration(&integration.record.id)
            .into_iter()
            .map(|c| {
                (
                    Position {
                        order: c.connected_at,
                        id: c.tenant_id.clone(),
                    },
                    c,
                )
            })
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(connection_view).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    /// `POST /api/v1/integration/teams/{id}/connection/{tenantId}/delete`.
    pub(super) async fn delete_connection(
        &self,
        account: &str,
        id: &str,
        tenant: &str,
    ) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let removed = self
            .parts
            .tenants
            .disconnect(&integration.record.id, tenant)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            })?;
        if !removed {
            return Err(ApiError::not_found("connection"));
        }
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("tenant.disconnected").message(format!("tenant {tenant}")),
        );
        Ok(json!({"id": tenant, "tenantId": tenant}))
    }

    /// `GET /api/v1/teams/consent/callback`: Microsoft's redirect after an admin consented (or
    /// refused). Answers a redirect or a small HTML page, never JSON: a browser shows it.
    pub(super) async fn consent_callback(&self, query: Option<&str>) -> Response<Body> {
        let query = CallbackQuery::parse(query);
        let now = now_ms();
        let claims = match query
            .state
            .as_deref()
            .map(|raw| open_state(&self.parts.vault.sealer, raw, now))
        {
            Some(Ok(claims)) => claims,
            Some(Err(StateError::Expired)) => {
                return failed(
                    "expired_state",
                    "This consent link has expired. Ask for a new one and try again.",
                );
            }
            Some(Err(StateError::Forged)) | None => {
                return failed(
                    "invalid_state",
                    "This consent response was not started by this router.",
                );
            }
        };
        let Some(integration) = self.parts.registry.integration(&claims.integration) else {
            return failed(
                "unknown_integration",
                "The integration this consent was for no longer exists.",
            );
        };
        // A refusal carries `admin_consent=True` too: the error decides.
        if let Some(error) = &query.error {
            let description = query.error_description.as_deref().unwrap_or_default();
            self.parts.sink.record(
                &integration.id,
                EventDraft::new("tenant.consent_refused")
                    .reason(error.clone())
                    .message(first_line(description)),
            );
            return failed(
                "refused",
                &format!(
                    "The organization was not connected: Microsoft answered {error}. {}",
                    first_line(description)
                ),
            );
        }
        let Some(tenant) = query.tenant.filter(|t| plausible_tenant(t)) else {
            return failed(
                "no_token",
                "Microsoft's answer names no organization to connect.",
            );
        };
        match self
            .parts
            .vault
            .store
            .claim(
                &format!("consent-state:{}", claims.nonce),
                // Past its expiry a state is refused anyway.
                Duration::from_millis(self.settings.consent_ttl_ms.max(1)),
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return failed(
                    "reused_state",
                    "This consent link was already used. Ask for a new one if the organization is not connected.",
                );
            }
            Err(error) => {
                tracing::warn!(%error, "consent state not claimed: the store is unavailable");
                return failed(
                    "store_unavailable",
                    "The router cannot record the connection right now. Try again in a minute.",
                );
            }
        }
        let (_, scope) = self.consent_authority(&integration);
        let issued = match integration.credentials.as_deref() {
            Some(credentials) => self
                .parts
                .connector
                .tokens()
                .token_in_tenant(credentials, &tenant, scope)
                .await
                .map_err(|e| e.to_string()),
            None => Err("the integration has no app credentials".to_owned()),
        };
        if let Err(why) = issued {
            self.parts.sink.record(
                &integration.id,
                EventDraft::new("tenant.consent_failed")
                    .reason("no_token")
                    .message(format!("tenant {tenant}: {why}")),
            );
            return failed(
                "no_token",
                "Microsoft did not issue the app a token in this organization, so it was not connected. Check that the consent was granted for this app.",
            );
        }
        if let Err(error) = self
            .parts
            .tenants
            .connect(
                &integration.record.id,
                &tenant,
                ConnectionSource::Consent,
                query.scope.filter(|s| !s.is_empty()),
            )
            .await
        {
            tracing::warn!(%error, "a consented tenant was not stored");
            return failed(
                "store_unavailable",
                "The router cannot record the connection right now. Try again in a minute.",
            );
        }
        metrics::counter!(CONSENT_CALLBACKS, "outcome" => "connected").increment(1);
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("tenant.connected").message(format!("tenant {tenant} (admin consent)")),
        );
        match claims
            .redirect_url
            .or_else(|| integration.record.consent_redirect_url.clone())
            .and_then(|url| url::Url::parse(&url).ok())
        {
            Some(mut back) => {
                back.query_pairs_mut().append_pair("tenant", &tenant);
                if let Some(state) = &claims.caller_state {
                    back.query_pairs_mut().append_pair("state", state);
                }
                redirect(back.as_str())
            }
            None => page(
                StatusCode::OK,
                "Organization connected",
                &format!("Your organization ({tenant}) is connected. You can close this window."),
            ),
        }
    }
}

/// A connection as the API shows it.
fn connection_view(connection: &Connection) -> Value {
    json!({
        "id": connection.tenant_id,
        "tenantId": connection.tenant_id,
        "source": connection.source.as_str(),
        "scope": connection.scope,
        "graphConsent": connection.has_graph_consent(),
        "createdAt": model::iso_time(connection.connected_at),
        "updatedAt": model::iso_time(connection.updated_at),
    })
}

fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// The error page of a callback that connected nothing, counted by outcome.
fn failed(outcome: &'static str, message: &str) -> Response<Body> {
    metrics::counter!(CONSENT_CALLBACKS, "outcome" => outcome).increment(1);
    page(
        StatusCode::BAD_REQUEST,
        "Organization not connected",
        message,
    )
}

fn redirect(location: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    no_store(&mut response);
    response
}

fn page(status: StatusCode, title: &str, message: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{message}</p></body></html>\n",
        title = escape(title),
        message = escape(message),
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    no_store(&mut response);
    response
}

/// The callback's answers are about one admin's browser session.
fn no_store(response: &mut Response<Body>) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        header::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn test_sealer() -> Arc<Sealer> {
        Arc::new(Sealer::from_key(&[7u8; 32]).expect("key"))
    }

    fn claims(expires_at_ms: u64) -> StateClaims {
        StateClaims {
            integration: "teams_prod".into(),
            nonce: new_nonce(),
            expires_at_ms,
            redirect_url: Some("https://app.example.com/done".into()),
            caller_state: Some("caller".into()),
        }
    }

    #[test]
    fn a_state_opens_only_with_its_signature_and_before_it_expires() {
        let sealer = test_sealer();
        let sealed = seal_state(&sealer, &claims(2_000));
        assert_eq!(open_state(&sealer, &sealed, 1_000), Ok(claims_of(&sealed)));
        assert_eq!(
            open_state(&sealer, &sealed, 2_000),
            Err(StateError::Expired)
        );
        let (payload, signature) = sealed.split_once('.').unwrap();
        let mut forged =
            serde_json::from_slice::<StateClaims>(&URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap();
        forged.integration = "teams_other".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            open_state(&sealer, &format!("{forged_payload}.{signature}"), 1_000),
            Err(StateError::Forged)
        );
        let other = Arc::new(Sealer::from_key(&[8u8; 32]).expect("key"));
        assert_eq!(open_state(&other, &sealed, 1_000), Err(StateError::Forged));
        assert_eq!(
            open_state(&sealer, "nonsense", 1_000),
            Err(StateError::Forged)
        );
    }

    fn claims_of(sealed: &str) -> StateClaims {
        let payload = sealed.split_once('.').unwrap().0;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    }

    #[test]
    fn the_consent_url_is_microsofts() {
        let url = admin_consent_url(
            "https://login.microsoftonline.com/",
            "app-1",
            "https://graph.microsoft.com/.default",
            "https://router.example.com/api/v1/teams/consent/callback",
            "s.t",
        );
        assert_eq!(
            url,
            "https://login.microsoftonline.com/organizations/v2.0/adminconsent?client_id=app-1\
             &scope=https%3A%2F%2Fgraph.microsoft.com%2F.default\
             &redirect_uri=https%3A%2F%2Frouter.example.com%2Fapi%2Fv1%2Fteams%2Fconsent%2Fcallback\
             &state=s.t"
        );
    }

    #[test]
    fn pages_escape_what_they_quote() {
        assert_eq!(
            escape("<b>\"x\" & 'y'</b>"),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
        assert!(plausible_tenant("b28fdbfd-2b78-4f93-b0f8-8881793f0f8f"));
        assert!(plausible_tenant("contoso.onmicrosoft.com"));
        assert!(!plausible_tenant("a/b") && !plausible_tenant(""));
    }
}
