//! The Microsoft side, on loopback: OpenID metadata and JWKS (with endorsements), the Entra
//! client-credentials token endpoint, and a Bot Connector that records every activity it gets.
//! Shapes follow protocol.md (§1.2 metadata and keys, §2.1 token request/response, §3 connector
//! REST API and error bodies). Faults are scripted: OpenID down, connector 429 + Retry-After,
//! 5xx, latency, revoked tokens.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock: a test that pauses its runtime moves the mock's windows and deadlines too.
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::keys::{CONNECTOR_ISSUER, SigningKey, connector_claims};

/// The bot OAuth scope of the public cloud.
const PUBLIC_SCOPE: &str = "https://api.botframework.com/.default";
/// Microsoft Graph's app-only scope (public cloud), granted to apps consented in a tenant.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// The regional prefix of the mock's service URL; the router must keep it in outbound paths.
pub const SERVICE_PATH_PREFIX: &str = "/amer/";

/// A scripted answer for the next connector request.
#[derive(Debug, Clone)]
pub enum ConnectorFault {
    /// 429 with `Retry-After: secs`.
    Throttle { retry_after_secs: u64 },
    /// Any status with the standard `ErrorResponse` body.
    Status(u16),
}

/// One activity the mock connector accepted.
#[derive(Debug, Clone)]
pub struct RecordedActivity {
    /// `POST` (send, reply), `PUT` (update) or `DELETE`.
    pub method: String,
    /// The request path as sent (percent-encoded).
    pub raw_path: String,
    /// `conversationId` from the path, decoded.
    pub conversation_id: String,
    /// The `{activityId}` of a reply, decoded.
    pub reply_to_id: Option<String>,
    pub body: Value,
    pub authorization: Option<String>,
    pub received_at: Instant,
}

impl RecordedActivity {
    pub fn text(&self) -> &str {
        self.body
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The activity's `type`.
    pub fn kind(&self) -> &str {
        self.body
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The `streaminfo` entity of a streamed update or final message.
    pub fn stream_info(&self) -> Option<&Value> {
        stream_info(&self.body)
    }
}

fn stream_info(activity: &Value) -> Option<&Value> {
    activity
        .get("entities")?
        .as_array()?
        .iter()
        .find(|e| e.get("type").and_then(Value::as_str) == Some("streaminfo"))
}

/// Teams' documented rate limits (protocol.md §3.4), as `(window, sends)`.
pub const TEAMS_CONVERSATION_LIMITS: &[(Duration, usize)] = &[
    (Duration::from_secs(1), 7),
    (Duration::from_secs(2), 8),
    (Duration::from_secs(30), 60),
    (Duration::from_secs(3600), 1800),
];
pub const TEAMS_APP_TENANT_LIMITS: &[(Duration, usize)] = &[(Duration::from_secs(1), 50)];

/// A stream the mock connector opened (protocol.md §4.2).
#[derive(Debug, Clone)]
struct OpenStream {
    conversation: String,
    last_sequence: u64,
    finished: bool,
}

/// What a conversation was created with (`POST v3/conversations`).
#[derive(Debug, Clone)]
pub struct CreatedConversation {
    pub id: String,
    pub parameters: Value,
}

#[derive(Default)]
struct State {
    openid_available: bool,
    /// The cloud this mock plays (protocol.md §1.2): the issuer of its Connector tokens and the
    /// scope its token endpoint grants.
    issuer: String,
    scope: String,
    published: Vec<Arc<SigningKey>>,
    /// (tenant, app id) → secret.
    apps: HashMap<(String, String), String>,
    issued_tokens: HashMap<String, String>,
    token_requests: usize,
    /// Token requests refused for a wrong client secret.
    wrong_secrets: usize,
    metadata_requests: usize,
    connector_requires_auth: bool,
    connector_faults: VecDeque<ConnectorFault>,
    connector_latency: Duration,
    connector_attempts: usize,
    activities: Vec<RecordedActivity>,
    /// Plain typing indicators (no stream), kept apart from the answers.
    typing: Vec<RecordedActivity>,
    next_id: u64,
    streams: HashMap<String, OpenStream>,
    /// Stream starts are refused with this (status, code, message) while set.
    stream_refusal: Option<(u16, String, String)>,
    enforce_limits: bool,
    /// Receipt times per (bot, conversation) and per (bot, tenant).
    sends: HashMap<String, VecDeque<Instant>>,
    throttled: usize,
    created: Vec<CreatedConversation>,
    /// Whether accepted activities are kept for [`MockMicrosoft::activities`] (a long load run
    /// observes them instead).
    retain: bool,
    /// Every Nth connector request (typing aside) answers this fault.
    periodic_fault: Option<(u64, ConnectorFault)>,
    /// Sends (typing aside) being answered now, per conversation, and the most seen at once:
    /// more than one means two turns of a conversation ran at the same time.
    open_sends: HashMap<String, usize>,
    most_open_sends: usize,
    /// Access tokens for Microsoft Graph, by the tenant that issued them.
    graph_tokens: HashMap<String, String>,
    /// Each conversation's roster (`pagedmembers`).
    rosters: HashMap<String, Vec<Value>>,
    /// Each tenant's teams, and each team's channels, as Graph lists them.
    graph_teams: HashMap<String, Vec<Value>>,
    graph_channels: HashMap<String, Vec<Value>>,
    /// Graph's page size (its `$top` default is larger; small pages exercise the paging).
    graph_page_size: usize,
    graph_requests: usize,
    /// Users who blocked the bot (or uninstalled it): writes into their chat get Teams' 403.
    blocked_users: std::collections::HashSet<String>,
    /// Each user's personal chat (a 1:1 create is get-or-create, as in Teams).
    user_chats: HashMap<String, String>,
    /// The same, by chat: whose chat a send goes into.
    chat_users: HashMap<String, String>,
    /// Tenants answering 429 until then (Teams' own throttling, not the router's doing).
    tenant_throttled_until: HashMap<String, Instant>,
    scripted_throttles: usize,
    /// The tenant of each conversation written to (a delete carries none; Teams knows it).
    conversation_tenants: HashMap<String, String>,
    /// What Teams Workflows webhooks received: (path and query, payload).
    workflow_posts: Vec<(String, Value)>,
    /// Conversations Teams no longer knows (404 `ConversationNotFound`).
    lost_conversations: std::collections::HashSet<String>,
}

/// Called with every activity the connector accepts, as it is accepted.
pub type Observer = Arc<dyn Fn(&RecordedActivity) + Send + Sync>;

/// The running mock; dropping it stops nothing (the server lives until the runtime ends).
#[derive(Clone)]
pub struct MockMicrosoft {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    /// The key `token_for` signs with.
    signer: Arc<Mutex<Arc<SigningKey>>>,
    observer: Arc<arc_swap::ArcSwapOption<Observer>>,
}

impl MockMicrosoft {
    /// Starts on a free loopback port with one published key endorsing `msteams`.
    pub async fn start() -> Self {
        match Self::start_on("127.0.0.1:0".parse().expect("loopback address")).await {
            Ok(mock) => mock,
            Err(e) => panic!("bind mock Microsoft: {e}"),
        }
    }

    /// Starts on `addr` (a fixed port lets a router running elsewhere be configured against it).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let key = Arc::new(SigningKey::generate("key-1", &["msteams"]));
        let state = State {
            openid_available: true,
            issuer: CONNECTOR_ISSUER.to_owned(),
            scope: PUBLIC_SCOPE.to_owned(),
            published: vec![Arc::clone(&key)],
            connector_requires_auth: true,
            graph_page_size: 2,
            next_id: 1,
            retain: true,
            ..State::default()
        };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mock = Self {
            addr,
            state: Arc::new(Mutex::new(state)),
            arrived: Arc::new(Notify::new()),
            signer: Arc::new(Mutex::new(key)),
            observer: Arc::new(arc_swap::ArcSwapOption::empty()),
        };
        let server = mock.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.route(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(mock)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `microsoft.openid_metadata_url` for the router.
    pub fn openid_metadata_url(&self) -> String {
        format!("http://{}/v1/.well-known/openidconfiguration", self.addr)
    }

    /// `microsoft.graph_url` for the router (Graph's `/v1.0/...` is served here).
    pub fn graph_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `microsoft.login_url` for the router (tokens at `{login_url}/{tenant}/oauth2/v2.0/token`).
    pub fn login_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `serviceUrl` activities carry; it has a regional path prefix like the real one.
    pub fn service_url(&self) -> String {
        format!("http://{}{}", self.addr, SERVICE_PATH_PREFIX)
    }

    /// Registers a bot app: multi-tenant apps (tenant `None`) get tokens from `botframework.com`.
    pub fn register_app(&self, app_id: &str, secret: &str, tenant: Option<&str>) {
        self.state.lock().apps.insert(
            (
                tenant.unwrap_or("botframework.com").to_owned(),
                app_id.to_owned(),
            ),
            secret.to_owned(),
        );
    }

    /// The members `pagedmembers` lists for `conversation`, in pages of `pageSize` (default 100).
    pub fn set_roster(&self, conversation: &str, members: Vec<Value>) {
        self.state
            .lock()
            .rosters
            .insert(conversation.to_owned(), members);
    }

    /// The teams Graph lists in `tenant` (`{"id", "displayName", ...}` each).
    pub fn set_graph_teams(&self, tenant: &str, teams: Vec<Value>) {
        self.state
            .lock()
            .graph_teams
            .insert(tenant.to_owned(), teams);
    }

    /// The channels Graph lists for team `team` (its group id).
    pub fn set_graph_channels(&self, team: &str, channels: Vec<Value>) {
        self.state
            .lock()
            .graph_channels
            .insert(team.to_owned(), channels);
    }

    /// `user` blocked the bot: creating or writing into their chat answers Teams' 403
    /// `MessageWritesBlocked`.
    pub fn block_user(&self, user: &str) {
        self.state.lock().blocked_users.insert(user.to_owned());
    }

    /// Teams forgets `conversation`: writes into it answer 404 `ConversationNotFound`.
    pub fn lose_conversation(&self, conversation: &str) {
        self.state
            .lock()
            .lost_conversations
            .insert(conversation.to_owned());
    }

    pub fn unblock_user(&self, user: &str) {
        self.state.lock().blocked_users.remove(user);
    }

    /// Every request in `tenant` answers 429 (Retry-After: 1) for `duration`.
    pub fn throttle_tenant(&self, tenant: &str, duration: Duration) {
        self.state
            .lock()
            .tenant_throttled_until
            .insert(tenant.to_owned(), Instant::now() + duration);
    }

    /// 429s answered by [`MockMicrosoft::throttle_tenant`] (apart from [`MockMicrosoft::throttled`]).
    pub fn scripted_throttles(&self) -> usize {
        self.state.lock().scripted_throttles
    }

    /// A Teams Workflows webhook URL served by the mock (it answers 202, as Workflows do).
    pub fn workflow_url(&self, name: &str) -> String {
        format!("http://{}/workflows/{name}?sig=mock-signature", self.addr)
    }

    /// What the Workflows webhooks received: (path and query, payload).
    pub fn workflow_posts(&self) -> Vec<(String, Value)> {
        self.state.lock().workflow_posts.clone()
    }

    /// Graph requests served (any outcome).
    pub fn graph_requests(&self) -> usize {
        self.state.lock().graph_requests
    }

    /// An administrator of `tenant` consented to the app: the tenant issues it tokens (the
    /// Bot Framework's and Microsoft Graph's) from now on.
    pub fn consent(&self, app_id: &str, secret: &str, tenant: &str) {
        self.register_app(app_id, secret, Some(tenant));
    }

    /// The key valid tokens are signed with.
    pub fn signing_key(&self) -> Arc<SigningKey> {
        Arc::clone(&self.signer.lock())
    }

    /// A valid Connector token for `app_id`, bound to the mock's service URL.
    pub fn token_for(&self, app_id: &str) -> String {
        let mut claims = connector_claims(app_id, &self.service_url());
        claims["iss"] = self.state.lock().issuer.clone().into();
        self.signing_key().sign(&claims)
    }

    /// Plays another cloud than the public one: its Connector tokens carry `issuer`, and its token
    /// endpoint grants only `scope` (for US Government: `https://api.botframework.us` and
    /// `https://api.botframework.us/.default`).
    pub fn play_cloud(&self, issuer: &str, scope: &str) {
        let mut state = self.state.lock();
        state.issuer = issuer.to_owned();
        state.scope = scope.to_owned();
    }

    /// Publishes `key` in the JWKS (a key rotation at Microsoft) and signs with it from now on.
    pub fn rotate_to(&self, key: Arc<SigningKey>) {
        self.state.lock().published.push(Arc::clone(&key));
        *self.signer.lock() = key;
    }

    /// Takes the key `kid` out of the JWKS (Microsoft retiring a key after a rotation).
    pub fn retire_key(&self, kid: &str) {
        self.state.lock().published.retain(|key| key.kid != kid);
    }

    /// Makes the OpenID metadata and key endpoints answer 503 (false) or work (true).
    pub fn set_openid_available(&self, available: bool) {
        self.state.lock().openid_available = available;
    }

    pub fn metadata_requests(&self) -> usize {
        self.state.lock().metadata_requests
    }

    pub fn token_requests(&self) -> usize {
        self.state.lock().token_requests
    }

    /// Token requests refused because their client secret was wrong.
    pub fn wrong_secret_requests(&self) -> usize {
        self.state.lock().wrong_secrets
    }

    /// Forgets every issued token, so the connector answers 401 until a new one is fetched.
    pub fn revoke_tokens(&self) {
        self.state.lock().issued_tokens.clear();
    }

    /// Whether the connector demands a token it issued (true by default; development mode sends none).
    pub fn set_connector_requires_auth(&self, required: bool) {
        self.state.lock().connector_requires_auth = required;
    }

    /// Queues faults: each answers one connector request, in order, before normal service.
    pub fn push_connector_faults(&self, faults: impl IntoIterator<Item = ConnectorFault>) {
        self.state.lock().connector_faults.extend(faults);
    }

    pub fn set_connector_latency(&self, latency: Duration) {
        self.state.lock().connector_latency = latency;
    }

    /// Refuses every stream start with `status` and Teams' `code`/`message` (protocol.md §4.4),
    /// or (None) accepts streams again.
    pub fn refuse_streams(&self, refusal: Option<(u16, &str, &str)>) {
        self.state.lock().stream_refusal =
            refusal.map(|(status, code, message)| (status, code.to_owned(), message.to_owned()));
    }

    /// Answers 429 to any request over Teams' documented limits (per bot and conversation, per
    /// bot and tenant), as Teams does.
    pub fn enforce_teams_limits(&self, enforce: bool) {
        self.state.lock().enforce_limits = enforce;
    }

    /// Calls `observer` with every accepted activity from now on; with `retain` false the mock
    /// stops keeping them (memory stays flat in a long run).
    pub fn observe(&self, observer: Option<Observer>, retain: bool) {
        self.observer.store(observer.map(Arc::new));
        self.state.lock().retain = retain;
    }

    /// Answers every `every`th connector request (typing aside) with `fault`; `None` stops it.
    pub fn set_periodic_fault(&self, fault: Option<(u64, ConnectorFault)>) {
        self.state.lock().periodic_fault = fault.filter(|(every, _)| *every > 0);
    }

    /// Requests refused with 429 for going over the limits.
    pub fn throttled(&self) -> usize {
        self.state.lock().throttled
    }

    /// Typing indicators outside streams.
    pub fn typing(&self) -> Vec<RecordedActivity> {
        self.state.lock().typing.clone()
    }

    /// Conversations created with `POST v3/conversations`.
    pub fn created_conversations(&self) -> Vec<CreatedConversation> {
        self.state.lock().created.clone()
    }

    /// Every connector request, faulted or not.
    /// The most sends to one conversation the connector was answering at the same time (typing
    /// aside): above 1, two turns of a conversation overlapped.
    pub fn most_sends_at_once_per_conversation(&self) -> usize {
        self.state.lock().most_open_sends
    }

    pub fn connector_attempts(&self) -> usize {
        self.state.lock().connector_attempts
    }

    pub fn activities(&self) -> Vec<RecordedActivity> {
        self.state.lock().activities.clone()
    }

    pub fn activity_count(&self) -> usize {
        self.state.lock().activities.len()
    }

    /// The activities recorded from the `from`th on (a test with a million recorded reads its
    /// latest without copying them all).
    pub fn activities_from(&self, from: usize) -> Vec<RecordedActivity> {
        let state = self.state.lock();
        state
            .activities
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    /// Waits until at least `count` activities were recorded or `timeout` passed; returns how
    /// many were.
    pub async fn wait_for_activity_count(&self, count: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            let recorded = self.activity_count();
            if recorded >= count || Instant::now() >= deadline {
                return recorded;
            }
            let _ = tokio::time::timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
                notified,
            )
            .await;
        }
    }

    /// Waits until at least `count` activities were recorded or `timeout` passed; returns them.
    pub async fn wait_for_activities(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Vec<RecordedActivity> {
        self.wait_for_activity_count(count, timeout).await;
        self.activities()
    }

    async fn route(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        match (request.method().clone(), path.as_str()) {
            (
                Method::GET,
                "/v1/.well-known/openidconfiguration" | "/v1/.well-known/openid-configuration",
            ) => self.metadata(),
            (Method::GET, "/v1/.well-known/keys") => self.keys(),
            (Method::POST, p) if p.ends_with("/oauth2/v2.0/token") => self.token(request).await,
            (Method::POST | Method::PUT | Method::DELETE, p) if p.contains("/v3/conversations") => {
                self.connector(request).await
            }
            (Method::GET, p)
                if p.contains("/v3/conversations/") && p.ends_with("/pagedmembers") =>
            {
                self.paged_members(&request)
            }
            (Method::GET, p) if p.starts_with("/v1.0/") => self.graph(&request),
            (Method::POST, p) if p.starts_with("/workflows/") => {
                let target = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let body = read_body(request).await;
                let payload = serde_json::from_slice(&body).unwrap_or(Value::Null);
                self.state.lock().workflow_posts.push((target, payload));
                json_response(StatusCode::ACCEPTED, json!({}))
            }
            _ => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": {"code": "NotFound", "message": path}}),
            ),
        }
    }

    fn metadata(&self) -> Response<Full<Bytes>> {
        let mut state = self.state.lock();
        state.metadata_requests += 1;
        if !state.openid_available {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily unavailable"}),
            );
        }
        json_response(
            StatusCode::OK,
            json!({
                "issuer": state.issuer,
                "authorization_endpoint": "https://invalid.botframework.com",
                "jwks_uri": format!("http://{}/v1/.well-known/keys", self.addr),
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            }),
        )
    }

    fn keys(&self) -> Response<Full<Bytes>> {
        let state = self.state.lock();
        if !state.openid_available {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily unavailable"}),
            );
        }
        let keys: Vec<Value> = state.published.iter().map(|k| k.jwk()).collect();
        json_response(StatusCode::OK, json!({"keys": keys}))
    }

    async fn token(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let tenant = request
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let body = read_body(request).await;
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        let field = |k: &str| form.get(k).cloned().unwrap_or_default();
        let mut state = self.state.lock();
        state.token_requests += 1;
        if field("grant_type") != "client_credentials" {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "AADSTS70003: grant type not supported",
            );
        }
        if field("scope") != state.scope && field("scope") != GRAPH_SCOPE {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "AADSTS70011: invalid scope",
            );
        }
        let app_id = field("client_id");
        let Some(secret) = state.apps.get(&(tenant.clone(), app_id.clone())).cloned() else {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                &format!(
                    "AADSTS700016: Application with identifier '{app_id}' was not found in the directory '{tenant}'."
                ),
            );
        };
        if field("client_secret") != secret {
            state.wrong_secrets += 1;
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
            );
        }
        let token = format!("mock-access-token-{}-{}", app_id, state.token_requests);
        if field("scope") == GRAPH_SCOPE {
            state.graph_tokens.insert(token.clone(), tenant);
        } else {
            state.issued_tokens.insert(token.clone(), app_id);
        }
        json_response(
            StatusCode::OK,
            json!({"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600, "access_token": token}),
        )
    }

    /// `GET v3/conversations/{id}/pagedmembers?pageSize=&continuationToken=`: the roster in
    /// pages; the continuation token is the offset of the next page (opaque to the caller).
    fn paged_members(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let conversation = path
            .split("/v3/conversations/")
            .nth(1)
            .and_then(|rest| rest.strip_suffix("/pagedmembers"))
            .map(|c| {
                percent_encoding::percent_decode_str(c)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let state = self.state.lock();
        if !bearer(request).is_some_and(|t| state.issued_tokens.contains_key(t)) {
            return connector_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Authorization has been denied for this request.",
            );
        }
        let Some(members) = state.rosters.get(&conversation) else {
            return connector_error(
                StatusCode::NOT_FOUND,
                "ConversationNotFound",
                "Conversation not found.",
            );
        };
        let size = query
            .get("pageSize")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(100)
            .max(1);
        let from = query
            .get("continuationToken")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0)
            .min(members.len());
        let to = (from + size).min(members.len());
        let mut page = json!({"members": members[from..to]});
        if to < members.len() {
            page["continuationToken"] = json!(to.to_string());
        }
        json_response(StatusCode::OK, page)
    }

    /// Microsoft Graph's `GET /v1.0/teams` and `GET /v1.0/teams/{id}/channels`, app-only: the
    /// token must be a Graph token of the tenant; pages of `graph_page_size` linked with
    /// `@odata.nextLink` (`$skiptoken`).
    fn graph(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let mut state = self.state.lock();
        state.graph_requests += 1;
        let Some(tenant) = bearer(request)
            .and_then(|t| state.graph_tokens.get(t))
            .cloned()
        else {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token validation failure."}}),
            );
        };
        let segments: Vec<&str> = path.trim_start_matches("/v1.0/").split('/').collect();
        let items = match segments.as_slice() {
            ["teams"] => state.graph_teams.get(&tenant).cloned().unwrap_or_default(),
            ["teams", team, "channels"] => {
                let team = percent_encoding::percent_decode_str(team)
                    .decode_utf8_lossy()
                    .into_owned();
                let in_tenant = state
                    .graph_teams
                    .get(&tenant)
                    .is_some_and(|teams| teams.iter().any(|t| t["id"] == team.as_str()));
                match state.graph_channels.get(&team) {
                    Some(channels) if in_tenant => channels.clone(),
                    _ => {
                        return json_response(
                            StatusCode::NOT_FOUND,
                            json!({"error": {"code": "NotFound", "message": "No team found with Group Id"}}),
                        );
                    }
                }
            }
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": {"code": "BadRequest", "message": "Resource not found for the segment."}}),
                );
            }
        };
        let from = query
            .get("$skiptoken")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0)
            .min(items.len());
        let to = (from + state.graph_page_size).min(items.len());
        let mut page = json!({
            "@odata.context": format!("http://{}/v1.0/$metadata#{}", self.addr, segments.join("/")),
            "value": items[from..to],
        });
        if to < items.len() {
            page["@odata.nextLink"] = json!(format!("http://{}{path}?$skiptoken={to}", self.addr));
        }
        json_response(StatusCode::OK, page)
    }

    async fn connector(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let raw_path = request.uri().path().to_owned();
        let authorization = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = read_body(request).await;
        let activity = if method == Method::DELETE {
            Value::Null
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(activity) => activity,
                Err(_) => {
                    return connector_error(
                        StatusCode::BAD_REQUEST,
                        "BadSyntax",
                        "body is not JSON",
                    );
                }
            }
        };
        // Typing indicators are cosmetic: they neither take scripted faults nor count as attempts.
        let plain_typing = method == Method::POST
            && activity.get("type").and_then(Value::as_str) == Some("typing")
            && stream_info(&activity).is_none();
        let sending_to = (!plain_typing)
            .then(|| {
                raw_path
                    .split("v3/conversations/")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_owned)
            })
            .flatten();
        let latency = {
            let mut state = self.state.lock();
            if !plain_typing {
                state.connector_attempts += 1;
            }
            if let Some(conversation) = &sending_to {
                let open = state.open_sends.entry(conversation.clone()).or_default();
                *open += 1;
                let open = *open;
                state.most_open_sends = state.most_open_sends.max(open);
            }
            state.connector_latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut state = self.state.lock();
        if let Some(conversation) = &sending_to
            && let Some(open) = state.open_sends.get_mut(conversation)
        {
            *open -= 1;
            if *open == 0 {
                state.open_sends.remove(conversation);
            }
        }
        let token = authorization
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer "));
        let bot = token
            .and_then(|t| state.issued_tokens.get(t))
            .cloned()
            .unwrap_or_default();
        if state.connector_requires_auth && bot.is_empty() {
            return connector_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Authorization has been denied for this request.",
            );
        }
        let attempt = state.connector_attempts as u64;
        let fault = if plain_typing {
            None
        } else {
            state.connector_faults.pop_front().or_else(|| {
                state
                    .periodic_fault
                    .as_ref()
                    .filter(|(every, _)| attempt.is_multiple_of(*every))
                    .map(|(_, fault)| fault.clone())
            })
        };
        if let Some(fault) = fault {
            return match fault {
                ConnectorFault::Throttle { retry_after_secs } => throttled(retry_after_secs),
                ConnectorFault::Status(code) => connector_error(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    "ServiceError",
                    "injected failure",
                ),
            };
        }
        let Some(rest) = raw_path
            .strip_prefix(SERVICE_PATH_PREFIX)
            .and_then(|p| p.strip_prefix("v3/conversations"))
        else {
            return connector_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "unknown service path (regional prefix lost?)",
            );
        };
        let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let (conversation, activity_id) = match (&method, segments.as_slice()) {
            (&Method::POST, [""]) => ("", None),
            (&Method::POST, [conversation, "activities"]) => (*conversation, None),
            (_, [conversation, "activities", id]) => (*conversation, Some(*id)),
            _ => {
                return connector_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "unknown operation (unencoded id?)",
                );
            }
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let conversation_id = decode(conversation);
        let request_tenant = match activity
            .pointer("/channelData/tenant/id")
            .or_else(|| activity.pointer("/conversation/tenantId"))
            .or_else(|| activity.get("tenantId"))
            .and_then(Value::as_str)
        {
            Some(tenant) => {
                if !conversation_id.is_empty() {
                    state
                        .conversation_tenants
                        .insert(conversation_id.clone(), tenant.to_owned());
                }
                tenant.to_owned()
            }
            None => state
                .conversation_tenants
                .get(&conversation_id)
                .cloned()
                .unwrap_or_default(),
        };
        if state
            .tenant_throttled_until
            .get(&request_tenant)
            .is_some_and(|until| Instant::now() < *until)
        {
            state.scripted_throttles += 1;
            return throttled(1);
        }
        let chat_user = if conversation.is_empty() {
            activity
                .pointer("/members/0/id")
                .and_then(Value::as_str)
                .filter(|_| activity.get("activity").is_none())
                .map(str::to_owned)
        } else {
            state.chat_users.get(&conversation_id).cloned()
        };
        if state.lost_conversations.contains(&conversation_id) {
            return connector_error(
                StatusCode::NOT_FOUND,
                "ConversationNotFound",
                "Conversation not found.",
            );
        }
        if chat_user
            .as_ref()
            .is_some_and(|user| state.blocked_users.contains(user))
        {
            return json_response(
                StatusCode::FORBIDDEN,
                json!({"errorCode": 209, "message": "{\"subCode\": \"MessageWritesBlocked\", \"details\": \"Thread is blocked from message writes.\"}"}),
            );
        }
        if state.enforce_limits {
            let tenant = request_tenant.as_str();
            let now = Instant::now();
            // A create's thread is the chat it makes: the user's, or the channel's.
            let thread = if conversation.is_empty() {
                activity
                    .pointer("/members/0/id")
                    .or_else(|| activity.pointer("/channelData/channel/id"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else {
                conversation_id.clone()
            };
            let keys = [
                (
                    format!("c\u{0}{bot}\u{0}{thread}"),
                    TEAMS_CONVERSATION_LIMITS,
                ),
                (format!("t\u{0}{bot}\u{0}{tenant}"), TEAMS_APP_TENANT_LIMITS),
            ];
            let over = keys.iter().any(|(key, limits)| {
                let log = state.sends.entry(key.clone()).or_default();
                while log
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
                {
                    log.pop_front();
                }
                limits.iter().any(|(window, count)| {
                    log.iter()
                        .rev()
                        .take_while(|t| now.duration_since(**t) < *window)
                        .count()
                        >= *count
                })
            });
            if over {
                state.throttled += 1;
                return throttled(1);
            }
            for (key, _) in keys {
                state.sends.entry(key).or_default().push_back(now);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let record = RecordedActivity {
            method: method.to_string(),
            raw_path: raw_path.clone(),
            conversation_id: conversation_id.clone(),
            reply_to_id: activity_id.map(decode),
            body: activity.clone(),
            authorization,
            received_at: Instant::now(),
        };
        let response = if method == Method::POST && conversation.is_empty() {
            let created = match &chat_user {
                Some(user) => {
                    let chat = state
                        .user_chats
                        .entry(user.clone())
                        .or_insert_with(|| format!("a:created-{id}"))
                        .clone();
                    state.chat_users.insert(chat.clone(), user.clone());
                    chat
                }
                None => format!("a:created-{id}"),
            };
            let mut first = None;
            if let Some(message) = activity.get("activity").filter(|a| a.is_object()) {
                // A first message starts a channel thread: its replies live at `;messageid=`.
                first = Some(format!("1{id:012}"));
                state.activities.push(RecordedActivity {
                    conversation_id: created.clone(),
                    body: message.clone(),
                    ..record.clone()
                });
            }
            state.created.push(CreatedConversation {
                id: created.clone(),
                parameters: activity,
            });
            drop(state);
            json_response(
                StatusCode::CREATED,
                json!({"id": created, "activityId": first, "serviceUrl": format!("http://{}{}", self.addr, SERVICE_PATH_PREFIX)}),
            )
        } else if method == Method::POST {
            if plain_typing {
                state.typing.push(record);
                drop(state);
                return json_response(StatusCode::OK, json!({}));
            }
            match stream_step(&mut state, &conversation_id, &activity, id) {
                StreamStep::Refused(refused) => return refused,
                StreamStep::Accepted(response) => {
                    self.accept(state, record);
                    response
                }
                StreamStep::Outside => {
                    self.accept(state, record);
                    json_response(StatusCode::OK, json!({"id": format!("1{id:012}")}))
                }
            }
        } else {
            let answer = match method {
                Method::PUT => json!({"id": activity_id.map(decode)}),
                _ => json!({}),
            };
            self.accept(state, record);
            json_response(StatusCode::OK, answer)
        };
        self.arrived.notify_waiters();
        response
    }
}

impl MockMicrosoft {
    /// Records an accepted activity (when retaining) and shows it to the observer, outside the lock.
    fn accept(&self, mut state: parking_lot::MutexGuard<'_, State>, record: RecordedActivity) {
        let observer = self.observer.load_full();
        match (state.retain, observer) {
            (true, None) => state.activities.push(record),
            (true, Some(observer)) => {
                state.activities.push(record.clone());
                drop(state);
                observer(&record);
            }
            (false, Some(observer)) => {
                drop(state);
                observer(&record);
            }
            (false, None) => {}
        }
    }
}

type Reply = Response<Full<Bytes>>;

enum StreamStep {
    /// Not part of a stream.
    Outside,
    /// Accepted, with the 201 (start) or 202 answer.
    Accepted(Response<Full<Bytes>>),
    Refused(Response<Full<Bytes>>),
}

/// Checks a streamed update or final message against Teams' rules (protocol.md §4).
fn stream_step(state: &mut State, conversation: &str, activity: &Value, id: u64) -> StreamStep {
    match stream_rules(state, conversation, activity, id) {
        Ok(Some(accepted)) => StreamStep::Accepted(accepted),
        Ok(None) => StreamStep::Outside,
        Err(refused) => StreamStep::Refused(*refused),
    }
}

fn stream_rules(
    state: &mut State,
    conversation: &str,
    activity: &Value,
    id: u64,
) -> Result<Option<Reply>, Box<Reply>> {
    let Some(info) = stream_info(activity) else {
        return Ok(None);
    };
    let field = |name: &str| info.get(name).and_then(Value::as_str);
    let kind = activity
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let stream_type = field("streamType").unwrap_or("streaming");
    let sequence = info.get("streamSequence").and_then(Value::as_u64);
    let text = activity
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let bad = |message: &str| connector_error(StatusCode::BAD_REQUEST, "BadArgument", message);
    match (kind, stream_type) {
        ("typing", "informative" | "streaming") if sequence.is_none() => {
            return Err(Box::new(bad(
                "Only start streaming and continue streaming types are allowed as a typing activity",
            )));
        }
        ("typing", "informative" | "streaming") | ("message", "final") => {}
        _ => {
            return Err(Box::new(bad(
                "Only start streaming and continue streaming types are allowed as a typing activity",
            )));
        }
    }
    if kind == "message" && sequence.is_some() {
        return Err(Box::new(bad(
            "final streaming message must not carry a streamSequence",
        )));
    }
    let Some(stream_id) = field("streamId") else {
        if kind == "message" {
            return Err(Box::new(bad(
                "a final streaming message needs its streamId",
            )));
        }
        if let Some((status, code, message)) = state.stream_refusal.clone() {
            return Err(Box::new(connector_error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                &code,
                &message,
            )));
        }
        if text.is_empty() {
            return Err(Box::new(bad(
                "Start streaming activities should include text",
            )));
        }
        if sequence != Some(1) {
            return Err(Box::new(bad("a stream starts at streamSequence 1")));
        }
        let stream_id = format!("1{id:012}");
        state.streams.insert(
            stream_id.clone(),
            OpenStream {
                conversation: conversation.to_owned(),
                last_sequence: 1,
                finished: false,
            },
        );
        return Ok(Some(json_response(
            StatusCode::CREATED,
            json!({"id": stream_id}),
        )));
    };
    let Some(stream) = state.streams.get_mut(stream_id) else {
        return Err(Box::new(bad("unknown streamId")));
    };
    if stream.conversation != conversation {
        return Err(Box::new(bad("the stream belongs to another conversation")));
    }
    if stream.finished {
        return Err(Box::new(connector_error(
            StatusCode::FORBIDDEN,
            "ContentStreamNotAllowed",
            "Content stream is not allowed on an already completed streamed message",
        )));
    }
    match sequence {
        Some(n) if n <= stream.last_sequence => Err(Box::new(json_response(
            StatusCode::ACCEPTED,
            json!({"error": {"code": "ContentStreamSequenceOrderPreConditionFailed", "message": "out of order"}}),
        ))),
        Some(n) => {
            stream.last_sequence = n;
            Ok(Some(json_response(StatusCode::ACCEPTED, json!({}))))
        }
        None => {
            if text.is_empty() {
                return Err(Box::new(bad("the final streaming message must have text")));
            }
            stream.finished = true;
            Ok(Some(json_response(StatusCode::ACCEPTED, json!({}))))
        }
    }
}

/// Teams' throttling answer.
fn throttled(retry_after_secs: u64) -> Response<Full<Bytes>> {
    let mut response = connector_error(
        StatusCode::TOO_MANY_REQUESTS,
        "TooManyRequests",
        "API calls quota exceeded",
    );
    response
        .headers_mut()
        .insert(hyper::header::RETRY_AFTER, retry_after_secs.into());
    response
}

fn bearer(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
}

async fn read_body(request: Request<Incoming>) -> Bytes {
    request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The Connector's `ErrorResponse` shape (protocol.md §3.3).
fn connector_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

/// Entra's OAuth error shape.
fn aad_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        json!({"error": error, "error_description": description}),
    )
}
