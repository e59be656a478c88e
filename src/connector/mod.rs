//! The Bot Connector REST client (protocol.md §3): reply to and send into conversations, with the
//! outbound token, 429/412/5xx retries per Microsoft's guidance, and a refresh of the token after
//! a 401. A 5xx or timeout after the request was sent is ambiguous (the message may be posted),
//! so those retries are counted under their own reasons.

pub mod backoff;
pub mod pacing;
pub mod token;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use metrics::counter;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde_json::Value;

use crate::config::ConnectorConfig;
use crate::recent::{Owner, Recent};
use crate::registry::AppCredentials;
use crate::telemetry::{CONNECTOR_REQUESTS, CONNECTOR_RETRIES};
use backoff::{Backoff, parse_retry_after};
pub use token::{TokenError, TokenProvider};
use transport::{Failure, Transport};

/// Path segments keep only RFC 3986 unreserved characters; conversation ids carry `:`, `@`, `;`,
/// `=` and sometimes `/`, which must all be encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `POST v3/conversations/{id}/activities/{replyToId}`
    Reply,
    /// `POST v3/conversations/{id}/activities`
    Send,
    /// `PUT v3/conversations/{id}/activities/{activityId}`
    Update,
    /// `DELETE v3/conversations/{id}/activities/{activityId}`
    Delete,
    /// `POST v3/conversations`
    CreateConversation,
    /// `POST v3/conversations` with a first message (a new channel thread): not safe to repeat
    /// after an ambiguous failure, as the message may have been posted.
    CreateThread,
    /// `GET v3/conversations/{id}/pagedmembers`
    Members,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Reply => "reply",
            Op::Send => "send",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::CreateConversation | Op::CreateThread => "create_conversation",
            Op::Members => "members",
        }
    }

    fn method(self) -> hyper::Method {
        match self {
            Op::Reply | Op::Send | Op::CreateConversation | Op::CreateThread => hyper::Method::POST,
            Op::Update => hyper::Method::PUT,
            Op::Delete => hyper::Method::DELETE,
            Op::Members => hyper::Method::GET,
        }
    }
}

/// Where an outbound request goes and on whose behalf.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// None for a development-mode integration (no token).
    pub credentials: Option<&'a AppCredentials>,
    /// The tenant of the conversation (Teams limits each app per tenant).
    pub tenant: Option<&'a str>,
    pub service_url: &'a str,
    /// The conversation, or for a new conversation the user or channel it is created with.
    pub conversation_id: &'a str,
    /// The part of the app's Teams budget in the tenant this request may fill: 100 for live
    /// traffic, `broadcast.max_share` for broadcasts (which then leave the rest to it).
    pub budget_percent: u32,
}

/// How hard a request is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Retried on throttling and transient errors, as Microsoft advises.
    Retried,
    /// One attempt (a fresh token after a 401 aside): for streaming updates, whose failure the
    /// caller answers by falling back to one message.
    Once,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("service URL {0:?} is not allowed")]
    ServiceUrlNotAllowed(String),
    #[error("outbound token: {0}")]
    Token(#[from] TokenError),
    #[error("connector answered HTTP {status}: {detail}")]
    Rejected { status: u16, detail: String },
    #[error("connector request failed after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    /// A request that posts a message (a new channel thread) failed in a way that leaves open
    /// whether it was posted: not retried, so it is never posted twice.
    #[error(
        "the connector may have posted it ({last}); not retried, so that it is not posted twice"
    )]
    MayHavePosted { last: String },
    #[error(transparent)]
    QueueFull(#[from] pacing::QueueFull),
}

impl ConnectorError {
    /// The HTTP status the Connector refused with, if it did.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The Connector's error text (code and message), empty when it gave none.
    pub fn detail(&self) -> &str {
        match self {
            Self::Rejected { detail, .. }
            | Self::Exhausted { last: detail, .. }
            | Self::MayHavePosted { last: detail } => detail,
            _ => "",
        }
    }
}

pub struct Connector {
    transport: Transport,
    tokens: TokenProvider,
    backoff: Backoff,
    max_attempts: u32,
    retry_window: std::time::Duration,
    /// Set when the process starts shutting down: no retries past `max_attempts`.
    stopping: std::sync::atomic::AtomicBool,
    allowed_hosts: Vec<String>,
    proactive_service_url: String,
    /// Each service URL checked, when [`service_url_allowed`] allows it, as the prefix of the
    /// URIs sent under it: a Connector has few (one per region and tenant), and parsing one
    /// (scheme, host, IDNA) would cost the request path about a microsecond per activity and
    /// every send a few more.
    service_urls: moka::sync::Cache<Box<str>, Option<Arc<str>>>,
    /// This connector's entries in each thread's [`RECENT_SERVICE_URLS`].
    recent: Owner,
    pacer: pacing::Pacer,
}

thread_local! {
    /// The service URLs this thread looked up last, in front of the shared cache (a request
    /// and its reply each look one up).
    static RECENT_SERVICE_URLS: std::cell::RefCell<Recent<Option<Arc<str>>>> =
        const { std::cell::RefCell::new(Recent::new()) };
}

/// Distinct service URLs kept parsed; an attacker sending many forged ones only evicts them,
/// and they are parsed again.
const SERVICE_URLS: u64 = 4_096;

fn limits(pairs: &[[u64; 2]]) -> Vec<pacing::Limit> {
    pairs
        .iter()
        .map(|[window_ms, count]| pacing::Limit {
            window: Duration::from_millis(*window_ms),
            count: usize::try_from(*count).unwrap_or(usize::MAX),
        })
        .collect()
}

impl Connector {
    pub fn new(transport: Transport, tokens: TokenProvider, config: &ConnectorConfig) -> Self {
        Self {
            transport,
            tokens,
            backoff: Backoff {
                base: Duration::from_millis(config.backoff_base_ms),
                max: Duration::from_millis(config.backoff_max_ms),
                max_retry_after: Duration::from_secs(config.max_retry_after_secs),
            },
            max_attempts: config.max_attempts,
            retry_window: std::time::Duration::from_millis(config.retry_window_ms),
            stopping: std::sync::atomic::AtomicBool::new(false),
            allowed_hosts: config.allowed_service_hosts.clone(),
            proactive_service_url: config.proactive_service_url.clone(),
            service_urls: moka::sync::Cache::new(SERVICE_URLS),
            recent: Owner::new(),
            pacer: pacing::Pacer::new(
                limits(&config.conversation_limits),
                limits(&config.app_limits),
                config.max_queued,
            ),
        }
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// The service URL of a proactive send where none was learned: the cloud's global
    /// endpoint (protocol.md §3.1), `None` in China, which has none.
    pub fn proactive_service_url(&self, cloud: Option<&str>) -> Option<String> {
        match cloud {
            None => Some(self.proactive_service_url.clone()),
            Some("public") => Some("https://smba.trafficmanager.net/teams/".into()),
            Some("gcc") => Some("https://smba.infra.gcc.teams.microsoft.com/teams/".into()),
            Some("usgov-gcch") => Some("https://smba.infra.gov.teams.microsoft.us/teams/".into()),
            Some("usgov-dod") => Some("https://smba.infra.dod.teams.microsoft.us/teams/".into()),
            Some(_) => None,
        }
    }

    /// The outbound send logs (their idle entries are dropped periodically).
    pub fn pacer(&self) -> &pacing::Pacer {
        &self.pacer
    }

    /// Whether replies may go to `service_url`: https to an allowed host suffix, or any loopback
    /// host (http is accepted only there).
    /// The process is shutting down: deliveries stop retrying past `max_attempts`.
    pub fn stop_retrying(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn service_url_allowed(&self, service_url: &str) -> bool {
        self.parsed_service_url(service_url).is_some()
    }

    /// The prefix of the URIs under `service_url`, when replies may go there.
    fn parsed_service_url(&self, service_url: &str) -> Option<Arc<str>> {
        if let Some(parsed) =
            RECENT_SERVICE_URLS.with_borrow(|recent| recent.get(&self.recent, service_url))
        {
            return parsed;
        }
        let parsed = match self.service_urls.get(service_url) {
            Some(parsed) => parsed,
            None => {
                let parsed = checked_prefix(service_url, &self.allowed_hosts).map(Arc::from);
                self.service_urls.insert(service_url.into(), parsed.clone());
                parsed
            }
        };
        RECENT_SERVICE_URLS.with_borrow_mut(|recent| {
            recent.put(&self.recent, service_url, parsed.clone());
        });
        parsed
    }

    /// Sends `activity` into the conversation (as a reply to `reply_to_id` when given) and
    /// returns the id the Connector gave it (none on a 202 without body).
    pub async fn send(
        &self,
        route: Route<'_>,
        reply_to_id: Option<&str>,
        activity: &(impl Serialize + ?Sized),
        delivery: Delivery,
    ) -> Result<Option<String>, ConnectorError> {
        let (op, id) = match reply_to_id {
            Some(id) => (Op::Reply, Some(id)),
            None => (Op::Send, None),
        };
        let path = activities_path(route.conversation_id, id);
        let body = self
            .execute(op, route, &path, Some(json_body(activity)?), delivery)
            .await?;
        Ok(resource_id(&body))
    }

    /// Replaces an earlier message of the bot.
    pub async fn update(
        &self,
        route: Route<'_>,
        activity_id: &str,
        activity: &(impl Serialize + ?Sized),
    ) -> Result<Option<String>, ConnectorError> {
        let path = activities_path(route.conversation_id, Some(activity_id));
        let body = json_body(activity)?;
        let body = self
            .execute(Op::Update, route, &path, Some(body), Delivery::Retried)
            .await?;
        Ok(resource_id(&body))
    }

    /// Deletes an earlier message of the bot.
    pub async fn delete(&self, route: Route<'_>, activity_id: &str) -> Result<(), ConnectorError> {
        let path = activities_path(route.conversation_id, Some(activity_id));
        self.execute(Op::Delete, route, &path, None, Delivery::Retried)
            .await
            .map(drop)
    }

    /// `POST v3/conversations`: a new personal chat, or a new thread in a channel. Returns the
    /// `ConversationResourceResponse` (`id`, `activityId`, `serviceUrl`).
    pub async fn create_conversation(
        &self,
        route: Route<'_>,
        parameters: &Value,
    ) -> Result<Value, ConnectorError> {
        // A create that carries a first message (a new channel thread) posts it; a 1:1 create
        // without one is get-or-create and safe to repeat.
        let op = if parameters.get("activity").is_some() {
            Op::CreateThread
        } else {
            Op::CreateConversation
        };
        let body = json_body(parameters)?;
        let body = self
            .execute(
                op,
                route,
                "/v3/conversations",
                Some(body),
                Delivery::Retried,
            )
            .await?;
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// One page of a conversation's roster (`GET v3/conversations/{id}/pagedmembers`):
    /// `{"members": [...], "continuationToken"?}`.
    pub async fn paged_members(
        &self,
        route: Route<'_>,
        page_size: Option<u32>,
        continuation: Option<&str>,
    ) -> Result<Value, ConnectorError> {
        let mut path = String::from("/v3/conversations/");
        path.extend(utf8_percent_encode(route.conversation_id, PATH_SEGMENT));
        path.push_str("/pagedmembers");
        let query = {
            let mut query = url::form_urlencoded::Serializer::new(String::new());
            if let Some(size) = page_size {
                query.append_pair("pageSize", &size.to_string());
            }
            if let Some(token) = continuation {
                query.append_pair("continuationToken", token);
            }
            query.finish()
        };
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query);
        }
        let body = self
            .execute(Op::Members, route, &path, None, Delivery::Retried)
            .await?;
        serde_json::from_slice(&body).map_err(|e| ConnectorError::Rejected {
            status: 200,
            detail: format!("the roster page is not JSON: {e}"),
        })
    }

    /// Sends a typing indicator if the conversation's limits have room right now; it is never
    /// worth delaying or retrying (the answer itself follows).
    pub async fn send_typing(
        &self,
        route: Route<'_>,
        activity: &(impl Serialize + ?Sized),
    ) -> bool {
        let Some(service_url) = self.parsed_service_url(route.service_url) else {
            return false;
        };
        let Some(permit) = self.pacer.admit_now(
            app_id(&route),
            route.tenant.unwrap_or(""),
            route.conversation_id,
        ) else {
            return false;
        };
        let url = under(&service_url, &activities_path(route.conversation_id, None));
        let Ok(body) = json_body(activity) else {
            return false;
        };
        let sent = self
            .attempt(Op::Send, route, url, Some(body))
            .await
            .is_ok_and(|outcome| matches!(outcome, Attempt::Done(_)));
        drop(permit);
        sent
    }

    async fn attempt(
        &self,
        op: Op,
        route: Route<'_>,
        uri: String,
        body: Option<bytes::Bytes>,
    ) -> Result<Attempt, ConnectorError> {
        let token = match route.credentials {
            Some(credentials) => Some(self.tokens.token(credentials).await?),
            None => None,
        };
        let response = match self
            .transport
            .exchange(op.method(), uri, token.as_deref(), body)
            .await
        {
            Ok(response) => response,
            Err(failure) => {
                counter!(CONNECTOR_REQUESTS, "op" => op.label(), "status" => "error").increment(1);
                let (reason, last) = match failure {
                    Failure::Connect(last) => ("connect", last),
                    Failure::Ambiguous(last) => ("ambiguous_timeout", last),
                };
                return Ok(Attempt::Failed {
                    reason,
                    retry_after: None,
                    status: None,
                    last,
                });
            }
        };
        let status = response.status;
        counter!(CONNECTOR_REQUESTS, "op" => op.label(), "status" => status_label(status))
            .increment(1);
        if status.is_success() {
            return Ok(Attempt::Done(response.body));
        }
        let retry_after = response
            .headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let correlation = response
            .headers
            .get("x-correlating-operationid")
            .or_else(|| response.headers.get("ms-cv"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let detail: String = String::from_utf8_lossy(&response.body)
            .chars()
            .take(512)
            .collect();
        Ok(match classify(status) {
            Retry::Never => {
                tracing::warn!(op = op.label(), %status, %correlation, %detail, "connector refused the request");
                Attempt::Refused {
                    status: status.as_u16(),
                    detail,
                }
            }
            Retry::AfterTokenRefresh => Attempt::Unauthorized { detail },
            Retry::With(reason) => Attempt::Failed {
                reason,
                retry_after,
                status: Some(status.as_u16()),
                last: format!("HTTP {status} {detail}"),
            },
        })
    }

    /// One request to `path` (and query) under the route's service URL, with pacing, the token,
    /// and the retries `delivery` allows; returns the body.
    async fn execute(
        &self,
        op: Op,
        route: Route<'_>,
        path: &str,
        body: Option<bytes::Bytes>,
        delivery: Delivery,
    ) -> Result<bytes::Bytes, ConnectorError> {
        let Some(service_url) = self.parsed_service_url(route.service_url) else {
            return Err(ConnectorError::ServiceUrlNotAllowed(
                route.service_url.to_owned(),
            ));
        };
        let url = under(&service_url, path);
        let max_attempts = match delivery {
            Delivery::Retried => self.max_attempts,
            Delivery::Once => 1,
        };
        let posts_a_message = op == Op::CreateThread;
        let mut refreshed_token = false;
        let mut retry = 0;
        let mut attempt = 0;
        let first_attempt = crate::clock::now();
        loop {
            attempt += 1;
            let permit = self
                .pacer
                .admit_within(
                    app_id(&route),
                    route.tenant.unwrap_or(""),
                    route.conversation_id,
                    route.budget_percent,
                )
                .await?;
            let outcome = self.attempt(op, route, url.clone(), body.clone()).await;
            drop(permit);
            let (reason, retry_after, status, last) = match outcome? {
                Attempt::Done(bytes) => return Ok(bytes),
                Attempt::Refused { status, detail } => {
                    return Err(ConnectorError::Rejected { status, detail });
                }
                Attempt::Unauthorized { detail } => {
                    let Some(credentials) = route.credentials.filter(|_| !refreshed_token) else {
                        return Err(ConnectorError::Rejected {
                            status: 401,
                            detail,
                        });
                    };
                    refreshed_token = true;
                    self.tokens.invalidate(credentials).await;
                    counter!(CONNECTOR_RETRIES, "reason" => "unauthorized").increment(1);
                    // A fresh token is retried at once and does not use up an attempt.
                    attempt -= 1;
                    continue;
                }
                Attempt::Failed {
                    reason,
                    retry_after,
                    status,
                    last,
                } => (reason, retry_after, status, last),
            };
            if posts_a_message && reason.starts_with("ambiguous") {
                return Err(ConnectorError::MayHavePosted { last });
            }
            // A retried delivery outlives an outage of the connector up to the retry window (a
            // minute of 503s or 429s must not lose the answer); past both bounds it gives up. An
            // address that refuses connections is not a connector having a bad minute, and a
            // process shutting down does not wait: under durable accept the turn runs again at
            // the next start.
            let window_open = matches!(delivery, Delivery::Retried)
                && reason != "connect"
                && !self.stopping.load(std::sync::atomic::Ordering::Acquire)
                && first_attempt.elapsed() < self.retry_window;
            if attempt >= max_attempts && !window_open {
                if let (Delivery::Once, Some(status)) = (delivery, status) {
                    // The caller decides what a refused stream update means; it needs the status.
                    return Err(ConnectorError::Rejected {
                        status,
                        detail: last,
                    });
                }
                return Err(ConnectorError::Exhausted {
                    attempts: attempt,
                    last,
                });
            }
            counter!(CONNECTOR_RETRIES, "reason" => reason).increment(1);
            let wait = self.backoff.delay(retry, retry_after);
            retry += 1;
            tracing::debug!(
                op = op.label(),
                reason,
                ?wait,
                attempt,
                "retrying connector request"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

/// What one attempt came to.
enum Attempt {
    Done(bytes::Bytes),
    Refused {
        status: u16,
        detail: String,
    },
    Unauthorized {
        detail: String,
    },
    Failed {
        reason: &'static str,
        retry_after: Option<Duration>,
        status: Option<u16>,
        last: String,
    },
}

/// Teams limits each bot app per tenant.
/// The bot app whose pacing windows a send counts in (none in development mode).
fn app_id<'a>(route: &Route<'a>) -> &'a str {
    route.credentials.map_or("", |c| c.app_id.as_str())
}

enum Retry {
    Never,
    AfterTokenRefresh,
    With(&'static str),
}

/// Microsoft's guidance: retry 429 (honouring Retry-After), 412, 502, 503 and 504.
fn classify(status: StatusCode) -> Retry {
    match status.as_u16() {
        401 => Retry::AfterTokenRefresh,
        429 => Retry::With("throttled"),
        412 => Retry::With("precondition_failed"),
        502..=504 => Retry::With("ambiguous_5xx"),
        _ => Retry::Never,
    }
}

/// The status as a metric label, without an allocation for the ones a connector usually gives.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let label = match status.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => return status.as_str().to_owned().into(),
    };
    label.into()
}

/// The activity serialized once, for every attempt of its delivery.
fn json_body(activity: &(impl Serialize + ?Sized)) -> Result<bytes::Bytes, ConnectorError> {
    serde_json::to_vec(activity)
        .map(bytes::Bytes::from)
        .map_err(|e| ConnectorError::Rejected {
            status: 0,
            detail: format!("activity does not serialize: {e}"),
        })
}

/// The `id` of a `ResourceResponse`; nothing else of the answer is read.
fn resource_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ResourceResponse {
        id: Option<String>,
    }
    serde_json::from_slice::<ResourceResponse>(body).ok()?.id
}

/// `/v3/conversations/{id}/activities[/{replyToId}]`, encoding every id as one path segment.
pub fn activities_path(conversation_id: &str, reply_to_id: Option<&str>) -> String {
    let mut url = String::with_capacity(conversation_id.len() + 64);
    url.push_str("/v3/conversations/");
    url.extend(utf8_percent_encode(conversation_id, PATH_SEGMENT));
    url.push_str("/activities");
    if let Some(reply_to) = reply_to_id {
        url.push('/');
        url.extend(utf8_percent_encode(reply_to, PATH_SEGMENT));
    }
    url
}

/// The URI of `path` (which may end in a query) under a service URL's [`uri_prefix`].
fn under(prefix: &str, path: &str) -> String {
    let mut uri = String::with_capacity(prefix.len() + path.len());
    uri.push_str(prefix);
    uri.push_str(path);
    uri
}

/// The checked service URL as the start of every URI sent under it: scheme, authority and its
/// own path (a regional prefix) without the trailing `/`; query and fragment dropped. `None`
/// when the HTTP client would read another scheme or authority in it than `url::Url` did (the
/// host checked is the host connected to).
fn uri_prefix(url: &url::Url) -> Option<String> {
    let mut prefix = url[..url::Position::BeforePath].to_owned();
    prefix.push_str(url.path().trim_end_matches('/'));
    let uri = hyper::Uri::try_from(format!("{prefix}/")).ok()?;
    let same = uri.scheme_str() == Some(url.scheme())
        && uri.authority().map(hyper::http::uri::Authority::as_str)
            == Some(&url[url::Position::BeforeHost..url::Position::AfterPort]);
    same.then_some(prefix)
}

/// Whether replies may go to `service_url`: https to a host under an allowed suffix (or an
/// address listed as it is), or any loopback host (http is accepted only there). The host is the one the HTTP client will use:
/// `url::Url`'s parse, the same reqwest makes (a hand-split host and the client's can differ, as
/// for `https://evil.example\\.botframework.com/`). Backslashes and userinfo are refused outright.
pub fn service_url_allowed(service_url: &str, allowed_hosts: &[String]) -> bool {
    checked_prefix(service_url, allowed_hosts).is_some()
}

/// The [`uri_prefix`] of `service_url`, when replies may go there: one check for the request
/// path (development integrations included) and the client.
fn checked_prefix(service_url: &str, allowed_hosts: &[String]) -> Option<String> {
    allowed_service_url(service_url, allowed_hosts).and_then(|url| uri_prefix(&url))
}

/// The service URL parsed, when [`service_url_allowed`] allows it.
fn allowed_service_url(service_url: &str, allowed_hosts: &[String]) -> Option<url::Url> {
    if service_url.contains('\\') {
        return None;
    }
    let url = url::Url::parse(service_url).ok()?;
    if !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let https = match url.scheme() {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let listed = |host: &str| allowed_hosts.iter().any(|entry| entry == host);
    let allowed = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || https && listed(&ip.to_string()),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || https && listed(&ip.to_string()),
        Some(url::Host::Domain(host)) => {
            host.eq_ignore_ascii_case("localhost")
                || https && allowed_hosts.iter().any(|suffix| host_under(host, suffix))
        }
        None => false,
    };
    allowed.then_some(url)
}

/// `host` is `suffix` or a subdomain of it (ASCII case-insensitive).
fn host_under(host: &str, suffix: &str) -> bool {
    let suffix = suffix.trim_start_matches('.');
    host.len() >= suffix.len()
        && host.is_char_boundary(host.len() - suffix.len())
        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && (host.len() == suffix.len() || host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
}

/// True for a loopback service URL (development-mode integrations reply only there).
pub fn is_loopback_url(service_url: &str) -> bool {
    service_url_allowed(service_url, &[])
}

/// Shared client settings for everything outbound.
pub fn http_client(config: &ConnectorConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .user_agent(transport::USER_AGENT_VALUE)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activities_url(service_url: &str, conversation_id: &str, reply_to: Option<&str>) -> String {
        let prefix = checked_prefix(service_url, &[String::from("trafficmanager.net")]);
        let prefix = prefix.unwrap_or_else(|| panic!("{service_url} is allowed"));
        under(&prefix, &activities_path(conversation_id, reply_to))
    }

    #[test]
    fn urls_keep_the_regional_prefix_and_encode_ids() {
        assert_eq!(
            activities_url(
                "https://smba.trafficmanager.net/amer/50612dbb/",
                "19:abc@thread.tacv2;messageid=17",
                Some("17")
            ),
            "https://smba.trafficmanager.net/amer/50612dbb/v3/conversations/19%3Aabc%40thread.tacv2%3Bmessageid%3D17/activities/17"
        );
        assert_eq!(
            activities_url("https://smba.trafficmanager.net/teams", "a", None),
            "https://smba.trafficmanager.net/teams/v3/conversations/a/activities"
        );
        assert_eq!(
            activities_url("http://127.0.0.1:9/", "a/b c", None),
            "http://127.0.0.1:9/v3/conversations/a%2Fb%20c/activities"
        );
        assert_eq!(
            activities_url("http://127.0.0.1:9", "a", None),
            "http://127.0.0.1:9/v3/conversations/a/activities"
        );
        let members = checked_prefix("http://127.0.0.1:9/emea/", &[])
            .map(|prefix| under(&prefix, "/v3/conversations/a/pagedmembers?pageSize=5"));
        assert_eq!(
            members.as_deref(),
            Some("http://127.0.0.1:9/emea/v3/conversations/a/pagedmembers?pageSize=5")
        );
    }

    #[test]
    fn service_url_policy() {
        let allowed = ConnectorConfig::default().allowed_service_hosts;
        for (url, ok) in [
            ("https://smba.trafficmanager.net/amer/", true),
            ("https://SMBA.trafficmanager.net/amer/", true),
            ("https://evilsmba.trafficmanager.net.example/", false),
            ("https://example.com/", false),
            ("http://smba.trafficmanager.net/amer/", false),
            ("http://127.0.0.1:8080/", true),
            ("http://[::1]:8080/", true),
            ("http://localhost:1/", true),
            ("ftp://127.0.0.1/", false),
            ("not a url", false),
            ("https://smba.trafficmanager.net@evil.example/", false),
            ("https://evil.example#@smba.trafficmanager.net/", false),
            ("https://127.0.0.1.evil.example/", false),
            ("https://botframework.com:443/x", true),
            ("http://", false),
            // The client would connect to evil.example (a backslash ends the host in a URL).
            ("https://evil.example\\.botframework.com/", false),
            ("https://evil.example\\@smba.trafficmanager.net/", false),
            ("https://user:pw@smba.trafficmanager.net/", false),
            ("https://smba.trafficmanager.net.evil.example/", false),
            ("http://127.0.0.1\\@evil.example/", false),
        ] {
            assert_eq!(service_url_allowed(url, &allowed), ok, "{url}");
        }
    }
}
