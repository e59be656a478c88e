//! Configuration: one TOML document, overridden key by key from `TEAMS_ROUTER__SECTION__KEY`
//! variables. Parsing goes through [`Config::from_sources`], which takes the TOML text and an
//! environment map, so tests never touch the process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The `[microsoft]` section belongs to the room that uses it.
pub use crate::auth::MicrosoftConfig;
pub use crate::records::{
    AccountRecord, BackendSpec, BotRecord, DEFAULT_SESSION_DURATION_MS, IntegrationRecord,
    MAX_SESSION_DURATION_MS, TextFormat,
};

/// The API key of `config/router.toml`, which anybody can read: loopback listeners only.
pub const SHIPPED_DEVELOPMENT_API_KEY: &str = "dev-api-key-change-me";

/// Prefix of environment overrides; segments are separated by a double underscore.
pub const ENV_PREFIX: &str = "TEAMS_ROUTER__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TOML: {0}")]
    Toml(String),
    #[error("environment override {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub microsoft: MicrosoftConfig,
    pub storage: StorageConfig,
    pub conversation: ConversationConfig,
    pub admission: AdmissionConfig,
    pub connector: ConnectorConfig,
    pub testing: TestingConfig,
    pub security: SecurityConfig,
    pub admin: AdminConfig,
    pub backend: BackendConfig,
    pub streaming: StreamingConfig,
    pub broadcast: BroadcastConfig,
    pub accounts: Vec<AccountRecord>,
    pub bots: Vec<BotRecord>,
    pub integrations: Vec<IntegrationRecord>,
}

/// `[broadcast]`: how broadcasts share Teams' limits with live conversations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BroadcastConfig {
    /// Percent of each tenant's Teams budget (per app) broadcasts may fill; live conversations
    /// keep the rest.
    pub max_share: u32,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self { max_share: 80 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the activity and management listener.
    pub listen: String,
    /// Address of the operations listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_listen: String,
    /// Largest accepted request body; larger ones are refused with 413 while reading.
    pub body_limit_bytes: u64,
    /// A client that has not sent complete request headers after this long is disconnected.
    pub header_read_timeout_ms: u64,
    /// Open connections at most; further ones wait in the kernel backlog.
    pub max_connections: usize,
    /// PEM certificate chain; with `tls_key`, the listener speaks TLS (HTTP/2 via ALPN).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// How long SIGTERM waits for running turns before exiting.
    pub shutdown_timeout_ms: u64,
    /// A request body not received in full this long after its headers is refused (408), so
    /// that a sender trickling bytes cannot hold a connection and a request slot.
    pub body_read_timeout_ms: u64,
}

/// How much work the router takes before shedding load (see `conversation::admission`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Activities acknowledged and not finished (queued or in their turn), over all
    /// integrations; past it, 503 + Retry-After.
    pub max_pending: usize,
    /// The same, per integration; past it, 429 + Retry-After for that integration only.
    pub max_pending_per_integration: usize,
    /// Turns running at once (backend and connector work), over all integrations; more wait.
    pub max_turns_in_flight: usize,
    /// Turns running at once per integration; more wait.
    pub max_turns_in_flight_per_integration: usize,
    /// How late the runtime may run a task before new activities are shed (503 + Retry-After;
    /// three late wake-ups in a row with work pending): past the machine's capacity, work queues
    /// up long before the bounds above are reached. 0 never sheds on lag.
    pub max_runtime_lag_ms: u64,
    /// How busy (share of wall time running tasks, over all worker threads) the runtime may be
    /// before new activities are shed (503 + Retry-After; a second of 100 ms intervals at or
    /// above it, with more pending than a second's worth of finished activities): a runtime that
    /// never parks has more work than CPU, and what it accepts then only queues. 0 never sheds
    /// on it.
    pub max_runtime_busy_percent: u64,
    /// The mean wait of request-serving tasks to run once woken, every 10 ms, that the router
    /// keeps by refusing a share of new activities (503 + Retry-After; PIE, RFC 8033): past the
    /// machine's capacity with many clients at once, requests wait in front of the router before
    /// anything queues inside it. 0 neither measures nor sheds on it.
    pub target_request_wait_ms: u64,
    /// How much later than usual activities may arrive (their age by their `timestamp`, over
    /// the least of the last two minutes) while the workers are busy, kept by refusing a share
    /// of new activities (503 + Retry-After; PIE) and, while they arrive later than this,
    /// activities more than twice this late: a sender that delivers each conversation's
    /// activities one at a time queues the excess on its side, where the router sees it only as
    /// age. 0 neither measures nor sheds on it.
    pub target_arrival_delay_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_pending: 50_000,
            max_pending_per_integration: 10_000,
            max_turns_in_flight: 4_096,
            max_turns_in_flight_per_integration: 1_024,
            max_runtime_lag_ms: 500,
            max_runtime_busy_percent: 95,
            target_request_wait_ms: 250,
            target_arrival_delay_ms: 500,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:3978".into(),
            ops_listen: "127.0.0.1:9464".into(),
            body_limit_bytes: 1_048_576,
            header_read_timeout_ms: 10_000,
            max_connections: 10_000,
            tls_cert: None,
            tls_key: None,
            shutdown_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Embedded,
    Redis,
}

/// What durable accept does while the store cannot record activities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreUnavailable {
    /// Answer 503 + Retry-After, so the Bot Connector redelivers later.
    Refuse,
    /// Accept into memory only (lost if the process dies before the turn ends).
    Accept,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Directory of the embedded database file.
    pub path: PathBuf,
    /// Page cache of the embedded database.
    pub embedded_cache_bytes: usize,
    /// `redis://`, `rediss://`, `redis-cluster://host:port?node=host:port`, or
    /// `redis-sentinel://host:port/db?sentinelServiceName=name`.
    pub redis_url: String,
    /// Redis Cluster seed nodes (`host:port`); when set, `redis_url` is not used.
    pub redis_cluster_nodes: Vec<String>,
    pub redis_pool_size: usize,
    pub redis_command_timeout_ms: u64,
    /// Namespace of every Redis key.
    pub key_prefix: String,
    /// Record every activity before answering 200. Default: true for redis, false for embedded.
    pub durable_accept: Option<bool>,
    /// A readable part of this process's name as a partition holder (each start adds a random
    /// suffix, so nothing depends on it surviving a restart). Default: the host name.
    pub instance_id: Option<String>,
    pub on_unavailable: OnStoreUnavailable,
    /// How long a global dedup claim (Redis) is kept.
    pub dedup_ttl_secs: u64,
    /// Activities journaled in one write at most (group commit).
    pub journal_batch_max: usize,
    /// Snapshots waiting to be written at most; beyond it new ones are dropped and counted.
    pub snapshot_pending_max: usize,
    /// Embedded store without durable accept: a conversation gathers its turns into one
    /// snapshot for this long, and snapshot batches are committed without waiting for the disk
    /// and reach it at most this far apart (and at shutdown); 0 writes and syncs every turn.
    /// A kill -9 may lose up to twice this much session history, never an acknowledged activity.
    pub snapshot_sync_ms: u64,
    /// How long the snapshot writer gathers snapshots into one batch before writing it (less
    /// when the batch fills first); 0 writes whatever is pending at once.
    pub snapshot_batch_ms: u64,
    /// Redis: conversations map to this many partitions (a stable hash); each has one holder
    /// at a time, which runs its turns in order. Changing it moves conversations: drain first.
    pub partitions: u16,
    /// Redis: a partition's lease lasts this long unless renewed (every third of it); a dead
    /// instance's partitions are taken over after about this long.
    pub lease_ms: u64,
    /// Redis: an activity is acknowledged once this many replicas confirmed its append (`WAIT`
    /// on the append's connection); fewer within `redis_wait_timeout_ms` is 503 + Retry-After.
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Embedded,
            path: PathBuf::from("data"),
            embedded_cache_bytes: 64 * 1024 * 1024,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_nodes: Vec::new(),
            redis_pool_size: 4,
            redis_command_timeout_ms: 1_000,
            key_prefix: "teams-router".into(),
            durable_accept: None,
            instance_id: None,
            on_unavailable: OnStoreUnavailable::Refuse,
            dedup_ttl_secs: 3_600,
            journal_batch_max: 512,
            snapshot_pending_max: 200_000,
            snapshot_sync_ms: 1_000,
            snapshot_batch_ms: 20,
            partitions: 1_024,
            lease_ms: 5_000,
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 100,
        }
    }
}

impl StorageConfig {
    pub fn durable_accept(&self) -> bool {
        self.durable_accept
            .unwrap_or(self.backend == StorageBackend::Redis)
    }

    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "default".into())
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationConfig {
    /// Activities waiting in one conversation at most; one more is refused with 429.
    pub mailbox_capacity: usize,
    /// Conversations held in memory at most; a new one beyond that is refused with 503.
    pub max_active: usize,
    /// A conversation with nothing to do for this long is passivated: its state is written to
    /// the store and leaves memory.
    pub idle_timeout_ms: u64,
    /// A conversation with nothing to do for this long gives its actor back and rests: its
    /// session stays in memory (a few hundred bytes instead of an actor's kilobytes) and the
    /// next activity starts a new actor on it. 0, or not below `idle_timeout_ms`: never rests.
    pub rest_after_ms: u64,
    /// Conversations that keep their actor while quiet, at most: past this many with an actor,
    /// a quiet one rests as soon as its turn ends instead of after `rest_after_ms` (an actor is
    /// about 15 KiB, a resting conversation a few hundred bytes). 0: no bound.
    pub max_awake: usize,
    /// Activity ids remembered per conversation to drop redeliveries.
    pub dedup_window: usize,
    /// How long an invoke waits for the bot's answer before it is answered with an error body.
    pub invoke_timeout_ms: u64,
    /// Retry-After (seconds) sent with 429/503 when shedding load.
    pub retry_after_secs: u64,
    /// Session history bounds: entries, and bytes of text.
    pub history_max_turns: usize,
    pub history_max_bytes: usize,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        Self {
            mailbox_capacity: 64,
            max_active: 100_000,
            idle_timeout_ms: 300_000,
            rest_after_ms: 2_000,
            max_awake: 4_096,
            dedup_window: 256,
            invoke_timeout_ms: 4_500,
            retry_after_secs: 1,
            history_max_turns: 50,
            history_max_bytes: 32 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorConfig {
    /// Attempts per outbound call, the first one included.
    pub max_attempts: u32,
    /// A message that still fails after `max_attempts` (429, 412, 5xx, timeouts; not a refused
    /// connection) is tried again, at `backoff_max_ms` at most apart, until this long after its
    /// first attempt, unless the process is shutting down; the conversation's next turn waits.
    pub retry_window_ms: u64,
    /// First backoff step; doubled per attempt, with full jitter.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A server's Retry-After is honoured up to this many seconds.
    pub max_retry_after_secs: u64,
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Host suffixes a bearer token may be sent to (loopback hosts are always allowed).
    pub allowed_service_hosts: Vec<String>,
    /// Sent to the conversation when the bot is added; none when absent.
    pub welcome_message: Option<String>,
    /// Teams' limits per bot and conversation, as `[window_ms, sends]` pairs (protocol.md §3.4).
    pub conversation_limits: Vec<[u64; 2]>,
    /// Teams' limits per bot app and tenant, as `[window_ms, sends]` pairs.
    pub app_limits: Vec<[u64; 2]>,
    /// Outbound activities of one bot (app and tenant) waiting for the limits at most; one more
    /// fails at once.
    pub max_queued: usize,
    /// A message's size at most, counted as Teams does (UTF-16 bytes of the activity): a larger
    /// answer goes as several messages (Teams refuses about 100 KB and advises 80 KB).
    pub max_message_bytes: usize,
    /// Where proactive messages go in a tenant or team the router has had no traffic from, for
    /// integrations without a `cloud` (protocol.md §3.1: the public cloud's global endpoint).
    pub proactive_service_url: String,
}

pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 80_000;

impl Default for ConnectorConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            retry_window_ms: 120_000,
            backoff_base_ms: 500,
            backoff_max_ms: 20_000,
            max_retry_after_secs: 60,
            request_timeout_ms: 15_000,
            connect_timeout_ms: 5_000,
            allowed_service_hosts: [
                "botframework.com",
                "smba.trafficmanager.net",
                "teams.microsoft.com",
                "teams.microsoft.us",
                "botframework.azure.us",
                "botframework.azure.cn",
                "teams.microsoftonline.cn",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            welcome_message: None,
            conversation_limits: vec![[1_000, 7], [2_000, 8], [30_000, 60], [3_600_000, 1_800]],
            app_limits: vec![[1_000, 50]],
            max_queued: 100_000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            proactive_service_url: "https://smba.trafficmanager.net/teams/".into(),
        }
    }
}

/// Hooks for the test suite; all off by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// A message whose text (mentions stripped) equals this makes its conversation actor panic,
    /// to prove supervision. Never set in production.
    pub panic_trigger: Option<String>,
}

/// Secrets at rest: the master key that seals app secrets, webhook secrets and model API keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Environment variable holding the master key (32 bytes, base64 or hex). When absent, the
    /// key is read from `master_key_file`, which is generated on first start.
    pub master_key_env: Option<String>,
    /// Default: beside the data directory, `{storage.path}.master.key` (`data.master.key`;
    /// created with mode 0600), so that a copy of the data does not carry its key.
    pub master_key_file: Option<PathBuf>,
    /// During a rotation: the previous master key, still accepted for reading; records sealed
    /// with it are sealed again with the current key at start.
    pub previous_master_key_env: Option<String>,
    /// Backend destinations allowed beyond the default (https to public addresses): CIDRs,
    /// addresses or host patterns (`*.corp.example.com`); a covered destination may use http.
    pub backend_allow: Vec<String>,
    /// Backend destinations refused whatever else allows them (same forms).
    pub backend_deny: Vec<String>,
}

/// The bots' backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// A webhook's whole answer (streamed or not) must arrive within this.
    pub webhook_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// A model's whole streamed answer must arrive within this.
    pub openai_timeout_ms: u64,
    /// Characters of session history sent to a model at most (oldest turns go first).
    pub openai_history_max_chars: usize,
    /// Said to the user instead of an answer when the bot's backend fails.
    pub apology: String,
}

/// Teams streaming of answers in personal chats (integrations with `stream: true`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// Time between two streaming updates at least (from the end of one to the start of the
    /// next); Teams asks for 1.5 to 2 s of buffering and throttles faster streams.
    pub interval_ms: u64,
    /// The informative update that starts a stream (at most 1000 characters).
    pub informative_text: String,
    /// Teams ends a stream 2 minutes after it started; later text goes as one plain message.
    pub max_duration_ms: u64,
    /// An answer not streamed (group chats, channels, `stream: false`) that takes longer than
    /// this gets a typing indicator first, repeated while the user waits.
    pub typing_delay_ms: u64,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1_500,
            informative_text: "Working on it…".into(),
            max_duration_ms: 110_000,
            typing_delay_ms: 250,
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            webhook_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            openai_timeout_ms: 60_000,
            openai_history_max_chars: 24_000,
            apology: "Sorry, I could not answer that just now. Please try again.".into(),
        }
    }
}

/// The management API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Events kept per integration (the oldest are dropped).
    pub event_log_size: usize,
    /// Quiet time after an update before the automatic setup check runs (several quick updates
    /// cause one check).
    pub setup_debounce_ms: u64,
    /// How long a setup check waits for the token endpoint.
    pub setup_timeout_ms: u64,
    /// Largest `take` of a list request.
    pub list_max_take: usize,
    /// With a shared store: how often other instances' changes are picked up.
    pub sync_interval_ms: u64,
    /// A contact's `lastSeenAt` is written to the store at most this often.
    pub contact_touch_interval_ms: u64,
    /// Largest management request body.
    pub body_limit_bytes: usize,
    /// Largest body of a broadcast's create and `…/recipients` calls (up to 10,000 recipients).
    pub bulk_body_limit_bytes: usize,
    /// Serves the management API on its own address (say, a private interface); the traffic
    /// listener then answers only activities. Default: the traffic listener (`server.listen`).
    pub listen: Option<String>,
    /// Failed API-key attempts a client address may make in a minute; past them, its requests
    /// with a wrong or missing key get 429 (a valid key still passes).
    pub failed_auth_per_minute: u32,
    /// The router's address as browsers and Microsoft reach it (`https://router.example.com`):
    /// the admin-consent callback is `{public_url}/api/v1/teams/consent/callback`, which the
    /// operator registers as a redirect URI of each app that asks consent.
    pub public_url: Option<String>,
    /// How long an admin-consent URL stays usable (Microsoft's redirect must come back within it).
    pub consent_ttl_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            event_log_size: 500,
            setup_debounce_ms: 1_000,
            setup_timeout_ms: 10_000,
            list_max_take: 100,
            sync_interval_ms: 2_000,
            contact_touch_interval_ms: 60_000,
            body_limit_bytes: 65_536,
            bulk_body_limit_bytes: 4 * 1024 * 1024,
            listen: None,
            failed_auth_per_minute: 20,
            public_url: None,
            consent_ttl_ms: 300_000,
        }
    }
}

/// Field names that environment overrides may create inside `[[bots]]`/`[[integrations]]`
/// entries; variables are upper-case, so the camelCase spelling is recovered from this list.
const CAMEL_CASE_KEYS: &[&str] = &[
    "botId",
    "blueprintId",
    "botFrameworkAppId",
    "botFrameworkAppSecret",
    "botFrameworkAppSecretEnv",
    "tenantId",
    "appTenantId",
    "tenantPolicy",
    "consentRedirectUrl",
    "sessionDuration",
    "contactCollection",
    "allowFrom",
    "baseUrl",
    "apiKey",
    "systemPrompt",
    "textFormat",
    "cloudSettings",
    "openidMetadataUrl",
    "tokenIssuer",
    "loginUrl",
    "tokenTenant",
    "oauthScope",
];

impl Config {
    /// Reads the file at `path` and applies overrides from the process environment.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_sources(&text, std::env::vars())
    }

    /// Builds the effective configuration from TOML text and environment variables.
    pub fn from_sources(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: toml::Table = toml_text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Toml(e.to_string()))?;
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (name, value) in &env {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                apply_override(&mut doc, path, value).map_err(|reason| ConfigError::Env {
                    name: name.clone(),
                    reason,
                })?;
            }
        }
        let mut config: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.resolve_secret_references(&env)?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_secret_references(
        &mut self,
        env: &BTreeMap<String, String>,
    ) -> Result<(), ConfigError> {
        let lookup = |name: &str, owner: &str| {
            env.get(name).cloned().ok_or_else(|| {
                ConfigError::Invalid(format!("{owner}: environment variable {name} is not set"))
            })
        };
        for account in &mut self.accounts {
            if account.api_key.is_none()
                && let Some(name) = &account.api_key_env
            {
                account.api_key = Some(lookup(name, &format!("account {}", account.id))?);
            }
        }
        if let Some(name) = &self.security.master_key_env
            && !env.contains_key(name)
        {
            return Err(ConfigError::Invalid(format!(
                "security.master_key_env: environment variable {name} is not set"
            )));
        }
        for integration in &mut self.integrations {
            if integration.bot_framework_app_secret.is_none()
                && let Some(name) = &integration.bot_framework_app_secret_env
            {
                integration.bot_framework_app_secret =
                    Some(lookup(name, &format!("integration {}", integration.id))?);
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for (key, value) in [
            ("server.listen", &self.server.listen),
            ("server.ops_listen", &self.server.ops_listen),
        ] {
            if value.parse::<SocketAddr>().is_err() {
                return invalid(format!(
                    "{key}: {value:?} is not an address like 127.0.0.1:3978"
                ));
            }
        }
        if let Some(admin) = &self.admin.listen
            && admin.parse::<SocketAddr>().is_err()
        {
            return invalid(format!(
                "admin.listen: {admin:?} is not an address like 127.0.0.1:3979"
            ));
        }
        if self.admin.failed_auth_per_minute == 0 {
            return invalid("admin.failed_auth_per_minute must be positive".into());
        }
        let admin_listen = self.admin.listen.as_deref().unwrap_or(&self.server.listen);
        let admin_is_loopback = admin_listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !admin_is_loopback
            && let Some(account) = self
                .accounts
                .iter()
                .find(|a| a.api_key.as_deref() == Some(SHIPPED_DEVELOPMENT_API_KEY))
        {
            return invalid(format!(
                "account {}: the shipped development API key {SHIPPED_DEVELOPMENT_API_KEY:?} is \
                 published in the README; it is refused while the management API listens on \
                 {admin_listen:?}, which is not loopback. Give the account a key of its own \
                 (api_key_env = \"NAME\"), or serve the API on loopback (admin.listen)",
                account.id
            ));
        }
        if let Some(public_url) = &self.admin.public_url {
            match url::Url::parse(public_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.query().is_none() => {}
                _ => {
                    return invalid(format!(
                        "admin.public_url: {public_url:?} is not an http(s) URL without a query"
                    ));
                }
            }
        }
        if !(1..=100).contains(&self.broadcast.max_share) {
            return invalid("broadcast.max_share is a percentage from 1 to 100".into());
        }
        if self.server.body_limit_bytes == 0 {
            return invalid("server.body_limit_bytes must be greater than 0".into());
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return invalid("server.tls_cert and server.tls_key go together".into());
        }
        for (key, value) in [
            (
                "microsoft.openid_metadata_url",
                &self.microsoft.openid_metadata_url,
            ),
            ("microsoft.login_url", &self.microsoft.login_url),
            ("microsoft.graph_url", &self.microsoft.graph_url),
        ] {
            match url::Url::parse(value) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return invalid(format!("{key}: {value:?} is not an http(s) URL")),
            }
        }
        let admission = &self.admission;
        if [
            admission.max_pending,
            admission.max_pending_per_integration,
            admission.max_turns_in_flight,
            admission.max_turns_in_flight_per_integration,
        ]
        .contains(&0)
        {
            return invalid("every admission.* limit must be positive".into());
        }
        if admission.max_runtime_busy_percent > 100 {
            return invalid(format!(
                "admission.max_runtime_busy_percent = {} is above 100 (0 turns it off)",
                admission.max_runtime_busy_percent
            ));
        }
        let storage = &self.storage;
        if storage.partitions == 0 || storage.partitions > 16_384 {
            return invalid(format!(
                "storage.partitions = {} must be 1-16384",
                storage.partitions
            ));
        }
        if storage.lease_ms < 300 {
            return invalid(format!(
                "storage.lease_ms = {} is below 300",
                storage.lease_ms
            ));
        }
        if storage.redis_wait_replicas > 0 && storage.redis_wait_timeout_ms == 0 {
            return invalid(
                "storage.redis_wait_timeout_ms must be positive with redis_wait_replicas (0 would wait forever)"
                    .into(),
            );
        }
        if storage.key_prefix.contains(['{', '}']) {
            return invalid(
                "storage.key_prefix must not contain braces (they make Redis Cluster hash tags)"
                    .into(),
            );
        }
        if self.server.body_read_timeout_ms == 0 {
            return invalid("server.body_read_timeout_ms must be positive".into());
        }
        if self.conversation.mailbox_capacity == 0 || self.conversation.max_active == 0 {
            return invalid(
                "conversation.mailbox_capacity and conversation.max_active must be positive".into(),
            );
        }
        if self.connector.max_message_bytes < 1_024 {
            return invalid("connector.max_message_bytes must be at least 1024".into());
        }
        if self.connector.max_attempts == 0 {
            return invalid("connector.max_attempts must be at least 1".into());
        }
        let informative = self.streaming.informative_text.chars().count();
        if informative == 0 || informative > 1_000 {
            return invalid(
                "streaming.informative_text must have 1 to 1000 characters (Teams' limit)".into(),
            );
        }
        if self.streaming.max_duration_ms > 120_000 {
            return invalid("streaming.max_duration_ms: Teams ends streams after 120000 ms".into());
        }
        for (key, limits) in [
            (
                "connector.conversation_limits",
                &self.connector.conversation_limits,
            ),
            ("connector.app_limits", &self.connector.app_limits),
        ] {
            if limits
                .iter()
                .any(|[window, count]| *window == 0 || *count == 0)
            {
                return invalid(format!(
                    "{key}: every [window_ms, sends] pair needs a positive window and count"
                ));
            }
        }
        if self.storage.backend == StorageBackend::Redis
            && !self.storage.redis_url.starts_with("redis")
        {
            return invalid(format!(
                "storage.redis_url: {:?} is not a redis:// URL",
                self.storage.redis_url
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for bot in &self.bots {
            check_id("bots", &bot.id)?;
            if !seen.insert(bot.id.as_str()) {
                return invalid(format!("bots: duplicate id {:?}", bot.id));
            }
        }
        let listen_is_loopback = self
            .server
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        let mut seen_integrations = std::collections::HashSet::new();
        for integration in &self.integrations {
            check_id("integrations", &integration.id)?;
            if !seen_integrations.insert(integration.id.as_str()) {
                return invalid(format!("integrations: duplicate id {:?}", integration.id));
            }
            if !seen.contains(integration.bot_id.as_str()) {
                return invalid(format!(
                    "integration {}: botId {:?} names no bot in [[bots]]",
                    integration.id, integration.bot_id
                ));
            }
            if integration.session_duration > MAX_SESSION_DURATION_MS {
                return invalid(format!(
                    "integration {}: sessionDuration {} is over the maximum of {} ms (30 days)",
                    integration.id, integration.session_duration, MAX_SESSION_DURATION_MS
                ));
            }
            let has_app_id = integration
                .bot_framework_app_id
                .as_deref()
                .is_some_and(|s| !s.is_empty());
            let has_secret = integration
                .bot_framework_app_secret
                .as_deref()
                .is_some_and(|s| !s.is_empty());
            if let Err(why) = crate::auth::cloud::resolve(
                integration.cloud.as_deref(),
                integration.cloud_settings.as_ref(),
            ) {
                return invalid(format!("integration {}: {why}", integration.id));
            }
            if integration.development && has_app_id {
                return invalid(format!(
                    "integration {}: development = true is for an integration without \
                     botFrameworkAppId (unsigned local traffic); remove one of them",
                    integration.id
                ));
            }
            if integration.development && !listen_is_loopback {
                return invalid(format!(
                    "integration {}: development = true accepts unsigned activities from loopback \
                     peers, so it is allowed only while server.listen is a loopback address \
                     (it is {:?})",
                    integration.id, self.server.listen
                ));
            }
            if has_app_id && !has_secret {
                return invalid(format!(
                    "integration {}: botFrameworkAppId is set but botFrameworkAppSecret \
                     (or botFrameworkAppSecretEnv) is missing",
                    integration.id
                ));
            }
        }
        let egress = crate::backend::egress::EgressPolicy::new(
            &self.security.backend_allow,
            &self.security.backend_deny,
        )
        .map_err(ConfigError::Invalid)?;
        for bot in &self.bots {
            let (field, url) = match &bot.backend {
                BackendSpec::Echo { .. } => continue,
                BackendSpec::Webhook { url, .. } => ("url", url),
                BackendSpec::Openai { base_url, .. } => ("baseUrl", base_url),
            };
            if let Err(refused) = egress.screen(url) {
                return invalid(format!(
                    "bot {}: backend.{field} {url:?} is refused: {refused}",
                    bot.id
                ));
            }
        }
        for account in &self.accounts {
            if account.api_key.as_deref().is_none_or(str::is_empty) {
                return invalid(format!(
                    "account {}: api_key or api_key_env is required",
                    account.id
                ));
            }
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by `***`.
    pub fn to_masked_toml(&self) -> String {
        const MASK: &str = "***";
        let mut masked = self.clone();
        for account in &mut masked.accounts {
            if account.api_key.is_some() {
                account.api_key = Some(MASK.into());
            }
        }
        for bot in &mut masked.bots {
            match &mut bot.backend {
                BackendSpec::Webhook {
                    secret: Some(s), ..
                } => *s = MASK.into(),
                BackendSpec::Openai {
                    api_key: Some(k), ..
                } => *k = MASK.into(),
                _ => {}
            }
        }
        for integration in &mut masked.integrations {
            if integration.bot_framework_app_secret.is_some() {
                integration.bot_framework_app_secret = Some(MASK.into());
            }
            if integration.tenant_id.is_some() {
                integration.tenant_id = Some(MASK.into());
            }
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Ids appear in URL paths and store keys, so they stay in a small, unambiguous alphabet.
fn check_id(what: &str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{what}: id {id:?} must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'"
        )))
    }
}

/// Sets `doc[a][b]...` from a `A__B__...` variable path. Array entries are addressed by index;
/// values are read as TOML literals (numbers, booleans, arrays) and otherwise as strings.
fn apply_override(doc: &mut toml::Table, path: &str, raw: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err("empty path segment".into());
    }
    let value = parse_env_value(raw);
    let mut table = doc;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let key = resolve_key(table, segment);
        if last {
            table.insert(key, value);
            return Ok(());
        }
        let next_is_index = segments[i + 1].parse::<usize>().is_ok();
        let entry = table.entry(key).or_insert_with(|| {
            if next_is_index {
                toml::Value::Array(Vec::new())
            } else {
                toml::Value::Table(toml::Table::new())
            }
        });
        table = match entry {
            toml::Value::Table(t) => t,
            toml::Value::Array(items) => {
                let index: usize = segments[i + 1]
                    .parse()
                    .map_err(|_| format!("{} is an array: expected an index", segment))?;
                if index > items.len() {
                    return Err(format!("index {index} is past the end of {segment}"));
                }
                if index == items.len() {
                    items.push(toml::Value::Table(toml::Table::new()));
                }
                let rest = segments[i + 2..].join("__");
                return match &mut items[index] {
                    toml::Value::Table(t) if !rest.is_empty() => apply_override(t, &rest, raw),
                    _ => Err(format!("{segment}[{index}] cannot take this override")),
                };
            }
            _ => return Err(format!("{segment} is not a table")),
        };
    }
    Ok(())
}

fn resolve_key(table: &toml::Table, segment: &str) -> String {
    if let Some(existing) = table.keys().find(|k| k.eq_ignore_ascii_case(segment)) {
        return existing.clone();
    }
    if let Some(known) = CAMEL_CASE_KEYS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(segment))
    {
        return (*known).to_string();
    }
    segment.to_ascii_lowercase()
}

fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match wrapped.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:3978"

[[bots]]
id = "echo"
backend = { kind = "echo" }

[[integrations]]
id = "teams_dev"
botId = "echo"
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_scalar_keys() {
        let c = Config::from_sources(
            BASE,
            env(&[
                ("TEAMS_ROUTER__SERVER__LISTEN", "127.0.0.1:4000"),
                ("TEAMS_ROUTER__SERVER__BODY_LIMIT_BYTES", "2048"),
                ("TEAMS_ROUTER__STORAGE__BACKEND", "redis"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:4000");
        assert_eq!(c.server.body_limit_bytes, 2048);
        assert_eq!(c.storage.backend, StorageBackend::Redis);
    }

    #[test]
    fn env_overrides_reach_array_entries_with_camel_case_keys() {
        let c = Config::from_sources(
            BASE,
            env(&[
                ("TEAMS_ROUTER__INTEGRATIONS__0__BOTFRAMEWORKAPPID", "app-1"),
                (
                    "TEAMS_ROUTER__INTEGRATIONS__0__BOTFRAMEWORKAPPSECRET",
                    "s3cret",
                ),
                ("TEAMS_ROUTER__INTEGRATIONS__0__TENANTID", "tenant-1"),
            ]),
        )
        .unwrap();
        let i = &c.integrations[0];
        assert_eq!(i.bot_framework_app_id.as_deref(), Some("app-1"));
        assert_eq!(i.tenant_id.as_deref(), Some("tenant-1"));
    }

    #[test]
    fn secret_env_references_are_resolved_and_masked() {
        let text = format!(
            "{BASE}botFrameworkAppId = \"app\"\nbotFrameworkAppSecretEnv = \"MY_SECRET\"\n"
        );
        let c = Config::from_sources(&text, env(&[("MY_SECRET", "hunter2")])).unwrap();
        assert_eq!(
            c.integrations[0].bot_framework_app_secret.as_deref(),
            Some("hunter2")
        );
        let shown = c.to_masked_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn invalid_configs_say_why() {
        let cases = [
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[server]\nbogus = 1\n", "unknown field"),
            (
                "[[integrations]]\nid = \"x\"\nbotId = \"missing\"\n",
                "names no bot",
            ),
            (
                "[[bots]]\nid = \"a/b\"\nbackend = { kind = \"echo\" }\n",
                "must be 1-128",
            ),
            (
                "[admission]\nmax_runtime_busy_percent = 150\n",
                "max_runtime_busy_percent = 150 is above 100",
            ),
            ("[storage]\npartitions = 0\n", "storage.partitions = 0"),
            ("[storage]\nlease_ms = 10\n", "storage.lease_ms = 10"),
            (
                "[storage]\nkey_prefix = \"a{b}\"\n",
                "must not contain braces",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::from_sources(text, Vec::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
