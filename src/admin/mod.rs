//! The management API (the shape of the seed's ChatBotKit Teams API): accounts and API keys,
//! bots, Teams integrations with their setup checks and event logs, and contacts. Every write
//! goes to the store first (secrets sealed, see [`secrets`]) and then into the live
//! [`Registry`], so the next activity sees it without a restart. Writes are serialized by one
//! lock; they are rare, and the data path never takes it.

mod broadcasts;
mod consent;
mod destinations;
pub use destinations::workflow_opener;
mod discovery;
mod messages;
pub mod model;
pub(crate) mod paging;
pub(crate) mod secrets;
pub(crate) mod setup;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::config::{AdminConfig, Config};
use crate::conversation::Directory;
use crate::ledger::contacts::ContactBook;
use crate::ledger::events::{EventDraft, EventLog, EventSink};
use crate::notify::proactive;
/// The body of `…/message` (also where the fuzz targets find it).
pub use crate::notify::proactive::MessageRequest;
use crate::records::{BackendSpec, BotRecord, DEFAULT_SESSION_DURATION_MS, IntegrationRecord};
use crate::registry::{Bot, Integration, Owner, Registry, SetupResult, SetupStatus};
use crate::store::{Store, StoreError, StoreHealth, now_ms};
use crate::telemetry::Readiness;
use model::{Invalid, StoredBot, StoredIntegration};
use paging::{ListQuery, Position, meta_matches};
use secrets::Sealer;
use setup::SetupChecker;

pub const BOTS_KIND: &str = "bots";
/// The keyed digest of the master key that sealed the store's secrets (`Sealer::key_check`).
pub const KEY_CHECK_KIND: &str = "keycheck";
const KEY_CHECK_ID: &str = "master";
pub const INTEGRATIONS_KIND: &str = "integrations";
/// Setup results, apart from their integration: a late result never writes back a record that
/// another instance deleted meanwhile.
pub const SETUP_KIND: &str = "setup";
/// Deletions (`bot/{id}`, `integration/{id}` → when): other instances drop a record only when it
/// was deleted, never merely because the store lost it (a Redis restarted without persistence).
pub const DELETED_KIND: &str = "deleted";

/// The OpenAPI 3.1 document of this API, as kept in the repository.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every management route (method, path template), as the OpenAPI document lists them.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/bot/create"),
    ("GET", "/api/v1/bot/list"),
    ("GET", "/api/v1/bot/{botId}/fetch"),
    ("POST", "/api/v1/bot/{botId}/update"),
    ("POST", "/api/v1/bot/{botId}/delete"),
    ("POST", "/api/v1/integration/teams/create"),
    ("GET", "/api/v1/integration/teams/list"),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/fetch",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/update",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/delete",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/setup",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/event/list",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/message",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/message/update",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/message/delete",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/callback",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/connection/url",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/connection/list",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/connection/{tenantId}/delete",
    ),
    ("GET", "/api/v1/teams/consent/callback"),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/create",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/list",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/fetch",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/recipients",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/recipient/list",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/start",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/pause",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/resume",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/cancel",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/retry",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/update",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/broadcast/{jobId}/recall",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/members",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/graph/teams",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/graph/teams/{teamId}/channels",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/destination/create",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/destination/list",
    ),
    (
        "GET",
        "/api/v1/integration/teams/{teamsIntegrationId}/destination/{destinationId}/fetch",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/destination/{destinationId}/update",
    ),
    (
        "POST",
        "/api/v1/integration/teams/{teamsIntegrationId}/destination/{destinationId}/delete",
    ),
    ("GET", "/api/v1/contact/list"),
    ("GET", "/api/v1/contact/{contactId}/fetch"),
    ("GET", "/api/v1/openapi.json"),
];

type Body = Full<Bytes>;

/// An API failure: status, stable code, message, and the field to blame when there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    fn forbidden(what: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this {what} belongs to another account"),
        )
    }

    fn store(error: StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the change could not be saved: {error}"),
        )
    }

    fn into_response(self) -> Response<Body> {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(field) = self.field {
            body["error"]["field"] = json!(field);
        }
        let mut response = json_response(self.status, &body);
        let headers = response.headers_mut();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::PAYLOAD_TOO_LARGE => {
                // The rest of the body is never read, so the connection cannot be reused.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: invalid.code,
            message: invalid.message,
            field: invalid.field,
        }
    }
}

type ApiResult = Result<Value, ApiError>;

/// Where records are kept: the store, its health, and the sealer of their secrets.
#[derive(Clone)]
pub struct Vault {
    pub store: Arc<Store>,
    pub health: Arc<StoreHealth>,
    pub sealer: Arc<Sealer>,
}

/// What the management API works with.
pub struct AdminParts {
    pub registry: Arc<Registry>,
    pub directory: Arc<Directory>,
    pub vault: Vault,
    pub events: Arc<EventLog>,
    pub sink: EventSink,
    pub contacts: Arc<ContactBook>,
    pub setup: SetupChecker,
    pub readiness: Arc<Readiness>,
    /// Where proactive messages go, learned from traffic.
    pub addresses: Arc<crate::ledger::addresses::AddressBook>,
    /// The tenants connected to each integration.
    pub tenants: Arc<crate::notify::Tenants>,
    /// Where notifications go.
    pub destinations: Arc<crate::notify::Destinations>,
    /// Microsoft Graph, for discovery in consenting tenants.
    pub graph: Arc<crate::notify::graph::Graph>,
    /// Broadcast jobs.
    pub broadcasts: Arc<crate::notify::broadcasts::Broadcasts>,
    pub connector: Arc<crate::connector::Connector>,
    /// Where backends may point (`[security] backend_allow` / `backend_deny`).
    pub egress: Arc<crate::backend::egress::EgressPolicy>,
}

pub struct Admin {
    parts: AdminParts,
    /// (account id, SHA-256 of its API key): keys are compared as digests, in constant time.
    accounts: Vec<(String, [u8; 32])>,
    settings: AdminConfig,
    /// The `[microsoft]` section: the login URL and Graph scope of integrations without a cloud.
    microsoft: crate::config::MicrosoftConfig,
    /// Serializes broadcast creations with an idempotency key, appends and state changes.
    broadcast_lock: tokio::sync::Mutex<()>,
    write_lock: tokio::sync::Mutex<()>,
    /// Bumped per queued setup check of an integration; only the latest one runs.
    setup_generation: DashMap<String, u64>,
    /// The creation order of the newest record (microseconds, strictly increasing here).
    last_order: AtomicU64,
    /// Failed API-key attempts per client address (`admin.failed_auth_per_minute`).
    failed_auth: FailedAuthLimiter,
}

type FailedAuthLimiter = governor::RateLimiter<
    std::net::IpAddr,
    governor::state::keyed::DefaultKeyedStateStore<std::net::IpAddr>,
    crate::clock::RouterClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;

/// Client addresses remembered by the failed-attempt limiter before the idle ones are dropped.
const FAILED_AUTH_ADDRESSES: usize = 4096;

fn key_digest(key: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, key.as_bytes()).as_ref());
    out
}

fn now_micros() -> u64 {
    crate::clock::system_now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// A new id: a prefix and 20 random characters of `[0-9a-z]`.
fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let tail: String = (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{tail}")
}

fn sealed_context(kind: &str, id: &str) -> String {
    format!("{kind}/{id}")
}

/// Tells at start whether routers sharing this store seal with another master key (each would
/// then be unable to open the other's secrets). The store keeps a keyed digest of a fixed text,
/// which says nothing about the key; a rotation (the previous key's digest) takes it over.
pub async fn check_master_key(parts: &Vault) {
    let ours = parts.sealer.key_check();
    let stored = match parts.store.records(KEY_CHECK_KIND).await {
        Ok(records) => records
            .into_iter()
            .find(|(id, _)| id == KEY_CHECK_ID)
            .map(|(_, value)| String::from_utf8_lossy(&value).into_owned()),
        Err(error) => {
            tracing::warn!(%error, "cannot compare this router's master key with the store's");
            return;
        }
    };
    match stored {
        Some(stored) if stored == ours => return,
        Some(stored) if Some(&stored) != parts.sealer.previous_key_check().as_ref() => {
            tracing::error!(
                "this router's master key is not the one the store's secrets were sealed with: routers sharing this store must all use the same key (security.master_key_env); secrets this router cannot open are not used (see /readyz), and the secrets it seals cannot be opened by the others"
            );
            return;
        }
        _ => {}
    }
    if let Err(error) = parts
        .store
        .put_records(
            KEY_CHECK_KIND,
            vec![(KEY_CHECK_ID.to_owned(), ours.into_bytes())],
        )
        .await
    {
        tracing::warn!(%error, "cannot record the master key's check value");
    }
}

/// The digest a seeded record keeps of its config entry: `v2:<SHA-256 of the entry without its
/// secret>:<master key id>:<keyed digest of the secret>`. The first part is the same for every
/// process, so routers with different master keys agree on whether the entry changed; only the
/// secret's part needs the key that wrote it.
fn seed_digest(sealer: &Sealer, public: &impl serde::Serialize, secret: Option<&str>) -> String {
    let public = digest(&SHA256, &serde_json::to_vec(public).unwrap_or_default());
    let public: String = public.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let secret = sealer.fingerprint(secret.unwrap_or_default().as_bytes());
    format!("v2:{public}:{}:{secret}", sealer.key_id())
}

enum SeedVerdict {
    /// The config entry is the one the record was seeded from: the record (and any change the
    /// API made to it) stands.
    Same,
    /// The same entry, recorded by the first digest scheme: stands, its digest is renewed.
    Legacy,
    /// The config entry changed since (or was never stored): it is written over the record.
    Changed,
}

fn seed_verdict(
    sealer: &Sealer,
    stored: Option<&str>,
    public: &impl serde::Serialize,
    secret: Option<&str>,
    whole: &impl serde::Serialize,
) -> (SeedVerdict, String) {
    let ours = seed_digest(sealer, public, secret);
    let verdict = match stored {
        None => SeedVerdict::Changed,
        Some(stored) => compare_seed_digest(sealer, stored, &ours, secret, whole),
    };
    (verdict, ours)
}

/// What the `stored` digest of a seeded record says against `ours`, this process's digest of
/// the config entry (`whole`, its secret apart).
fn compare_seed_digest(
    sealer: &Sealer,
    stored: &str,
    ours: &str,
    secret: Option<&str>,
    whole: &impl serde::Serialize,
) -> SeedVerdict {
    let Some(rest) = stored.strip_prefix("v2:") else {
        let legacy = sealer.legacy_fingerprint(&serde_json::to_vec(whole).unwrap_or_default());
        return if legacy == stored {
            SeedVerdict::Legacy
        } else {
            SeedVerdict::Changed
        };
    };
    let mut parts = rest.splitn(3, ':');
    let (Some(stored_public), Some(key_id), Some(stored_secret)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return SeedVerdict::Changed;
    };
    if ours.split(':').nth(1) != Some(stored_public) {
        return SeedVerdict::Changed;
    }
    match sealer.fingerprint_by(key_id, secret.unwrap_or_default().as_bytes()) {
        Some(digest) if digest == stored_secret => SeedVerdict::Same,
        Some(_) => SeedVerdict::Changed,
        // Written by a router with another master key: whether the secret changed cannot be
        // told, and overwriting would lock that router out of its own records.
        None => SeedVerdict::Same,
    }
}

/// A bot's secret is sealed for its record and its backend's origin, so that a sealed value
/// cannot be replayed into a record pointing elsewhere. Values sealed before the origin was
/// covered open with [`sealed_context`] and are sealed again.
fn bot_sealed_context(record: &BotRecord) -> String {
    match model::backend_origin(&record.backend) {
        Some(origin) => format!("{BOTS_KIND}/{}@{origin}", record.id),
        None => sealed_context(BOTS_KIND, &record.id),
    }
}

impl crate::front::ManagementApi for Admin {
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
        Box::pin(async move { Admin::handle(&self, request, peer).await })
    }
}

impl Admin {
    pub fn new(parts: AdminParts, config: &Config) -> Arc<Self> {
        let accounts = config
            .accounts
            .iter()
            .filter_map(|a| Some((a.id.clone(), key_digest(a.api_key.as_deref()?))))
            .collect();
        let admin = Arc::new(Self {
            parts,
            accounts,
            settings: config.admin.clone(),
            microsoft: config.microsoft.clone(),
            broadcast_lock: tokio::sync::Mutex::new(()),
            write_lock: tokio::sync::Mutex::new(()),
            setup_generation: DashMap::new(),
            last_order: AtomicU64::new(0),
            failed_auth: governor::RateLimiter::dashmap_with_clock(
                governor::Quota::per_minute(
                    std::num::NonZeroU32::new(config.admin.failed_auth_per_minute)
                        .unwrap_or(std::num::NonZeroU32::MIN),
                ),
                crate::clock::RouterClock,
            ),
        });
        admin.refresh_readiness();
        for integration in admin.parts.registry.integrations() {
            admin
                .parts
                .events
                .claim(&integration.record.id, &integration.owner.account);
        }
        admin
    }

    pub fn sink(&self) -> &EventSink {
        &self.parts.sink
    }

    /// A creation order after every earlier one of this process.
    fn next_order(&self) -> u64 {
        let now = now_micros();
        let mut last = self.last_order.load(Ordering::Acquire);
        loop {
            let next = now.max(last + 1);
            match self.last_order.compare_exchange_weak(
                last,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn new_owner(&self, account: &str) -> Owner {
        let now = now_ms();
        Owner {
            account: account.to_owned(),
            created_at: now,
            updated_at: now,
            order: self.next_order(),
            seed: None,
        }
    }

    fn refresh_readiness(&self) {
        self.parts
            .readiness
            .set_needs_keys(self.parts.registry.needs_signing_keys());
    }

    /// Answers one management request from `peer`.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> Response<Body> {
        let declares_body = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
            || request.headers().contains_key(header::TRANSFER_ENCODING);
        let mut body_read = false;
        let mut response = match self.route(request, peer, &mut body_read).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        if declares_body && !body_read {
            // Answered without reading the body: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: std::net::SocketAddr,
        body_read: &mut bool,
    ) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().map(str::to_owned);
        let Some(rest) = path.strip_prefix("/api/v1/") else {
            return Err(ApiError::not_found("route"));
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let method = request.method().clone();
        let (allowed, action) = match segments.as_slice() {
            ["openapi.json"] => ("GET", Action::OpenApi),
            ["bot", "create"] => ("POST", Action::CreateBot),
            ["bot", "list"] => ("GET", Action::ListBots),
            ["bot", id, "fetch"] => ("GET", Action::FetchBot(id)),
            ["bot", id, "update"] => ("POST", Action::UpdateBot(id)),
            ["bot", id, "delete"] => ("POST", Action::DeleteBot(id)),
            ["integration", "teams", "create"] => ("POST", Action::CreateIntegration),
            ["integration", "teams", "list"] => ("GET", Action::ListIntegrations),
            ["integration", "teams", id, "fetch"] => ("GET", Action::FetchIntegration(id)),
            ["integration", "teams", id, "update"] => ("POST", Action::UpdateIntegration(id)),
            ["integration", "teams", id, "delete"] => ("POST", Action::DeleteIntegration(id)),
            ["integration", "teams", id, "setup"] => ("POST", Action::Setup(id)),
            ["integration", "teams", id, "event", "list"] => ("GET", Action::ListEvents(id)),
            ["integration", "teams", id, "message"] => ("POST", Action::SendMessage(id)),
            ["integration", "teams", id, "message", "update"] => {
                ("POST", Action::UpdateMessage(id))
            }
            ["integration", "teams", id, "message", "delete"] => {
                ("POST", Action::DeleteMessage(id))
            }
            ["integration", "teams", id, "connection", "url"] => ("POST", Action::ConsentUrl(id)),
            ["integration", "teams", id, "connection", "list"] => {
                ("GET", Action::ListConnections(id))
            }
            ["integration", "teams", id, "connection", tenant, "delete"] => {
                ("POST", Action::DeleteConnection(id, tenant))
            }
            ["teams", "consent", "callback"] => ("GET", Action::ConsentCallback),
            ["integration", "teams", id, "members"] => ("GET", Action::ListMembers(id)),
            ["integration", "teams", id, "graph", "teams"] => ("GET", Action::GraphTeams(id)),
            [
                "integration",
                "teams",
                id,
                "graph",
                "teams",
                team,
                "channels",
            ] => ("GET", Action::GraphChannels(id, team)),
            ["integration", "teams", id, "broadcast", "create"] => {
                ("POST", Action::CreateBroadcast(id))
            }
            ["integration", "teams", id, "broadcast", "list"] => {
                ("GET", Action::ListBroadcasts(id))
            }
            ["integration", "teams", id, "broadcast", job, "fetch"] => {
                ("GET", Action::FetchBroadcast(id, job))
            }
            ["integration", "teams", id, "broadcast", job, "recipients"] => {
                ("POST", Action::AppendRecipients(id, job))
            }
            [
                "integration",
                "teams",
                id,
                "broadcast",
                job,
                "recipient",
                "list",
            ] => ("GET", Action::ListRecipients(id, job)),
            [
                "integration",
                "teams",
                id,
                "broadcast",
                job,
                verb @ ("start" | "pause" | "resume" | "cancel" | "retry"),
            ] => ("POST", Action::ControlBroadcast(id, job, verb)),
            [
                "integration",
                "teams",
                id,
                "broadcast",
                job,
                verb @ ("update" | "recall"),
            ] => ("POST", Action::EditBroadcast(id, job, verb)),
            ["integration", "teams", id, "destination", "create"] => {
                ("POST", Action::CreateDestination(id))
            }
            ["integration", "teams", id, "destination", "list"] => {
                ("GET", Action::ListDestinations(id))
            }
            [
                "integration",
                "teams",
                id,
                "destination",
                destination,
                "fetch",
            ] => ("GET", Action::FetchDestination(id, destination)),
            [
                "integration",
                "teams",
                id,
                "destination",
                destination,
                "update",
            ] => ("POST", Action::UpdateDestination(id, destination)),
            [
                "integration",
                "teams",
                id,
                "destination",
                destination,
                "delete",
            ] => ("POST", Action::DeleteDestination(id, destination)),
            ["contact", "list"] => ("GET", Action::ListContacts),
            ["contact", id, "fetch"] => ("GET", Action::FetchContact(id)),
            _ => return Err(ApiError::not_found("route")),
        };
        let method_ok = method.as_str() == allowed || (allowed == "GET" && method == Method::HEAD);
        if !method_ok {
            let mut response = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("use {allowed}"),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            return Ok(response);
        }
        if let Action::ConsentCallback = action {
            // Microsoft's redirect of an admin's browser: public, checked by its signed state.
            return Ok(self.consent_callback(query.as_deref()).await);
        }
        if let Action::OpenApi = action {
            let mut response = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(response);
        }
        let account = match self.authenticate(&request) {
            Ok(account) => account,
            Err(error) => return Ok(self.refuse_failed_auth(error, peer)),
        };
        let body = if allowed == "POST" {
            // Recipient lists are long: up to 10,000 a call.
            let limit = if matches!(
                action,
                Action::CreateBroadcast(_) | Action::AppendRecipients(..)
            ) {
                self.settings.bulk_body_limit_bytes
            } else {
                self.settings.body_limit_bytes
            };
            let body = self.read_body(request, limit).await?;
            *body_read = true;
            body
        } else {
            Bytes::new()
        };
        let query = query.as_deref();
        let value = match action {
            // Served above, before authentication.
            Action::OpenApi | Action::ConsentCallback => Err(ApiError::not_found("route")),
            Action::CreateBot => self.create_bot(&account, &body).await,
            Action::ListBots => self.list_bots(&account, query),
            Action::FetchBot(id) => self
                .owned_bot(&account, id)
                .map(|b| model::bot_view(&b.record, &b.owner)),
            Action::UpdateBot(id) => self.update_bot(&account, id, &body).await,
            Action::DeleteBot(id) => self.delete_bot(&account, id, &body).await,
            Action::CreateIntegration => self.create_integration(&account, &body).await,
            Action::ListIntegrations => self.list_integrations(&account, query),
            Action::FetchIntegration(id) => self
                .owned_integration(&account, id)
                .map(|i| model::integration_view(&i.record, &i.owner, &i.setup)),
            Action::UpdateIntegration(id) => self.update_integration(&account, id, &body).await,
            Action::DeleteIntegration(id) => self.delete_integration(&account, id, &body).await,
            Action::Setup(id) => self.setup_now(&account, id, &body).await,
            Action::ListEvents(id) => self.list_events(&account, id, query),
            Action::SendMessage(id) => self.send_message(&account, id, &body).await,
            Action::UpdateMessage(id) => self.update_message(&account, id, &body).await,
            Action::DeleteMessage(id) => self.delete_message(&account, id, &body).await,
            Action::ConsentUrl(id) => self.consent_url(&account, id, &body).await,
            Action::ListConnections(id) => self.list_connections(&account, id, query),
            Action::DeleteConnection(id, tenant) => {
                self.delete_connection(&account, id, tenant).await
            }
            Action::ListMembers(id) => self.list_members(&account, id, query).await,
            Action::GraphTeams(id) => self.list_graph_teams(&account, id, query).await,
            Action::GraphChannels(id, team) => {
                self.list_graph_channels(&account, id, team, query).await
            }
            Action::CreateBroadcast(id) => self.create_broadcast(&account, id, &body).await,
            Action::ListBroadcasts(id) => self.list_broadcasts(&account, id, query),
            Action::FetchBroadcast(id, job) => self.fetch_broadcast(&account, id, job),
            Action::AppendRecipients(id, job) => {
                self.append_broadcast_recipients(&account, id, job, &body)
                    .await
            }
            Action::ListRecipients(id, job) => {
                self.list_broadcast_recipients(&account, id, job, query)
                    .await
            }
            Action::EditBroadcast(id, job, verb) => {
                self.edit_broadcast(&account, id, job, verb, &body).await
            }
            Action::ControlBroadcast(id, job, verb) => {
                self.control_broadcast(&account, id, job, verb, &body).await
            }
            Action::CreateDestination(id) => self.create_destination(&account, id, &body).await,
            Action::ListDestinations(id) => self.list_destinations(&account, id, query),
            Action::FetchDestination(id, destination) => {
                self.fetch_destination(&account, id, destination)
            }
            Action::UpdateDestination(id, destination) => {
                self.update_destination(&account, id, destination, &body)
                    .await
            }
            Action::DeleteDestination(id, destination) => {
                self.delete_destination(&account, id, destination, &body)
                    .await
            }
            Action::ListContacts => self.list_contacts(&account, query),
            Action::FetchContact(id) => self.fetch_contact(&account, id),
        }?;
        Ok(json_response(StatusCode::OK, &value))
    }

    /// 401 for a wrong or missing key, or 429 once `peer` has had its share of failures this
    /// minute: guessing keys is slowed per address, while a valid key from the same address (a
    /// proxy in front of many clients) still passes. The key itself is never logged.
    fn refuse_failed_auth(&self, error: ApiError, peer: std::net::SocketAddr) -> Response<Body> {
        use governor::clock::Clock;
        if self.failed_auth.len() > FAILED_AUTH_ADDRESSES {
            self.failed_auth.retain_recent();
        }
        match self.failed_auth.check_key(&peer.ip()) {
            Ok(()) => {
                metrics::counter!(crate::telemetry::ADMIN_AUTH_FAILURES, "outcome" => "unauthorized")
                    .increment(1);
                error.into_response()
            }
            Err(not_until) => {
                metrics::counter!(crate::telemetry::ADMIN_AUTH_FAILURES, "outcome" => "rate_limited")
                    .increment(1);
                let wait = not_until.wait_time_from(crate::clock::RouterClock.now());
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut response = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_failed_attempts",
                    format!(
                        "too many requests with a wrong or missing API key from this address; \
                         retry in {} s",
                        seconds.max(1)
                    ),
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                response
            }
        }
    }

    /// The account whose API key is the bearer token.
    fn authenticate(&self, request: &Request<Incoming>) -> Result<String, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let header = request
            .headers()
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("Authorization: Bearer <api key> is required"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| unauthorized("Authorization: Bearer <api key> is required"))?;
        let presented = key_digest(key);
        // Every account is compared, so the time taken does not tell which one (or none) matched.
        let mut found = None;
        for (account, digest) in &self.accounts {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(account.clone());
            }
        }
        found.ok_or_else(|| unauthorized("the API key is not valid"))
    }

    async fn read_body(&self, request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is over {limit} bytes"),
            )
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        Limited::new(request.into_body(), limit)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "body_unreadable",
                        "the body could not be read",
                    )
                }
            })
    }

    fn owned_bot(&self, account: &str, id: &str) -> Result<Arc<Bot>, ApiError> {
        let bot = self
            .parts
            .registry
            .bot(id)
            .ok_or_else(|| ApiError::not_found("bot"))?;
        if bot.owner.account != account {
            return Err(ApiError::forbidden("bot"));
        }
        Ok(bot)
    }

    fn owned_integration(&self, account: &str, id: &str) -> Result<Arc<Integration>, ApiError> {
        let integration = self
            .parts
            .registry
            .integration(id)
            .ok_or_else(|| ApiError::not_found("integration"))?;
        if integration.owner.account != account {
            return Err(ApiError::forbidden("integration"));
        }
        Ok(integration)
    }

    // --- bots -----------------------------------------------------------------------------

    /// 400 naming the field when the outbound policy refuses the backend's URL.
    async fn check_destination(&self, backend: &BackendSpec) -> Result<(), ApiError> {
        let (field, url) = match backend {
            BackendSpec::Echo { .. } => return Ok(()),
            BackendSpec::Webhook { url, .. } => ("backend.url", url),
            BackendSpec::Openai { base_url, .. } => ("backend.baseUrl", base_url),
        };
        self.parts
            .egress
            .admit(url)
            .await
            .map(drop)
            .map_err(|refused| {
                ApiError::from(model::Invalid::field(
                    field,
                    format!("{field}: {url:?} is refused by the outbound policy: {refused}"),
                ))
            })
    }

    async fn create_bot(&self, account: &str, body: &[u8]) -> ApiResult {
        let input: model::CreateBot = model::parse_body(body)?;
        model::check_text("name", input.name.as_deref(), 256)?;
        model::check_text("description", input.description.as_deref(), 4096)?;
        model::check_backend(&input.backend)?;
        self.check_destination(&input.backend).await?;
        let _guard = self.write_lock.lock().await;
        let record = BotRecord {
            id: new_id("bot"),
            name: input.name,
            description: input.description,
            backend: input.backend,
            text_format: input.text_format,
        };
        let owner = self.new_owner(account);
        save_bot(&self.parts.vault, &record, &owner, None).await?;
        let id = record.id.clone();
        self.parts.registry.put_bot(record, owner);
        tracing::info!(bot = %id, account, "bot created");
        Ok(json!({"id": id}))
    }

    fn list_bots(&self, account: &str, query: Option<&str>) -> ApiResult {
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let items = self
            .parts
            .registry
            .bots()
            .into_iter()
            .filter(|b| b.owner.account == account)
            .map(|b| (position(&b.owner, &b.record.id), b))
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(|b| model::bot_view(&b.record, &b.owner)).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    async fn update_bot(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let input: model::UpdateBot = model::parse_body(body)?;
        let _guard = self.write_lock.lock().await;
        let current = self.owned_bot(account, id)?;
        let mut record = current.record.clone();
        if let Some(name) = input.name {
            model::check_text("name", name.as_deref(), 256)?;
            record.name = name;
        }
        if let Some(description) = input.description {
            model::check_text("description", description.as_deref(), 4096)?;
            record.description = description;
        }
        if let Some(text_format) = input.text_format {
            record.text_format = text_format;
        }
        if let Some(mut backend) = input.backend {
            let same_kind =
                std::mem::discriminant(&backend) == std::mem::discriminant(&record.backend);
            // A stored secret stays only with its origin: a new host gets it only if it is given
            // again, in this same update.
            let same_origin =
                model::backend_origin(&backend) == model::backend_origin(&record.backend);
            if same_kind && same_origin && model::backend_secret(&backend).is_none() {
                model::set_backend_secret(
                    &mut backend,
                    model::backend_secret(&record.backend).map(str::to_owned),
                );
            }
            model::check_backend(&backend)?;
            self.check_destination(&backend).await?;
            record.backend = backend;
        }
        let mut owner = current.owner.clone();
        owner.updated_at = now_ms().max(owner.updated_at);
        save_bot(&self.parts.vault, &record, &owner, None).await?;
        self.parts.registry.put_bot(record, owner);
        tracing::info!(bot = %id, "bot updated");
        Ok(json!({"id": id}))
    }

    async fn delete_bot(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let _: model::NoFields = model::parse_body(body)?;
        let _guard = self.write_lock.lock().await;
        self.owned_bot(account, id)?;
        let users: Vec<String> = self
            .parts
            .registry
            .integrations()
            .iter()
            .filter(|i| i.record.bot_id == id)
            .map(|i| i.record.id.clone())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "bot_in_use",
                format!(
                    "the bot is used by {} integration(s) ({}); delete them or move them to another bot first",
                    users.len(),
                    users.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        record_deletion(&self.parts.vault, "bot", id).await?;
        self.parts
            .vault
            .store
            .delete_record(BOTS_KIND, id)
            .await
            .map_err(ApiError::store)?;
        self.parts.registry.remove_bot(id);
        tracing::info!(bot = %id, "bot deleted");
        Ok(json!({"id": id}))
    }

    // --- integrations -----------------------------------------------------------------------

    /// The bot an integration may use: it exists and belongs to the same account.
    fn usable_bot(&self, account: &str, bot_id: &str) -> Result<(), ApiError> {
        match self.parts.registry.bot(bot_id) {
            None => Err(Invalid::field("botId", format!("botId: no bot {bot_id:?}")).into()),
            Some(bot) if bot.owner.account != account => Err(ApiError {
                field: Some("botId".into()),
                ..ApiError::forbidden("bot")
            }),
            Some(_) => Ok(()),
        }
    }

    async fn create_integration(self: &Arc<Self>, account: &str, body: &[u8]) -> ApiResult {
        let input: model::CreateIntegration = model::parse_body(body)?;
        let record = IntegrationRecord {
            id: new_id("teams"),
            bot_id: input.bot_id,
            name: input.name,
            description: input.description,
            blueprint_id: input.blueprint_id,
            bot_framework_app_id: input.bot_framework_app_id.filter(|s| !s.is_empty()),
            bot_framework_app_secret: input.bot_framework_app_secret.filter(|s| !s.is_empty()),
            bot_framework_app_secret_env: None,
            tenant_id: input.tenant_id.filter(|s| !s.is_empty()),
            app_tenant_id: input.app_tenant_id.filter(|s| !s.is_empty()),
            tenant_policy: input.tenant_policy.unwrap_or_default(),
            consent_redirect_url: input.consent_redirect_url.filter(|s| !s.is_empty()),
            session_duration: input
                .session_duration
                .unwrap_or(DEFAULT_SESSION_DURATION_MS),
            stream: input.stream.unwrap_or(false),
            contact_collection: input.contact_collection.unwrap_or(false),
            attachments: input.attachments.unwrap_or(false),
            allow_from: input.allow_from,
            meta: input
                .meta
                .map(|m| m.into_iter().filter(|(_, v)| !v.is_null()).collect())
                .unwrap_or_default(),
            // Never through the API: an integration without credentials accepts nothing.
            development: false,
            cloud: input.cloud,
            channels: input.channels,
            // Config only: they name hosts the router would call.
            cloud_settings: None,
        };
        model::check_integration_texts(&record)?;
        let _guard = self.write_lock.lock().await;
        self.usable_bot(account, &record.bot_id)?;
        let owner = self.new_owner(account);
        let setup = SetupResult {
            status: SetupStatus::Pending,
            ..SetupResult::default()
        };
        save_integration(&self.parts.vault, &record, &owner, &setup, None).await?;
        let integration = self.parts.registry.put_integration(record, owner, setup);
        self.refresh_readiness();
        self.parts.events.claim(&integration.record.id, account);
        self.parts
            .sink
            .record(&integration.id, EventDraft::new("integration.created"));
        tracing::info!(integration = %integration.id, account, "integration created");
        self.queue_setup(integration.record.id.clone());
        Ok(json!({"id": integration.record.id}))
    }

    fn list_integrations(&self, account: &str, query: Option<&str>) -> ApiResult {
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let items = self
            .parts
            .registry
            .integrations()
            .into_iter()
            .filter(|i| i.owner.account == account && meta_matches(&i.record.meta, &query.meta))
            .map(|i| (position(&i.owner, &i.record.id), i))
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page
                .iter()
                .map(|i| model::integration_view(&i.record, &i.owner, &i.setup))
                .collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    async fn update_integration(
        self: &Arc<Self>,
        account: &str,
        id: &str,
        body: &[u8],
    ) -> ApiResult {
        let input: model::UpdateIntegration = model::parse_body(body)?;
        let _guard = self.write_lock.lock().await;
        let current = self.owned_integration(account, id)?;
        let mut record = current.record.clone();
        let mut changed = Vec::new();
        macro_rules! set {
            ($field:ident, $name:literal, $value:expr) => {
                if let Some(value) = $value {
                    record.$field = value;
                    changed.push($name);
                }
            };
        }
        let blank_is_none = |v: Option<String>| v.filter(|s| !s.is_empty());
        set!(name, "name", input.name);
        set!(description, "description", input.description);
        set!(blueprint_id, "blueprintId", input.blueprint_id);
        set!(
            bot_framework_app_id,
            "botFrameworkAppId",
            input.bot_framework_app_id.map(blank_is_none)
        );
        set!(
            bot_framework_app_secret,
            "botFrameworkAppSecret",
            input.bot_framework_app_secret.map(blank_is_none)
        );
        set!(tenant_id, "tenantId", input.tenant_id.map(blank_is_none));
        set!(
            app_tenant_id,
            "appTenantId",
            input.app_tenant_id.map(blank_is_none)
        );
        set!(
            tenant_policy,
            "tenantPolicy",
            input.tenant_policy.map(Option::unwrap_or_default)
        );
        set!(
            consent_redirect_url,
            "consentRedirectUrl",
            input.consent_redirect_url.map(blank_is_none)
        );
        set!(
            session_duration,
            "sessionDuration",
            input
                .session_duration
                .map(|d| d.unwrap_or(DEFAULT_SESSION_DURATION_MS))
        );
        set!(stream, "stream", input.stream);
        set!(
            contact_collection,
            "contactCollection",
            input.contact_collection
        );
        set!(attachments, "attachments", input.attachments);
        set!(allow_from, "allowFrom", input.allow_from);
        set!(cloud, "cloud", input.cloud);
        set!(channels, "channels", input.channels);
        if let Some(bot_id) = input.bot_id {
            self.usable_bot(account, &bot_id)?;
            record.bot_id = bot_id;
            changed.push("botId");
        }
        if let Some(patch) = input.meta {
            model::merge_meta(&mut record.meta, patch);
            changed.push("meta");
        }
        model::check_integration_texts(&record)?;
        let mut owner = current.owner.clone();
        owner.updated_at = now_ms().max(owner.updated_at);
        let setup = SetupResult {
            status: SetupStatus::Pending,
            ..current.setup.clone()
        };
        save_integration(&self.parts.vault, &record, &owner, &setup, None).await?;
        let integration = self.parts.registry.put_integration(record, owner, setup);
        self.refresh_readiness();
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("integration.updated")
                .message(format!("changed: {}", changed.join(", "))),
        );
        tracing::info!(integration = %id, fields = %changed.join(","), "integration updated");
        self.queue_setup(id.to_owned());
        Ok(json!({"id": id}))
    }

    async fn delete_integration(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let _: model::NoFields = model::parse_body(body)?;
        let _guard = self.write_lock.lock().await;
        let integration = self.owned_integration(account, id)?;
        record_deletion(&self.parts.vault, "integration", id).await?;
        self.parts
            .vault
            .store
            .delete_record(INTEGRATIONS_KIND, id)
            .await
            .map_err(ApiError::store)?;
        self.parts.registry.remove_integration(id);
        // What it counted since the last summary goes into its log before the deletion does.
        self.parts.events.sum_up(&integration);
        self.setup_generation.remove(id);
        if let Err(error) = self.parts.vault.store.delete_record(SETUP_KIND, id).await {
            tracing::warn!(integration = %id, %error, "setup result of a deleted integration not removed");
        }
        let ended = self.parts.directory.end_integration(id);
        self.parts.tenants.remove_integration(id).await;
        self.parts.destinations.remove_integration(id).await;
        self.refresh_readiness();
        self.parts.sink.record(
            &integration.id,
            EventDraft::new("integration.deleted")
                .message(format!("{ended} live conversation(s) ended")),
        );
        tracing::info!(integration = %id, conversations = ended, "integration deleted");
        Ok(json!({"id": id}))
    }

    // --- setup ------------------------------------------------------------------------------

    /// A proactive message into a conversation, a user's personal chat or a channel.
    async fn send_message(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let integration = self.owned_integration(account, id)?;
        let request: proactive::MessageRequest = model::parse_body(body)?;
        let sent = proactive::send(
            &self.parts.addresses,
            &self.parts.connector,
            &integration,
            request,
            100,
        )
        .await;
        if let Ok(answer) = &sent {
            self.remember_sent(&integration.record.id, answer).await;
        }
        sent.map_err(|error| {
            let message = error.to_string();
            match error {
                proactive::ProactiveError::Invalid { field, .. } => ApiError {
                    field: Some(field.to_owned()),
                    ..ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
                },
                proactive::ProactiveError::Unknown(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "conversation_unknown", message)
                }
                proactive::ProactiveError::Development => {
                    ApiError::new(StatusCode::CONFLICT, "development_mode", message)
                }
                proactive::ProactiveError::NotInstalled => {
                    ApiError::new(StatusCode::CONFLICT, "not_installed", message)
                }
                proactive::ProactiveError::Connector(
                    crate::connector::ConnectorError::QueueFull(_),
                ) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "connector_busy", message),
                proactive::ProactiveError::Connector(_) => {
                    ApiError::new(StatusCode::BAD_GATEWAY, "connector_failed", message)
                }
            }
        })
    }

    async fn setup_now(&self, account: &str, id: &str, body: &[u8]) -> ApiResult {
        let _: model::NoFields = model::parse_body(body)?;
        let integration = self.owned_integration(account, id)?;
        // A queued automatic check would only repeat this one.
        if let Some(mut generation) = self.setup_generation.get_mut(id) {
            *generation += 1;
        }
        let result = self.run_setup(&integration).await;
        match (result.status, result.code.clone()) {
            (SetupStatus::Succeeded, _) => Ok(json!({"id": id})),
            (_, code) => Err(ApiError::new(
                StatusCode::CONFLICT,
                setup_code(code.as_deref()),
                result
                    .message
                    .unwrap_or_else(|| "the credential check failed".into()),
            )),
        }
    }

    /// Runs the check and keeps its result, unless the integration changed meanwhile (then the
    /// check queued by that change has the final word).
    async fn run_setup(&self, integration: &Integration) -> SetupResult {
        let result = self.parts.setup.check(integration).await;
        let kind = if result.status == SetupStatus::Succeeded {
            "setup.succeeded"
        } else {
            "setup.failed"
        };
        let mut event = EventDraft::new(kind);
        if let Some(code) = &result.code {
            event = event.reason(code.clone());
        }
        if let Some(message) = &result.message {
            event = event.message(message.clone());
        }
        self.parts.sink.record(&integration.id, event);
        let _guard = self.write_lock.lock().await;
        if let Some(current) = self.parts.registry.integration(&integration.record.id)
            && current.owner == integration.owner
        {
            match save_setup(&self.parts.vault, &current.record.id, &result).await {
                Ok(()) => {
                    self.parts.registry.put_integration(
                        current.record.clone(),
                        current.owner.clone(),
                        result.clone(),
                    );
                }
                Err(error) => {
                    tracing::warn!(integration = %current.id, error = %error.message, "setup result not saved")
                }
            }
        }
        result
    }

    /// Queues the automatic check after a change; quick successive changes cause one check.
    fn queue_setup(self: &Arc<Self>, id: String) {
        let generation = {
            let mut entry = self.setup_generation.entry(id.clone()).or_insert(0);
            *entry += 1;
            *entry
        };
        let admin = Arc::downgrade(self);
        let debounce = Duration::from_millis(self.settings.setup_debounce_ms);
        tokio::spawn(async move {
            tokio::time::sleep(debounce).await;
            let Some(admin) = admin.upgrade() else {
                return;
            };
            if admin.setup_generation.get(&id).map(|g| *g) != Some(generation) {
                return;
            }
            if let Some(integration) = admin.parts.registry.integration(&id) {
                admin.run_setup(&integration).await;
            }
        });
    }

    // --- events and contacts ----------------------------------------------------------------

    fn list_events(&self, account: &str, id: &str, query: Option<&str>) -> ApiResult {
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        // A deleted integration's log stays readable by its account.
        match self.owned_integration(account, id) {
            Ok(_) => {}
            Err(error) if error.status == StatusCode::NOT_FOUND => {
                match self.parts.events.owner(id) {
                    Some(owner) if owner == account => {}
                    Some(_) => return Err(ApiError::forbidden("integration")),
                    None => return Err(error),
                }
            }
            Err(error) => return Err(error),
        }
        let items = self
            .parts
            .events
            .events(id)
            .into_iter()
            .map(|e| {
                (
                    Position {
                        order: e.seq,
                        id: String::new(),
                    },
                    e,
                )
            })
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(model::event_view).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    fn list_contacts(&self, account: &str, query: Option<&str>) -> ApiResult {
        let query = ListQuery::parse(query, self.settings.list_max_take)?;
        let integration = query.extra("integrationId");
        let items = self
            .parts
            .contacts
            .of_account(account, integration)
            .into_iter()
            .map(|c| {
                (
                    Position {
                        order: c.first_seen_at,
                        id: c.id.clone(),
                    },
                    c,
                )
            })
            .collect();
        let (page, cursor) = query.page(items);
        Ok(json!({
            "items": page.iter().map(model::contact_view).collect::<Vec<_>>(),
            "cursor": cursor,
        }))
    }

    fn fetch_contact(&self, account: &str, id: &str) -> ApiResult {
        let contact = self
            .parts
            .contacts
            .get(id)
            .ok_or_else(|| ApiError::not_found("contact"))?;
        if contact.account != account {
            return Err(ApiError::forbidden("contact"));
        }
        Ok(model::contact_view(&contact))
    }

    // --- other instances ------------------------------------------------------------------

    /// With a shared store, picks up bots and integrations changed by other instances.
    pub async fn run_sync(self: Arc<Self>, config: Config, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(
            self.settings.sync_interval_ms.max(100),
        ));
        let mut seen = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let revision = match self.parts.vault.store.records_revision().await {
                Ok(r) => r,
                Err(_) => continue,
            };
            if seen == Some(revision) {
                continue;
            }
            let _guard = self.write_lock.lock().await;
            match load(
                &self.parts.vault,
                &self.parts.registry,
                Some(&self.parts.directory),
                &config,
                false,
            )
            .await
            {
                Ok(()) => {
                    seen = Some(revision);
                    self.refresh_readiness();
                    self.parts.tenants.refresh().await;
                    self.parts.destinations.refresh().await;
                }
                Err(error) => tracing::warn!(%error, "records of other instances not loaded yet"),
            }
        }
    }
}

enum Action<'a> {
    OpenApi,
    CreateBot,
    ListBots,
    FetchBot(&'a str),
    UpdateBot(&'a str),
    DeleteBot(&'a str),
    CreateIntegration,
    ListIntegrations,
    FetchIntegration(&'a str),
    UpdateIntegration(&'a str),
    DeleteIntegration(&'a str),
    Setup(&'a str),
    ListEvents(&'a str),
    SendMessage(&'a str),
    UpdateMessage(&'a str),
    DeleteMessage(&'a str),
    ConsentUrl(&'a str),
    ListConnections(&'a str),
    DeleteConnection(&'a str, &'a str),
    ConsentCallback,
    CreateBroadcast(&'a str),
    ListBroadcasts(&'a str),
    FetchBroadcast(&'a str, &'a str),
    AppendRecipients(&'a str, &'a str),
    ListRecipients(&'a str, &'a str),
    ControlBroadcast(&'a str, &'a str, &'a str),
    EditBroadcast(&'a str, &'a str, &'a str),
    ListMembers(&'a str),
    GraphTeams(&'a str),
    GraphChannels(&'a str, &'a str),
    CreateDestination(&'a str),
    ListDestinations(&'a str),
    FetchDestination(&'a str, &'a str),
    UpdateDestination(&'a str, &'a str),
    DeleteDestination(&'a str, &'a str),
    ListContacts,
    FetchContact(&'a str),
}

fn setup_code(code: Option<&str>) -> &'static str {
    crate::telemetry::SETUP_RESULTS
        .iter()
        .find(|c| Some(**c) == code)
        .copied()
        .unwrap_or("setup_failed")
}

fn position(owner: &Owner, id: &str) -> Position {
    Position {
        order: owner.order,
        id: id.to_owned(),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn save_bot(
    parts: &Vault,
    record: &BotRecord,
    owner: &Owner,
    seed_digest: Option<String>,
) -> Result<(), ApiError> {
    let mut stored = StoredBot {
        record: record.clone(),
        sealed_secret: model::backend_secret(&record.backend)
            .map(|s| parts.sealer.seal(&bot_sealed_context(record), s)),
        owner: owner.clone(),
        seed_digest: seed_digest.or_else(|| owner.seed.clone()),
    };
    model::set_backend_secret(&mut stored.record.backend, None);
    let bytes = serde_json::to_vec(&stored)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let result = parts
        .store
        .put_records(BOTS_KIND, vec![(record.id.clone(), bytes)])
        .await;
    parts.health.observe("records", &result);
    result.map_err(ApiError::store)
}

async fn record_deletion(parts: &Vault, kind: &str, id: &str) -> Result<(), ApiError> {
    let result = parts
        .store
        .put_records(
            DELETED_KIND,
            vec![(format!("{kind}/{id}"), now_ms().to_string().into_bytes())],
        )
        .await;
    parts.health.observe("records", &result);
    result.map_err(ApiError::store)
}

async fn save_setup(parts: &Vault, id: &str, setup: &SetupResult) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(setup)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let result = parts
        .store
        .put_records(SETUP_KIND, vec![(id.to_owned(), bytes)])
        .await;
    parts.health.observe("records", &result);
    result.map_err(ApiError::store)
}

async fn save_integration(
    parts: &Vault,
    record: &IntegrationRecord,
    owner: &Owner,
    setup: &SetupResult,
    seed_digest: Option<String>,
) -> Result<(), ApiError> {
    let mut stored = StoredIntegration {
        record: record.clone(),
        sealed_secret: record.bot_framework_app_secret.as_deref().map(|s| {
            parts
                .sealer
                .seal(&sealed_context(INTEGRATIONS_KIND, &record.id), s)
        }),
        owner: owner.clone(),
        setup: setup.clone(),
        seed_digest: seed_digest.or_else(|| owner.seed.clone()),
    };
    stored.record.bot_framework_app_secret = None;
    stored.record.bot_framework_app_secret_env = None;
    let bytes = serde_json::to_vec(&stored)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let result = parts
        .store
        .put_records(INTEGRATIONS_KIND, vec![(record.id.clone(), bytes)])
        .await;
    parts.health.observe("records", &result);
    result.map_err(ApiError::store)
}

/// Loads bots and integrations into the registry: the stored records, and (with `seed`, at
/// start) the config's `[[bots]]`/`[[integrations]]`. A seed is written over its stored record
/// when the config entry changed since it was last seeded (the digest differs); otherwise the
/// stored record, with the changes the API made to it, wins. Records sealed with a previous master key are
/// sealed again with the current one. Records gone from the store leave the registry (another
/// instance deleted them).
pub async fn load(
    parts: &Vault,
    registry: &Registry,
    directory: Option<&Directory>,
    config: &Config,
    seed: bool,
) -> Result<(), StoreError> {
    let default_account = config
        .accounts
        .first()
        .map(|a| a.id.clone())
        .unwrap_or_else(|| "default".into());
    let stored_bots = parts.store.records(BOTS_KIND).await;
    parts.health.observe("records", &stored_bots);
    let stored_integrations = parts.store.records(INTEGRATIONS_KIND).await;
    parts.health.observe("records", &stored_integrations);
    let stored_deletions = parts.store.records(DELETED_KIND).await;
    parts.health.observe("records", &stored_deletions);
    let deleted: std::collections::HashSet<String> =
        stored_deletions?.into_iter().map(|(id, _)| id).collect();
    let stored_setups = parts.store.records(SETUP_KIND).await;
    parts.health.observe("records", &stored_setups);
    let (stored_bots, stored_integrations) = (stored_bots?, stored_integrations?);
    let setups: HashMap<String, SetupResult> = stored_setups?
        .into_iter()
        .filter_map(|(id, bytes)| Some((id, serde_json::from_slice(&bytes).ok()?)))
        .collect();

    // Records whose stored secret this process cannot open ("bot/ID", "integration/ID").
    let mut unreadable: std::collections::BTreeSet<String> = Default::default();
    let mut bots: HashMap<String, (BotRecord, Owner, Option<String>, bool)> = HashMap::new();
    for (id, bytes) in stored_bots {
        let Ok(stored) = serde_json::from_slice::<StoredBot>(&bytes) else {
            tracing::error!(bot = %id, "stored bot is unreadable; skipped");
            continue;
        };
        let mut record = stored.record;
        let mut reseal = false;
        if let Some(sealed) = &stored.sealed_secret {
            let opened = match parts.sealer.open(&bot_sealed_context(&record), sealed) {
                Ok(secret) => Ok((secret, parts.sealer.needs_reseal(sealed))),
                Err(error) => parts
                    .sealer
                    .open(&sealed_context(BOTS_KIND, &id), sealed)
                    .map(|secret| (secret, true))
                    .map_err(|_| error),
            };
            match opened {
                Ok((secret, stale)) => {
                    reseal = stale;
                    model::set_backend_secret(&mut record.backend, Some(secret));
                }
                Err(error) => {
                    tracing::error!(bot = %id, %error, "the bot's secret cannot be opened with the configured master key");
                    unreadable.insert(format!("bot/{id}"));
                }
            }
        }
        let owner = Owner {
            seed: stored.seed_digest.clone(),
            ..stored.owner
        };
        bots.insert(id, (record, owner, stored.seed_digest, reseal));
    }
    let mut integrations: HashMap<String, (StoredIntegration, bool)> = HashMap::new();
    for (id, bytes) in stored_integrations {
        let Ok(mut stored) = serde_json::from_slice::<StoredIntegration>(&bytes) else {
            tracing::error!(integration = %id, "stored integration is unreadable; skipped");
            continue;
        };
        stored.owner.seed = stored.seed_digest.clone();
        // The latest check of this version of the record, if it is newer than the record.
        if let Some(setup) = setups.get(&id)
            && setup
                .checked_at
                .is_some_and(|at| at >= stored.owner.updated_at)
        {
            stored.setup = setup.clone();
        }
        let mut reseal = false;
        if let Some(sealed) = &stored.sealed_secret {
            match parts
                .sealer
                .open(&sealed_context(INTEGRATIONS_KIND, &id), sealed)
            {
                Ok(secret) => {
                    reseal = parts.sealer.needs_reseal(sealed);
                    stored.record.bot_framework_app_secret = Some(secret);
                }
                Err(error) => {
                    tracing::error!(integration = %id, %error, "the App Secret cannot be opened with the configured master key");
                    unreadable.insert(format!("integration/{id}"));
                }
            }
        }
        integrations.insert(id, (stored, reseal));
    }

    let now = now_ms();
    let (seed_bots, seed_integrations) = if seed {
        (config.bots.as_slice(), config.integrations.as_slice())
    } else {
        (&[][..], &[][..])
    };
    for (index, seed) in seed_bots.iter().enumerate() {
        let mut public = seed.clone();
        model::set_backend_secret(&mut public.backend, None);
        let secret = model::backend_secret(&seed.backend);
        let stored = bots.get_mut(&seed.id);
        let (verdict, digest) = seed_verdict(
            &parts.sealer,
            stored.as_ref().and_then(|b| b.2.as_deref()),
            &public,
            secret,
            seed,
        );
        match (verdict, stored) {
            (SeedVerdict::Same, _) => continue,
            (SeedVerdict::Legacy, Some(stored)) => {
                // Written before digests were derived: same entry, its digest is renewed.
                stored.1.seed = Some(digest.clone());
                stored.2 = Some(digest);
                stored.3 = true;
                continue;
            }
            _ => {}
        }
        let owner = bots
            .get(&seed.id)
            .map(|(_, o, _, _)| o.clone())
            .unwrap_or(Owner {
                account: default_account.clone(),
                created_at: now,
                updated_at: now,
                order: now * 1000 + index as u64,
                seed: None,
            });
        let owner = Owner {
            updated_at: now,
            seed: Some(digest.clone()),
            ..owner
        };
        if let Err(error) = save_bot(parts, seed, &owner, Some(digest.clone())).await {
            tracing::warn!(bot = %seed.id, error = %error.message, "seeded bot not stored; the config entry is used from memory");
        }
        unreadable.remove(&format!("bot/{}", seed.id));
        bots.insert(seed.id.clone(), (seed.clone(), owner, Some(digest), false));
    }
    for (index, seed) in seed_integrations.iter().enumerate() {
        let mut public = seed.clone();
        public.bot_framework_app_secret = None;
        let secret = seed.bot_framework_app_secret.as_deref();
        let stored = integrations.get_mut(&seed.id);
        let (verdict, digest) = seed_verdict(
            &parts.sealer,
            stored.as_ref().and_then(|i| i.0.seed_digest.as_deref()),
            &public,
            secret,
            seed,
        );
        match (verdict, stored) {
            (SeedVerdict::Same, _) => continue,
            (SeedVerdict::Legacy, Some(stored)) => {
                stored.0.owner.seed = Some(digest.clone());
                stored.0.seed_digest = Some(digest);
                stored.1 = true;
                continue;
            }
            _ => {}
        }
        let owner = integrations
            .get(&seed.id)
            .map(|(s, _)| s.owner.clone())
            .unwrap_or(Owner {
                account: default_account.clone(),
                created_at: now,
                updated_at: now,
                order: now * 1000 + (config.bots.len() + index) as u64,
                seed: None,
            });
        let owner = Owner {
            updated_at: now,
            seed: Some(digest.clone()),
            ..owner
        };
        let setup = SetupResult::default();
        if let Err(error) =
            save_integration(parts, seed, &owner, &setup, Some(digest.clone())).await
        {
            tracing::warn!(integration = %seed.id, error = %error.message, "seeded integration not stored; the config entry is used from memory");
        }
        unreadable.remove(&format!("integration/{}", seed.id));
        integrations.insert(
            seed.id.clone(),
            (
                StoredIntegration {
                    record: seed.clone(),
                    sealed_secret: None,
                    owner,
                    setup,
                    seed_digest: Some(digest),
                },
                false,
            ),
        );
    }

    // A secret sealed under another master key is never replaced by a wrong one: the config's
    // value stands in for it where the config has one for the same destination (bot origin, App
    // ID); the others stay unreadable, refused at use and named by /readyz. Nothing is written
    // back, so the process that sealed it keeps reading it.
    for seed in &config.bots {
        let mark = format!("bot/{}", seed.id);
        if !unreadable.contains(&mark) {
            continue;
        }
        if let (Some((record, ..)), Some(secret)) =
            (bots.get_mut(&seed.id), model::backend_secret(&seed.backend))
            && model::backend_origin(&record.backend) == model::backend_origin(&seed.backend)
        {
            model::set_backend_secret(&mut record.backend, Some(secret.to_owned()));
            unreadable.remove(&mark);
        }
    }
    for seed in &config.integrations {
        let mark = format!("integration/{}", seed.id);
        if !unreadable.contains(&mark) {
            continue;
        }
        if let (Some((stored, _)), Some(secret)) = (
            integrations.get_mut(&seed.id),
            seed.bot_framework_app_secret.as_ref(),
        ) && stored.record.bot_framework_app_id == seed.bot_framework_app_id
        {
            stored.record.bot_framework_app_secret = Some(secret.clone());
            unreadable.remove(&mark);
        }
    }
    if !unreadable.is_empty() {
        tracing::error!(
            records = ?unreadable,
            "stored secrets cannot be opened with this router's master key and the config has no value for them: they are not used (another router with another master key sealed them?)"
        );
    }
    registry.set_unreadable_secrets(unreadable);

    for (id, (record, owner, digest, reseal)) in &bots {
        if *reseal {
            let _ = save_bot(parts, record, owner, digest.clone()).await;
        }
        let unchanged = registry.bot(id).is_some_and(|b| {
            b.owner == *owner
                && b.record.backend == record.backend
                && b.record.text_format == record.text_format
        });
        if !unchanged {
            registry.put_bot(record.clone(), owner.clone());
        }
    }
    for bot in registry.bots() {
        if bots.contains_key(&bot.record.id) {
            continue;
        }
        if deleted.contains(&format!("bot/{}", bot.record.id)) {
            registry.remove_bot(&bot.record.id);
        } else {
            // The store lost it (not a deletion): write it back from memory.
            tracing::warn!(bot = %bot.record.id, "bot missing from the store; written back");
            let _ = save_bot(parts, &bot.record, &bot.owner, None).await;
        }
    }
    for (id, (stored, reseal)) in &integrations {
        if *reseal {
            let _ = save_integration(
                parts,
                &stored.record,
                &stored.owner,
                &stored.setup,
                stored.seed_digest.clone(),
            )
            .await;
        }
        let unchanged = registry.integration(id).is_some_and(|i| {
            i.owner == stored.owner
                && i.setup == stored.setup
                && i.record.bot_framework_app_secret == stored.record.bot_framework_app_secret
        });
        if !unchanged {
            registry.put_integration(
                stored.record.clone(),
                stored.owner.clone(),
                stored.setup.clone(),
            );
        }
    }
    for integration in registry.integrations() {
        let id = &integration.record.id;
        if integrations.contains_key(id) {
            continue;
        }
        if deleted.contains(&format!("integration/{id}")) {
            registry.remove_integration(id);
            if let Some(directory) = directory {
                directory.end_integration(id);
            }
        } else {
            tracing::warn!(integration = %id, "integration missing from the store; written back");
            let _ = save_integration(
                parts,
                &integration.record,
                &integration.owner,
                &integration.setup,
                None,
            )
            .await;
        }
    }
    Ok(())
}

/// The config's seeds alone, when the store cannot be read at start.
pub fn load_seeds_only(registry: &Registry, config: &Config) {
    let seeded = Registry::from_config(config);
    for bot in seeded.bots() {
        registry.put_bot(bot.record.clone(), bot.owner.clone());
    }
    for integration in seeded.integrations() {
        registry.put_integration(
            integration.record.clone(),
            integration.owner.clone(),
            SetupResult::default(),
        );
    }
}
