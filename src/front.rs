//! The HTTP front: hyper (HTTP/1.1 keep-alive and HTTP/2, optional TLS), routes, limits and
//! status codes. An activity goes: body limit → integration lookup → token verification →
//! one borrowed parse of the activity → activity checks (endorsement, serviceurl, tenant) → routed
//! to its conversation. Only an invoke waits for the bot; everything else is answered as soon as
//! its conversation has queued it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::activity::{Envelope, ParseError, TurnActivity, admissible, parse_turn};
use crate::auth::{AuthError, VerifiedToken, Verifiers};
use crate::backend::InvokeResponse;
use crate::config::OnStoreUnavailable;
use crate::connector::{Connector, service_url_allowed};
use crate::conversation::admission::{Gate, Refusal, Ticket, WaitMeter};
use crate::conversation::{Admission, Arrival, Directory, InvokeAnswer};
use crate::ledger::addresses::AddressBook;
use crate::ledger::events::{EventDraft, EventSink};
use crate::notify::destinations::Reachability;
use crate::notify::{ConnectionSource, Destinations, Tenants};
use crate::ownership::Owner;
use crate::registry::{Integration, Registry};
use crate::reply::exchanges::{ExchangeRequest, TOKEN_EXCHANGE};
use crate::store::writer::Journal;
use crate::store::{Receipt, StoreError};
use crate::telemetry::{
    self, ACTIVITIES_DUPLICATE, ACTIVITIES_IGNORED, INGRESS_DURATION, Readiness,
};

pub type Body = Full<Bytes>;

const CALLBACK_PREFIX: &str = "/api/v1/integration/teams/";
const CALLBACK_SUFFIX: &str = "/callback";
/// Microsoft's admin-consent redirect: public, answered by the management API, on this listener
/// even when the API has its own (the operator registers this address with Microsoft).
pub const CONSENT_CALLBACK: &str = "/api/v1/teams/consent/callback";

/// Something that answers HTTP requests on one listener.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// The management API as the front routes to it; `admin` implements it (the data path does not
/// import the management side).
pub trait ManagementApi: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
}

/// The management API on a listener of its own (`admin.listen`).
pub struct AdminListener {
    pub admin: Arc<dyn ManagementApi>,
}

impl Handler for AdminListener {
    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if request.uri().path().starts_with("/api/v1/") {
            return Arc::clone(&self.admin).handle(request, peer).await;
        }
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
}

/// Connection-level limits of a listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Accepts connections until `shutdown` flips, then lets open connections finish (bounded by
/// `drain_timeout`).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    limits: ListenerLimits,
    mut shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
    waits: Option<Arc<WaitMeter>>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(MeasuredExecutor(waits.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // HTTP/2 abuse bounds: headers (a Bot Connector request carries a few KB), streams the
    // client resets before they are served (rapid reset), and streams the router itself has to
    // reset; past the latter two the connection is closed with GOAWAY.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(1024))
        .keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    loop {
        // The permit is taken before accepting, so excess connections wait in the backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let service = service_fn(move |request| {
            let handler = Arc::clone(&handler);
            async move { Ok::<_, Infallible>(handler.handle(request, peer).await) }
        });
        let builder = Arc::clone(&builder);
        match &tls {
            None => {
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                spawn_measured(&waits, async move {
                    let _ = connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                let handshake_timeout = limits.header_read_timeout;
                spawn_measured(&waits, async move {
                    let tls_stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let connection = builder
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .into_owned();
                    let _ = watcher.watch(connection).await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}

/// Spawns a task that serves requests, its waits to run measured when the listener measures
/// them (admission sheds on them).
fn spawn_measured<F>(waits: &Option<Arc<WaitMeter>>, future: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match waits {
        Some(waits) => drop(tokio::spawn(waits.measure(Box::pin(future)))),
        None => drop(tokio::spawn(future)),
    }
}

/// hyper's executor for the tasks it spawns itself (an HTTP/2 connection's streams), measured as
/// the connections' own tasks are.
#[derive(Clone)]
struct MeasuredExecutor(Option<Arc<WaitMeter>>);

impl<F> hyper::rt::Executor<F> for MeasuredExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        spawn_measured(&self.0, future);
    }
}

/// Builds the TLS acceptor from PEM files (ALPN: h2, http/1.1).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("server.tls_cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls_key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS configuration: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The activity and management listener.
pub struct Front {
    /// The management API (everything under `/api/v1/` but the callbacks).
    pub admin: Arc<dyn ManagementApi>,
    /// False when the management API has a listener of its own (`admin.listen`).
    pub serves_admin: bool,
    /// Each integration's event log.
    pub events: EventSink,
    pub registry: Arc<Registry>,
    /// The tenants connected to each integration.
    pub tenants: Arc<Tenants>,
    /// Where notifications go; installation updates keep them true.
    pub destinations: Arc<Destinations>,
    /// Where proactive messages go, learned from traffic; installation updates keep it true.
    pub addresses: Arc<AddressBook>,
    /// Each cloud's token verifier.
    pub verifiers: Arc<Verifiers>,
    pub directory: Arc<Directory>,
    pub connector: Arc<Connector>,
    pub body_limit: u64,
    /// How long a request body may take to arrive after its headers.
    pub body_read_timeout: Duration,
    /// Bounds on pending activities, global and per integration.
    pub admission: Arc<Gate>,
    pub invoke_timeout: Duration,
    pub retry_after_secs: u64,
    pub required_endorsements: Vec<String>,
    /// Present under durable accept with the embedded store: activities are journaled before
    /// the 200.
    pub journal: Option<Arc<Journal>>,
    /// Present with a shared Redis store: activities go to their partition's stream.
    pub owner: Option<Arc<Owner>>,
    /// The 200 waits until the activity is recorded.
    pub durable_accept: bool,
    pub on_store_unavailable: OnStoreUnavailable,
}

impl Handler for Front {
    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let path = request.uri().path();
        let Some(integration_id) = path
            .strip_prefix(CALLBACK_PREFIX)
            .and_then(|rest| rest.strip_suffix(CALLBACK_SUFFIX))
            .filter(|id| !id.is_empty() && !id.contains('/'))
        else {
            if (self.serves_admin && path.starts_with("/api/v1/")) || path == CONSENT_CALLBACK {
                return Arc::clone(&self.admin).handle(request, peer).await;
            }
            return error(StatusCode::NOT_FOUND, "not_found", "no such route");
        };
        if request.method() != Method::POST {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "activities are POSTed",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        // The system's clock, not the router's (`crate::clock`): a latency histogram measures
        // real time, virtual or not.
        let started = Instant::now();
        let integration_id = integration_id.to_owned();
        let response = match self.activity(request, peer, &integration_id).await {
            Ok(response) => response,
            Err(rejection) => {
                telemetry::reject(rejection.reason);
                // Anyone can send what is refused before (or instead of) a verified token: it
                // is counted and summed up once a second, never logged one event per request,
                // so forged traffic cannot push real events out of the bounded log.
                let unauthenticated = matches!(
                    rejection.status,
                    StatusCode::UNAUTHORIZED | StatusCode::PAYLOAD_TOO_LARGE
                );
                match self.registry.integration(&integration_id) {
                    Some(integration) if unauthenticated => {
                        integration.count_refused(rejection.reason);
                    }
                    Some(integration) => self.events.record(
                        &integration.id,
                        EventDraft::new("callback.rejected")
                            .reason(rejection.reason)
                            .message(rejection.message.clone()),
                    ),
                    None => {}
                }
                tracing::debug!(integration = %integration_id, reason = rejection.reason, message = %rejection.message, "activity refused");
                rejection.into_response(self.retry_after_secs)
            }
        };
        histogram!(INGRESS_DURATION).record(started.elapsed().as_secs_f64());
        response
    }
}

/// Why an activity was refused: status, metric reason, one-line message.
#[derive(Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
    /// Refused before the body was read: the connection cannot carry another request.
    pub body_unread: bool,
}

impl Rejection {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            field: None,
            body_unread: false,
        }
    }

    fn before_body(self) -> Self {
        Self {
            body_unread: true,
            ..self
        }
    }

    fn auth(error: AuthError) -> Self {
        let status = match error {
            AuthError::DiscoveryUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self::new(status, error.reason(), error.to_string())
    }

    fn parse(error: ParseError) -> Self {
        match error {
            ParseError::Malformed(detail) => Self::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("malformed JSON: {detail}"),
            ),
            ParseError::TooDeep => Self::new(
                StatusCode::BAD_REQUEST,
                "too_deep",
                ParseError::TooDeep.to_string(),
            ),
            ParseError::MissingField(field) => Self {
                field: Some(field),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "missing_field",
                    format!("missing field: {field}"),
                )
            },
        }
    }

    fn into_response(self, retry_after_secs: u64) -> Response<Body> {
        let mut body = json!({"error": {"code": self.reason, "message": self.message}});
        if let Some(field) = self.field {
            body["error"]["field"] = json!(field);
        }
        let mut response = json_response(self.status, &body);
        let headers = response.headers_mut();
        match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        if self.body_unread || self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot be reused; saying so
            // keeps a client from sending its next request into a closing connection.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// An invoke waiting for the bot's answer.
#[derive(Debug)]
pub struct PendingInvoke {
    answer: InvokeAnswer,
    /// What Teams gets when the bot misses the deadline.
    deadline: DeadlineAnswer,
}

/// The answer to an invoke the bot did not answer in time.
#[derive(Debug, Clone)]
enum DeadlineAnswer {
    /// An Adaptive Card action: an error card (Teams shows it on the card).
    ErrorCard,
    /// A token exchange: 412, so the client falls back to the sign-in card.
    ExchangeFailed(ExchangeRequest),
    /// Anything else: 501, as the SDKs answer an unhandled invoke.
    NotImplemented,
}

impl DeadlineAnswer {
    /// Decided from the envelope; only a token exchange reads its `value`.
    fn of(envelope: &Envelope<'_>, activity: &TurnActivity) -> Self {
        if envelope.kind != "invoke" {
            return Self::NotImplemented;
        }
        match envelope.name {
            Some("adaptiveCard/action") => Self::ErrorCard,
            Some(TOKEN_EXCHANGE) => {
                Self::ExchangeFailed(ExchangeRequest::from_value(activity.value().as_ref()))
            }
            _ => Self::NotImplemented,
        }
    }
}

/// An activity its conversation took.
#[derive(Debug)]
pub enum Routed {
    /// Queued; an invoke carries the receiver of the bot's answer.
    Accepted(Option<PendingInvoke>),
    /// A redelivery, acknowledged and not run again; a redelivered invoke waits for the
    /// original's answer.
    Duplicate(Option<PendingInvoke>),
    /// Acknowledged and not given to the bot (the sender is not in `allowFrom`).
    Ignored,
}

impl Front {
    async fn activity(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        integration_id: &str,
    ) -> Result<Response<Body>, Rejection> {
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is over {} bytes", self.body_limit),
            )
        };
        let declared_length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_length.is_some_and(|n| n > self.body_limit) {
            return Err(too_large());
        }
        let integration = self
            .integration(integration_id)
            .map_err(Rejection::before_body)?;
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let verified = self
            .authenticate(&integration, authorization, peer)
            .await
            .map_err(Rejection::before_body)?;

        let body = tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(request.into_body(), self.body_limit as usize).collect(),
        )
        .await
        .map_err(|_| {
            Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {} ms",
                    self.body_read_timeout.as_millis()
                ),
            )
            .before_body()
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    "the body could not be read",
                )
            }
        })?
        .to_bytes();

        let routed = self
            .admit(
                self.journal.as_deref(),
                &integration,
                verified.as_deref(),
                body,
            )
            .await?;
        match routed {
            Routed::Duplicate(None) | Routed::Ignored => Ok(empty(StatusCode::OK)),
            Routed::Accepted(None) => Ok(empty(StatusCode::OK)),
            Routed::Accepted(Some(mut pending)) | Routed::Duplicate(Some(mut pending)) => {
                let answered = tokio::time::timeout(
                    self.invoke_timeout,
                    pending.answer.wait_for(Option::is_some),
                )
                .await
                .map(|answered| answered.map(|response| response.clone()));
                let response = match answered {
                    Ok(Ok(Some(response))) => response,
                    // The turn ended without an InvokeResponse (the bot gave none, or failed).
                    Ok(_) => return Ok(empty(StatusCode::NOT_IMPLEMENTED)),
                    Err(_) => {
                        tracing::warn!(integration = %integration.id, "invoke answer missed its deadline");
                        let answered_with = match pending.deadline {
                            DeadlineAnswer::ErrorCard => "an error card",
                            DeadlineAnswer::ExchangeFailed(_) => "412",
                            DeadlineAnswer::NotImplemented => "501",
                        };
                        self.events.record(
                            &integration.id,
                            EventDraft::new("invoke.timeout").message(format!(
                                "the bot did not answer the invoke within {} ms; Teams got {answered_with}",
                                self.invoke_timeout.as_millis()
                            )),
                        );
                        match &pending.deadline {
                            DeadlineAnswer::ErrorCard => {
                                InvokeResponse::error("Timeout", "the bot did not answer in time")
                            }
                            DeadlineAnswer::ExchangeFailed(request) => {
                                request.failed("the bot did not answer in time")
                            }
                            DeadlineAnswer::NotImplemented => {
                                return Ok(empty(StatusCode::NOT_IMPLEMENTED));
                            }
                        }
                    }
                };
                let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
                if response.body.is_null() {
                    return Ok(empty(status));
                }
                Ok(json_response(status, &response.body))
            }
        }
    }

    pub fn integration(&self, integration_id: &str) -> Result<Arc<Integration>, Rejection> {
        self.registry.integration(integration_id).ok_or_else(|| {
            Rejection::new(
                StatusCode::NOT_FOUND,
                "unknown_integration",
                "no such integration",
            )
        })
    }

    /// Verifies the token (or, in development mode, that the peer is on loopback).
    pub async fn authenticate(
        &self,
        integration: &Integration,
        authorization: Option<&[u8]>,
        peer: SocketAddr,
    ) -> Result<Option<Arc<VerifiedToken>>, Rejection> {
        match integration.app_id() {
            Some(app_id) => {
                // The [microsoft] section's verifier is borrowed, not cloned: no shared counter
                // is touched per request.
                let verified = match &integration.cloud {
                    None => {
                        self.verifiers
                            .default_verifier()
                            .verify(authorization, app_id)
                            .await
                    }
                    Some(cloud) => {
                        self.verifiers
                            .for_cloud(Some(cloud))
                            .verify(authorization, app_id)
                            .await
                    }
                };
                Ok(Some(verified.map_err(Rejection::auth)?))
            }
            None if !integration.is_development() => Err(Rejection::auth(AuthError::NoCredentials)),
            None if peer.ip().is_loopback() => Ok(None),
            None => Err(Rejection::auth(AuthError::NotLoopback)),
        }
    }

    /// The rest of the hot path: the activity's one parse, the checks that need it, and the
    /// hand-over of the parsed activity to its conversation. Under durable accept (`journal`),
    /// the body is journaled first (group commit), and a redelivery the conversation already
    /// saw, or that another instance claimed, is acknowledged unjournaled.
    pub async fn admit(
        &self,
        journal: Option<&Journal>,
        integration: &Integration,
        verified: Option<&VerifiedToken>,
        body: Bytes,
    ) -> Result<Routed, Rejection> {
        // Before the parse: nesting is bounded before any parser walks it.
        admissible(&body).map_err(Rejection::parse)?;
        let activity = Box::new(parse_turn(&body).map_err(Rejection::parse)?);
        // Only stamps that came with Microsoft's token: an unauthenticated sender (a development
        // integration) could move the base every age is measured from.
        let stale = verified.is_some() && self.admission.note_arrival(activity.timestamp());
        let target = {
            let envelope = activity.envelope().map_err(Rejection::parse)?;
            self.check(integration, verified, &envelope)?;
            self.check_tenant(integration, &envelope, activity.action())
                .await?;
            if matches!(envelope.kind, "installationUpdate" | "conversationUpdate") {
                self.note_installation(integration, &activity);
            }
            if !sender_allowed(integration, &envelope) {
                return Ok(self.ignore(integration, &envelope));
            }
            // The two ids are copied (a few bytes) so that the parse itself moves on to the turn.
            Target {
                type_index: telemetry::activity_type_index(envelope.kind),
                is_invoke: envelope.kind == "invoke",
                deadline: DeadlineAnswer::of(&envelope, &activity),
                conversation_id: envelope.conversation_id.into(),
                activity_id: envelope.id.into(),
                stale,
            }
        };
        if let Some(owner) = &self.owner
            && !target.is_invoke
        {
            return self
                .append_to_partition(owner, integration, &target, body, activity)
                .await;
        }
        if let Some(journal) = journal {
            return self
                .journal_and_route(journal, integration, &target, body, activity)
                .await;
        }
        let ticket = match self.take_place(integration, &target, Recorded::OnceTaken) {
            Ok(ticket) => ticket,
            Err(outcome) => return outcome,
        };
        self.route(integration, &target, activity, None, ticket)
    }

    /// The checks that need the parsed activity, in the SDKs' order.
    fn check(
        &self,
        integration: &Integration,
        verified: Option<&VerifiedToken>,
        envelope: &Envelope<'_>,
    ) -> Result<(), Rejection> {
        // A Teams integration takes Teams' channel only, unless it lists others.
        if !integration.takes_channel(envelope.channel_id) {
            return Err(Rejection::auth(AuthError::ChannelNotAllowed(
                envelope.channel_id.to_owned(),
            )));
        }
        if let Some(token) = verified {
            token
                .check_activity(
                    envelope.channel_id,
                    envelope.service_url,
                    &self.required_endorsements,
                )
                .map_err(Rejection::auth)?;
        }
        if let Some(tenant) = integration.tenant_id()
            && envelope.tenant_id != Some(tenant)
        {
            return Err(Rejection::new(
                StatusCode::FORBIDDEN,
                "tenant_mismatch",
                "the activity is not from this integration's tenant",
            ));
        }
        let allowed = if integration.is_development() {
            // Development replies go only to loopback; other https URLs are acknowledged and
            // left unanswered, but plain http is refused outright.
            !envelope.service_url.starts_with("http://")
                || service_url_allowed(envelope.service_url, &[])
        } else {
            self.connector.service_url_allowed(envelope.service_url)
        };
        if !allowed {
            return Err(Rejection {
                field: Some("serviceUrl"),
                ..Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "service_url_not_allowed",
                    "serviceUrl must be https on an allowed Bot Connector host (http only for loopback)",
                )
            });
        }
        Ok(())
    }

    /// Keeps the integration's destinations true to what Teams says (off the request path: a
    /// store write when something changed).
    fn note_installation(&self, integration: &Integration, activity: &TurnActivity) {
        let Some((teams, conversation, status, reason)) = installation_change(activity) else {
            return;
        };
        // In a personal chat, the user's address goes with the chat's.
        let user = activity.is_personal().then(|| activity.from_id()).flatten();
        let team_ids: Vec<&str> = teams.iter().map(String::as_str).collect();
        self.addresses.set_installed(
            &integration.id,
            &team_ids,
            conversation.as_deref(),
            user,
            status == Reachability::Active,
        );
        let owned_teams = teams;
        let (destinations, integration) =
            (Arc::clone(&self.destinations), Arc::clone(&integration.id));
        tokio::spawn(async move {
            let teams: Vec<&str> = owned_teams.iter().map(String::as_str).collect();
            destinations
                .mark(
                    &integration,
                    &teams,
                    conversation.as_deref(),
                    status,
                    reason,
                )
                .await;
        });
    }

    /// `tenantPolicy: connected` lets in connected tenants only; an installation of the app
    /// connects its tenant (under either policy), and is what lets an unconnected tenant in.
    async fn check_tenant(
        &self,
        integration: &Integration,
        envelope: &Envelope<'_>,
        action: Option<&str>,
    ) -> Result<(), Rejection> {
        let connected_only = integration.connected_tenants_only();
        let installs =
            envelope.kind == "installationUpdate" && action.is_some_and(|a| a.starts_with("add"));
        if !connected_only && !installs {
            return Ok(());
        }
        let Some(tenant) = envelope.tenant_id.filter(|t| !t.is_empty()) else {
            return if connected_only {
                Err(tenant_not_connected())
            } else {
                Ok(())
            };
        };
        if self.tenants.is_connected(&integration.id, tenant) {
            return Ok(());
        }
        if installs {
            // Rare, and what later activities of the tenant are checked against: the 200 waits
            // for the store (a refusal makes the Bot Connector deliver it again).
            return match self
                .tenants
                .connect(
                    &integration.id,
                    tenant,
                    ConnectionSource::Installation,
                    None,
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(error) if connected_only => Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("the installation's tenant cannot be connected: {error}"),
                )),
                Err(error) => {
                    tracing::warn!(%error, integration = %integration.id, "an installation's tenant was not connected");
                    Ok(())
                }
            };
        }
        Err(tenant_not_connected())
    }

    /// Shared Redis store: the activity goes to its partition's stream, whose holder (this
    /// instance or another) runs it; the 200 waits for Redis under durable accept.
    async fn append_to_partition(
        &self,
        owner: &Arc<Owner>,
        integration: &Integration,
        target: &Target,
        body: Bytes,
        activity: Box<TurnActivity>,
    ) -> Result<Routed, Rejection> {
        // The place bounds this instance's work and sheds when its runtime is saturated; the
        // turn itself takes one where its partition is held.
        let ticket = match self.unseen_with_place(integration, target, Recorded::OnceAnswered) {
            Ok(ticket) => ticket,
            Err(outcome) => return outcome,
        };
        if !self.durable_accept {
            let (owner, integration_id, target_ids) = (
                Arc::clone(owner),
                Arc::clone(&integration.id),
                (target.conversation_id.clone(), target.activity_id.clone()),
            );
            tokio::spawn(async move {
                let (conversation_id, activity_id) = target_ids;
                if let Err(error) = owner
                    .accept(
                        &integration_id,
                        &conversation_id,
                        &activity_id,
                        &body,
                        Some(activity),
                    )
                    .await
                {
                    tracing::warn!(%error, "an activity acknowledged without durable accept was not recorded; it is lost");
                }
                drop(ticket);
            });
            integration.count_received(target.type_index);
            return Ok(Routed::Accepted(None));
        }
        // Kept for the store-down fallback below; a parse is cheaper than a copy of the body.
        let fallback = matches!(self.on_store_unavailable, OnStoreUnavailable::Accept);
        let (handed, kept) = if fallback {
            (None, Some(activity))
        } else {
            (Some(activity), None)
        };
        let appended = owner
            .accept(
                &integration.id,
                &target.conversation_id,
                &target.activity_id,
                &body,
                handed,
            )
            .await;
        drop(ticket);
        match appended {
            Ok(true) => {
                integration.count_received(target.type_index);
                Ok(Routed::Accepted(None))
            }
            Ok(false) => Ok(self.redelivery(integration, target)),
            // In the stream already: running it here as well would run it twice.
            Err(error @ StoreError::NotReplicated(_)) => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the activity cannot be recorded durably: {error}"),
            )),
            Err(error) => match self.on_store_unavailable {
                OnStoreUnavailable::Refuse => Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("the activity cannot be recorded durably: {error}"),
                )),
                // Run here, unrecorded: the store is down, and its partitions' holders with it.
                OnStoreUnavailable::Accept => {
                    let ticket = match self.take_place(integration, target, Recorded::OnceAnswered)
                    {
                        Ok(ticket) => ticket,
                        Err(outcome) => return outcome,
                    };
                    let activity = match kept {
                        Some(activity) => activity,
                        None => Box::new(parse_turn(&body).map_err(Rejection::parse)?),
                    };
                    self.route(integration, target, activity, None, ticket)
                }
            },
        }
    }

    /// Durable accept: journals the activity, then routes it.
    async fn journal_and_route(
        &self,
        journal: &Journal,
        integration: &Integration,
        target: &Target,
        body: Bytes,
        activity: Box<TurnActivity>,
    ) -> Result<Routed, Rejection> {
        let ticket = match self.unseen_with_place(integration, target, Recorded::OnceTaken) {
            Ok(ticket) => ticket,
            Err(outcome) => return outcome,
        };
        let receipt = match journal
            .append(
                &integration.id,
                &target.conversation_id,
                &target.activity_id,
                &body,
            )
            .await
        {
            Ok((seq, true)) => Some(seq),
            Ok((_, false)) => return Ok(self.redelivery(integration, target)),
            Err(error) => match self.on_store_unavailable {
                OnStoreUnavailable::Refuse => {
                    return Err(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        format!("the activity cannot be recorded durably: {error}"),
                    ));
                }
                OnStoreUnavailable::Accept => None,
            },
        };
        let routed = self.route(
            integration,
            target,
            activity,
            receipt.map(Receipt::Journal),
            ticket,
        );
        if let (Ok(Routed::Duplicate(_)) | Err(_), Some(seq)) = (&routed, receipt) {
            journal.complete(seq);
        }
        routed
    }

    /// A redelivery of an activity the conversation has seen: acknowledged; an invoke gets the
    /// original's answer when this instance still has it.
    fn redelivery(&self, integration: &Integration, target: &Target) -> Routed {
        let answer = if target.is_invoke {
            self.directory.invoke_answer(
                &integration.id,
                &target.conversation_id,
                &target.activity_id,
            )
        } else {
            None
        };
        duplicate(integration, target, answer)
    }

    /// A place for an activity its conversation has not seen here (a redelivery of one it has
    /// is acknowledged at once, without a store write).
    fn unseen_with_place(
        &self,
        integration: &Integration,
        target: &Target,
        recorded: Recorded,
    ) -> Result<Ticket, Result<Routed, Rejection>> {
        if self.known(integration, target, recorded) {
            return Err(Ok(self.redelivery(integration, target)));
        }
        self.take_place(integration, target, recorded)
    }

    /// Whether this instance knows the activity well enough to acknowledge a redelivery of it
    /// without recording it again.
    fn known(&self, integration: &Integration, target: &Target, recorded: Recorded) -> bool {
        let (conversation, activity) = (&target.conversation_id, &target.activity_id);
        match recorded {
            Recorded::OnceTaken => self.directory.seen(&integration.id, conversation, activity),
            Recorded::OnceAnswered => {
                self.directory
                    .answered(&integration.id, conversation, activity)
            }
        }
    }

    /// A place among pending activities, or the answer when there is none: a redelivery of
    /// something already seen is still acknowledged as a duplicate, anything else is shed.
    fn take_place(
        &self,
        integration: &Integration,
        target: &Target,
        recorded: Recorded,
    ) -> Result<Ticket, Result<Routed, Rejection>> {
        let admitted = match target.stale {
            true => Err(Refusal::Stale),
            false => self.admission.admit(&integration.id),
        };
        let refusal = match admitted {
            Ok(ticket) => return Ok(ticket),
            Err(refusal) => refusal,
        };
        if self.known(integration, target, recorded) {
            return Err(Ok(self.redelivery(integration, target)));
        }
        Err(Err(match refusal {
            Refusal::Integration => Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "integration_overloaded",
                "this integration has too many activities pending",
            ),
            Refusal::Global => Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the router has too many activities pending",
            ),
            Refusal::Stale => Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the router is behind: this activity arrived too late to be answered in time",
            ),
        }))
    }

    fn route(
        &self,
        integration: &Integration,
        target: &Target,
        activity: Box<TurnActivity>,
        receipt: Option<Receipt>,
        ticket: Ticket,
    ) -> Result<Routed, Rejection> {
        let admission = self.directory.accept(
            &integration.id,
            &target.conversation_id,
            &target.activity_id,
            Arrival {
                activity,
                is_invoke: target.is_invoke,
                receipt,
                ticket: Some(ticket),
            },
        );
        match admission {
            Admission::Accepted(answer) => {
                integration.count_received(target.type_index);
                Ok(Routed::Accepted(answer.map(|answer| PendingInvoke {
                    answer,
                    deadline: target.deadline.clone(),
                })))
            }
            Admission::Duplicate(answer) => Ok(duplicate(integration, target, answer)),
            Admission::MailboxFull => Err(Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                "mailbox_full",
                "this conversation has too many activities waiting",
            )),
            Admission::Overloaded => Err(Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many conversations in memory",
            )),
        }
    }
}

impl Front {
    /// Acknowledges an activity whose sender `allowFrom` leaves out, without a turn.
    fn ignore(&self, integration: &Integration, envelope: &Envelope<'_>) -> Routed {
        counter!(ACTIVITIES_IGNORED, "reason" => "sender_not_allowed").increment(1);
        self.events.record(
            &integration.id,
            EventDraft::new("callback.ignored")
                .activity(envelope.kind, envelope.id)
                .reason("sender_not_allowed"),
        );
        Routed::Ignored
    }
}

/// Whether `allowFrom` lets this activity's sender reach the bot. Everything a sender causes is
/// filtered (messages and their edits and deletions, invokes, reactions, events); membership and
/// installation updates always pass, so the bot learns where it is installed.
fn sender_allowed(integration: &Integration, envelope: &Envelope<'_>) -> bool {
    let Some(allow) = &integration.allow_from else {
        return true;
    };
    if matches!(envelope.kind, "conversationUpdate" | "installationUpdate") {
        return true;
    }
    allow.allows(
        envelope.from_id,
        envelope.from_aad_object_id,
        envelope.tenant_id,
    )
}

/// What an installation or membership update says about where the bot can post: the team (by
/// both its ids), the conversation, and whether the bot is there.
fn installation_change(
    activity: &TurnActivity,
) -> Option<(Vec<String>, Option<String>, Reachability, &'static str)> {
    let channel_data = activity.channel_data();
    let text = |pointer: &str| {
        channel_data
            .as_ref()
            .and_then(|d| d.pointer(pointer))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let team_ids: Vec<String> = [text("/team/id"), text("/team/aadGroupId")]
        .into_iter()
        .flatten()
        .collect();
    let conversation = Some(activity.conversation_id().to_owned());
    match activity.kind() {
        "installationUpdate" => match activity.action() {
            Some(action) if action.starts_with("remove") => Some((
                team_ids,
                conversation,
                Reachability::NotInstalled,
                "the app was uninstalled (installationUpdate remove)",
            )),
            Some(action) if action.starts_with("add") => {
                Some((team_ids, conversation, Reachability::Active, ""))
            }
            _ => None,
        },
        "conversationUpdate" => match activity.event_type().filter(|e| !e.is_empty()) {
            Some("teamDeleted") => Some((
                team_ids,
                None,
                Reachability::NotInstalled,
                "the team was deleted",
            )),
            Some("teamRestored") => Some((team_ids, None, Reachability::Active, "")),
            Some("channelDeleted") => Some((
                Vec::new(),
                text("/channel/id"),
                Reachability::NotInstalled,
                "the channel was deleted",
            )),
            Some("channelRestored") => {
                Some((Vec::new(), text("/channel/id"), Reachability::Active, ""))
            }
            _ if activity.bot_was_removed() => Some((
                team_ids,
                conversation,
                Reachability::NotInstalled,
                "the bot was removed (conversationUpdate membersRemoved)",
            )),
            _ if activity.bot_was_added() => {
                Some((team_ids, conversation, Reachability::Active, ""))
            }
            _ => None,
        },
        _ => None,
    }
}

fn tenant_not_connected() -> Rejection {
    Rejection::new(
        StatusCode::FORBIDDEN,
        "tenant_not_connected",
        "the activity's tenant is not connected to this integration (tenantPolicy: connected)",
    )
}

/// When an activity this instance has seen is surely recorded, so that a redelivery of it can be
/// acknowledged without recording it again.
#[derive(Clone, Copy)]
enum Recorded {
    /// Once its conversation took it: it was journaled (or taken unrecorded) before that.
    OnceTaken,
    /// Only once it was answered: a partition's holder reads what its Redis master has, before
    /// the replicas asked for confirm it (the accepting request is refused then). A master that
    /// fails takes such an entry along, and a holder that loses the partition drops its turn:
    /// a redelivery acknowledged on the strength of that read would be lost with it. Refused
    /// instead, it is appended again (a duplicate where the first copy survived).
    OnceAnswered,
}

/// Where an activity goes.
struct Target {
    type_index: usize,
    is_invoke: bool,
    /// What an invoke gets if the bot misses the deadline.
    deadline: DeadlineAnswer,
    conversation_id: Box<str>,
    activity_id: Box<str>,
    /// Arrived too late to be answered in time while late arrivals are shed: refused.
    stale: bool,
}

fn duplicate(integration: &Integration, target: &Target, answer: Option<InvokeAnswer>) -> Routed {
    integration.count_received(target.type_index);
    counter!(ACTIVITIES_DUPLICATE).increment(1);
    Routed::Duplicate(answer.map(|answer| PendingInvoke {
        answer,
        deadline: target.deadline.clone(),
    }))
}

/// The ops listener: `/metrics`, `/healthz`, `/readyz`.
pub struct Ops {
    pub metrics: PrometheusHandle,
    pub readiness: Arc<Readiness>,
}

impl Handler for Ops {
    async fn handle(&self, request: Request<Incoming>, _peer: SocketAddr) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            );
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => match self.readiness.check() {
                Ok(()) => json_response(StatusCode::OK, &json!({"status": "ready"})),
                Err(why) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not ready", "reason": why}),
                ),
            },
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        }
    }
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}
