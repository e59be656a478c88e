//! Metric names, the Prometheus recorder, and the ops endpoints (`/metrics`, `/healthz`,
//! `/readyz`). Every metric of the contract is described and created at start-up, with its known
//! label values at zero, so dashboards work before the first event. Labels never carry a
//! conversation or user id.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const ACTIVITIES_RECEIVED: &str = "teams_router_activities_received_total";
pub const ACTIVITIES_REJECTED: &str = "teams_router_activities_rejected_total";
pub const ACTIVITIES_DUPLICATE: &str = "teams_router_activities_duplicate_total";
pub const INGRESS_DURATION: &str = "teams_router_ingress_duration_seconds";
pub const TURN_DURATION: &str = "teams_router_turn_duration_seconds";
pub const FIRST_REPLY: &str = "teams_router_first_reply_seconds";
pub const CONNECTOR_REQUESTS: &str = "teams_router_connector_requests_total";
pub const CONNECTOR_RETRIES: &str = "teams_router_connector_retries_total";
pub const CONVERSATIONS_ACTIVE: &str = "teams_router_conversations_active";
pub const CONVERSATIONS_RESTING: &str = "teams_router_conversations_resting";
pub const ACTOR_RESTARTS: &str = "teams_router_actor_restarts_total";
pub const SNAPSHOT_DURATION: &str = "teams_router_snapshot_duration_seconds";
pub const SNAPSHOT_FAILURES: &str = "teams_router_snapshot_failures_total";
pub const TURNS_FAILED: &str = "teams_router_turns_failed_total";
pub const KEY_REFRESHES: &str = "teams_router_signing_key_refreshes_total";
pub const STORE_ERRORS: &str = "teams_router_store_errors_total";
pub const STORE_UP: &str = "teams_router_store_up";
pub const JOURNAL_RECOVERED: &str = "teams_router_journal_recovered_total";
pub const PARTITIONS_HELD: &str = "teams_router_partitions_held";
pub const PARTITION_TAKEOVERS: &str = "teams_router_partition_takeovers_total";
pub const PARTITION_REPLAYED: &str = "teams_router_partition_replayed_total";
pub const PARTITION_FENCED: &str = "teams_router_partition_fenced_total";
pub const PARTITION_TURNS_DROPPED: &str = "teams_router_partition_turns_dropped_total";
pub const ACTIVITIES_IGNORED: &str = "teams_router_activities_ignored_total";
pub const SETUP_CHECKS: &str = "teams_router_setup_checks_total";
pub const EVENTS_DROPPED: &str = "teams_router_events_dropped_total";
pub const CONTACTS: &str = "teams_router_contacts";
pub const TENANT_CONNECTIONS: &str = "teams_router_tenant_connections";
pub const TENANT_CONNECTS: &str = "teams_router_tenant_connects_total";
pub const CONSENT_CALLBACKS: &str = "teams_router_consent_callbacks_total";
pub const BROADCAST_RECIPIENTS: &str = "teams_router_broadcast_recipients_total";
pub const BROADCASTS_ACTIVE: &str = "teams_router_broadcasts_active";
pub const BROADCAST_EDITS: &str = "teams_router_broadcast_edits_total";
pub const CONNECTOR_QUEUE_DEPTH: &str = "teams_router_connector_queue_depth";
pub const STREAMS: &str = "teams_router_streams_total";
pub const ADMIN_AUTH_FAILURES: &str = "teams_router_admin_auth_failures_total";
pub const SECRETS_UNREADABLE: &str = "teams_router_secrets_unreadable";
pub const RUNTIME_SHEDDING: &str = "teams_router_runtime_shedding";
pub const RUNTIME_BUSY: &str = "teams_router_runtime_busy_ratio";
pub const REQUEST_WAIT: &str = "teams_router_request_wait_seconds";
pub const SHED_SHARE: &str = "teams_router_shed_share";
pub const ARRIVAL_DELAY: &str = "teams_router_arrival_delay_seconds";

/// What a management request with a wrong or missing API key got (`outcome` label).
pub const ADMIN_AUTH_OUTCOMES: &[&str] = &["unauthorized", "rate_limited"];

/// How a streamed answer ended (`outcome` label).
pub const STREAM_OUTCOMES: &[&str] = &["completed", "fallback", "cancelled"];

/// What a broadcast's send to one recipient came to (`outcome` label).
pub const BROADCAST_OUTCOMES: &[&str] = &[
    "sent",
    "blocked",
    "not_installed",
    "admin_disabled",
    "not_found",
    "too_large",
    "throttled_out",
    "ambiguous",
    "forbidden",
    "unknown_address",
    "invalid",
    "error",
    "later",
];

/// How a tenant was connected (`source` label).
pub const CONNECTION_SOURCES: &[&str] = &["consent", "installation"];
/// What an admin-consent callback came to (`outcome` label).
pub const CONSENT_OUTCOMES: &[&str] = &[
    "connected",
    "refused",
    "invalid_state",
    "expired_state",
    "reused_state",
    "unknown_integration",
    "no_token",
    "store_unavailable",
];

/// Why an acknowledged activity was not given to its bot (`reason` label).
pub const IGNORE_REASONS: &[&str] = &["sender_not_allowed"];
/// Setup check outcomes (`result` label): `ok` or the failure code.
pub const SETUP_RESULTS: &[&str] = &[
    "ok",
    "missing_credentials",
    "invalid_secret",
    "wrong_tenant",
    "credentials_refused",
    "token_endpoint_unreachable",
    "token_endpoint_invalid",
];

/// Store operations (`op` label of `store_errors_total`).
pub const STORE_OPS: &[&str] = &[
    "get",
    "put",
    "journal_append",
    "journal_complete",
    "ping",
    "records",
];

/// Activity `type` label values; anything else is counted as `other` so that a hostile sender
/// cannot create series.
pub const ACTIVITY_TYPES: &[&str] = &[
    "message",
    "conversationUpdate",
    "installationUpdate",
    "messageReaction",
    "messageUpdate",
    "messageDelete",
    "invoke",
    "event",
    "typing",
    "endOfConversation",
    "other",
];

/// Connector operations (`op` label).
pub const CONNECTOR_OPS: &[&str] = &[
    "reply",
    "send",
    "update",
    "delete",
    "create_conversation",
    "members",
    "token",
    "graph",
];
/// Status label values created at start; others appear when they happen.
const CONNECTOR_STATUSES: &[&str] = &[
    "200", "201", "202", "401", "429", "500", "502", "503", "504", "error",
];

/// Why an outbound call was retried (`reason` label).
pub const RETRY_REASONS: &[&str] = &[
    "throttled",
    "precondition_failed",
    "ambiguous_5xx",
    "ambiguous_timeout",
    "connect",
    "unauthorized",
];

/// Why an activity was refused (`reason` label); also the `reason` of the error body.
pub const REJECT_REASONS: &[&str] = &[
    "body_too_large",
    "body_unreadable",
    "unknown_integration",
    "missing_token",
    "malformed_token",
    "unsupported_algorithm",
    "unknown_key",
    "bad_signature",
    "bad_issuer",
    "bad_audience",
    "expired",
    "not_yet_valid",
    "missing_endorsement",
    "serviceurl_mismatch",
    "tenant_mismatch",
    "tenant_not_connected",
    "not_loopback",
    "no_credentials",
    "channel_not_allowed",
    "discovery_unavailable",
    "malformed_json",
    "missing_field",
    "service_url_not_allowed",
    "mailbox_full",
    "overloaded",
    "integration_overloaded",
    "too_deep",
    "body_timeout",
    "store_unavailable",
];

/// The index in [`ACTIVITY_TYPES`] of an activity `type` (`other` for unknown ones).
pub fn activity_type_index(kind: &str) -> usize {
    ACTIVITY_TYPES
        .iter()
        .position(|t| *t == kind)
        .unwrap_or(ACTIVITY_TYPES.len() - 1)
}

/// Histogram buckets in seconds, from sub-millisecond ingress to multi-second turns.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct RecorderError(String);

/// Installs the process-wide recorder (once; later calls share it) and registers every metric of
/// the contract. Call it before building the registry, whose integrations register their series.
pub fn install() -> Result<PrometheusHandle, RecorderError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    // Routers started at once (tests on several threads) install one recorder: the second
    // waits here and shares it, where it used to fail to install its own.
    static INSTALLING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let _installing = INSTALLING.lock();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = builder()?
        .install_recorder()
        .map_err(|e| RecorderError(e.to_string()))?;
    describe_all();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// A recorder for the calling thread alone (the process-wide one stays as it is), with every
/// metric of the contract registered: what an in-process test router on a current-thread
/// runtime records goes here, so its figures are its own. The recorder lives as long as the
/// process (a test's worth of series).
pub(crate) fn install_on_this_thread()
-> Result<(PrometheusHandle, metrics::LocalRecorderGuard<'static>), RecorderError> {
    let recorder = builder()?.build_recorder();
    let handle = recorder.handle();
    let recorder: &'static metrics_exporter_prometheus::PrometheusRecorder =
        Box::leak(Box::new(recorder));
    let guard = metrics::set_default_local_recorder(recorder);
    describe_all();
    Ok((handle, guard))
}

fn builder() -> Result<PrometheusBuilder, RecorderError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| RecorderError(e.to_string()))
}

fn describe_all() {
    describe_counter!(
        ACTIVITIES_RECEIVED,
        Unit::Count,
        "Activities verified, parsed and routed, by integration and activity type."
    );
    describe_counter!(
        ACTIVITIES_REJECTED,
        Unit::Count,
        "Activities refused before routing, by reason."
    );
    describe_counter!(
        ACTIVITIES_DUPLICATE,
        Unit::Count,
        "Redelivered activities acknowledged and dropped."
    );
    describe_histogram!(
        INGRESS_DURATION,
        Unit::Seconds,
        "Time from request arrival to the HTTP answer for activities."
    );
    describe_histogram!(
        TURN_DURATION,
        Unit::Seconds,
        "Time a conversation turn took, from its start to its last outbound message."
    );
    describe_histogram!(
        FIRST_REPLY,
        Unit::Seconds,
        "Time from accepting an activity to the first outbound message of its turn."
    );
    describe_counter!(
        CONNECTOR_REQUESTS,
        Unit::Count,
        "Bot Connector and token endpoint requests, by operation and HTTP status (error: no response)."
    );
    describe_counter!(
        CONNECTOR_RETRIES,
        Unit::Count,
        "Retried outbound requests, by reason; ambiguous_* may have posted already."
    );
    describe_gauge!(
        CONVERSATIONS_ACTIVE,
        Unit::Count,
        "Conversations held in memory (with an actor, or resting without one)."
    );
    describe_gauge!(
        CONVERSATIONS_RESTING,
        Unit::Count,
        "Conversations held in memory without an actor (quiet for conversation.rest_after_ms)."
    );
    describe_counter!(
        ACTOR_RESTARTS,
        Unit::Count,
        "Conversation actors restarted by their supervisor after a failure."
    );
    describe_histogram!(
        SNAPSHOT_DURATION,
        Unit::Seconds,
        "Time to write one conversation snapshot to the store."
    );
    describe_counter!(
        SNAPSHOT_FAILURES,
        Unit::Count,
        "Conversation snapshot writes that failed."
    );
    describe_counter!(
        TURNS_FAILED,
        Unit::Count,
        "Turns that ended without their reply (backend or connector failure, panic)."
    );
    describe_counter!(
        KEY_REFRESHES,
        Unit::Count,
        "OpenID metadata and signing-key refreshes, by result."
    );

    describe_counter!(
        STORE_ERRORS,
        Unit::Count,
        "Failed store operations, by operation."
    );
    describe_gauge!(
        STORE_UP,
        Unit::Count,
        "1 while the store answers, 0 while it fails."
    );
    describe_counter!(
        JOURNAL_RECOVERED,
        Unit::Count,
        "Accepted-but-unanswered activities found in the journal at start and run again."
    );
    describe_counter!(
        ACTIVITIES_IGNORED,
        Unit::Count,
        "Activities acknowledged and not given to the bot, by reason (allowFrom)."
    );
    describe_counter!(
        SETUP_CHECKS,
        Unit::Count,
        "Integration setup checks (live client-credentials requests), by result."
    );
    describe_counter!(
        EVENTS_DROPPED,
        Unit::Count,
        "Integration events not logged because the event queue was full."
    );
    describe_gauge!(
        CONTACTS,
        Unit::Count,
        "Contact records held (integrations with contactCollection)."
    );
    for reason in IGNORE_REASONS {
        counter!(ACTIVITIES_IGNORED, "reason" => *reason).increment(0);
    }
    for result in SETUP_RESULTS {
        counter!(SETUP_CHECKS, "result" => *result).increment(0);
    }
    counter!(EVENTS_DROPPED).increment(0);
    gauge!(CONTACTS).set(0.0);
    describe_gauge!(
        TENANT_CONNECTIONS,
        Unit::Count,
        "Tenants connected to integrations (admin consent or installation)."
    );
    describe_counter!(
        TENANT_CONNECTS,
        Unit::Count,
        "Tenant connections made or renewed, by source (consent, installation)."
    );
    describe_counter!(
        CONSENT_CALLBACKS,
        Unit::Count,
        "Admin-consent callbacks received, by outcome."
    );
    gauge!(TENANT_CONNECTIONS).set(0.0);
    describe_counter!(
        BROADCAST_RECIPIENTS,
        Unit::Count,
        "Broadcast sends finished, by outcome (sent, or the reason a recipient failed)."
    );
    describe_gauge!(
        BROADCASTS_ACTIVE,
        Unit::Count,
        "Broadcast jobs running (on any instance, as this one knows them)."
    );
    for outcome in BROADCAST_OUTCOMES {
        counter!(BROADCAST_RECIPIENTS, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        BROADCAST_EDITS,
        Unit::Count,
        "Delivered broadcast copies changed (updated, recalled) or not (failed)."
    );
    for outcome in ["updated", "recalled", "failed"] {
        counter!(BROADCAST_EDITS, "outcome" => outcome).increment(0);
    }
    gauge!(BROADCASTS_ACTIVE).set(0.0);
    for source in CONNECTION_SOURCES {
        counter!(TENANT_CONNECTS, "source" => *source).increment(0);
    }
    for outcome in CONSENT_OUTCOMES {
        counter!(CONSENT_CALLBACKS, "outcome" => *outcome).increment(0);
    }
    describe_gauge!(
        CONNECTOR_QUEUE_DEPTH,
        Unit::Count,
        "Outbound activities waiting for room in Teams' rate limits."
    );
    gauge!(CONNECTOR_QUEUE_DEPTH).set(0.0);
    describe_counter!(
        STREAMS,
        Unit::Count,
        "Answers streamed into Teams, by outcome (completed, fallback: Teams refused the stream and one message was sent, cancelled: the user stopped it)."
    );
    for outcome in STREAM_OUTCOMES {
        counter!(STREAMS, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        ADMIN_AUTH_FAILURES,
        Unit::Count,
        "Management requests with a wrong or missing API key, by outcome (unauthorized: 401; rate_limited: 429, the client address had admin.failed_auth_per_minute failures)."
    );
    describe_gauge!(
        SECRETS_UNREADABLE,
        Unit::Count,
        "Stored records whose secret cannot be opened with this router's master key and has no config value (not used; /readyz names them)."
    );
    gauge!(SECRETS_UNREADABLE).set(0.0);
    describe_gauge!(
        RUNTIME_SHEDDING,
        Unit::Count,
        "1 while new activities are shed (503, reason overloaded) because the runtime runs tasks later than admission.max_runtime_lag_ms or its workers stay busier than admission.max_runtime_busy_percent with a backlog, else 0."
    );
    gauge!(RUNTIME_SHEDDING).set(0.0);
    describe_gauge!(
        RUNTIME_BUSY,
        Unit::Count,
        "Share of wall time (0 to 1) the runtime's worker threads spent running tasks over the last 100 ms."
    );
    gauge!(RUNTIME_BUSY).set(0.0);
    describe_gauge!(
        REQUEST_WAIT,
        Unit::Seconds,
        "Mean time the activity listener's request-serving tasks waited to run once woken, over the last 100 ms."
    );
    gauge!(REQUEST_WAIT).set(0.0);
    describe_gauge!(
        ARRIVAL_DELAY,
        Unit::Seconds,
        "How much later than usual activities arrive: the mean excess of their age (the router's clock minus their timestamp) over the least age of the last two minutes, over the last 10 ms."
    );
    gauge!(ARRIVAL_DELAY).set(0.0);
    describe_gauge!(
        SHED_SHARE,
        Unit::Count,
        "Share (0 to 1) of new activities refused (503, reason overloaded) to keep the request wait near admission.target_request_wait_ms and, while the workers are busy, the arrival delay near admission.target_arrival_delay_ms."
    );
    gauge!(SHED_SHARE).set(0.0);
    describe_gauge!(
        PARTITIONS_HELD,
        Unit::Count,
        "Partitions of conversations whose lease this instance holds (shared Redis store)."
    );
    gauge!(PARTITIONS_HELD).set(0.0);
    describe_counter!(
        PARTITION_TAKEOVERS,
        Unit::Count,
        "Partition leases this instance took (at start, after another instance died or gave them up)."
    );
    counter!(PARTITION_TAKEOVERS).increment(0);
    describe_counter!(
        PARTITION_REPLAYED,
        Unit::Count,
        "Activities another holder of a partition had read and not finished, run again by this instance."
    );
    counter!(PARTITION_REPLAYED).increment(0);
    describe_counter!(
        PARTITION_FENCED,
        Unit::Count,
        "Answered activities whose acknowledgement was refused because this instance's lease had lapsed."
    );
    counter!(PARTITION_FENCED).increment(0);
    describe_counter!(
        PARTITION_TURNS_DROPPED,
        Unit::Count,
        "Turns not run because their partition's lease lapsed before they started (its next holder runs them)."
    );
    counter!(PARTITION_TURNS_DROPPED).increment(0);
    for outcome in ADMIN_AUTH_OUTCOMES {
        counter!(ADMIN_AUTH_FAILURES, "outcome" => *outcome).increment(0);
    }
    for op in STORE_OPS {
        counter!(STORE_ERRORS, "op" => *op).increment(0);
    }
    gauge!(STORE_UP).set(1.0);
    counter!(JOURNAL_RECOVERED).increment(0);

    for reason in REJECT_REASONS {
        counter!(ACTIVITIES_REJECTED, "reason" => *reason).increment(0);
    }
    counter!(ACTIVITIES_DUPLICATE).increment(0);
    for op in CONNECTOR_OPS {
        for status in CONNECTOR_STATUSES {
            counter!(CONNECTOR_REQUESTS, "op" => *op, "status" => *status).increment(0);
        }
    }
    for reason in RETRY_REASONS {
        counter!(CONNECTOR_RETRIES, "reason" => *reason).increment(0);
    }
    gauge!(CONVERSATIONS_ACTIVE).set(0.0);
    gauge!(CONVERSATIONS_RESTING).set(0.0);
    counter!(ACTOR_RESTARTS).increment(0);
    counter!(SNAPSHOT_FAILURES).increment(0);
    counter!(TURNS_FAILED).increment(0);
    for result in ["ok", "error"] {
        counter!(KEY_REFRESHES, "result" => result).increment(0);
    }
    // Creating the handles registers the histograms, so they render (with empty buckets) at once.
    let _ = histogram!(INGRESS_DURATION);
    let _ = histogram!(TURN_DURATION);
    let _ = histogram!(FIRST_REPLY);
    let _ = histogram!(SNAPSHOT_DURATION);
}

pub fn reject(reason: &'static str) {
    counter!(ACTIVITIES_REJECTED, "reason" => reason).increment(1);
}

/// A condition that makes the process unready: what it says when it holds.
pub type ReadinessCheck = Box<dyn Fn() -> Option<std::borrow::Cow<'static, str>> + Send + Sync>;

/// Readiness: the listener is bound and, when any integration verifies tokens, signing keys were
/// loaded at least once; and none of the checks added by the rooms that own them (the store
/// under durable accept, unreadable secrets) holds.
#[derive(Default)]
pub struct Readiness {
    listening: AtomicBool,
    keys_loaded: AtomicBool,
    needs_keys: AtomicBool,
    draining: AtomicBool,
    /// Set at start, read only by `/readyz`.
    checks: std::sync::RwLock<Vec<ReadinessCheck>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("verdict", &self.check())
            .finish()
    }
}

impl Readiness {
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }
    pub fn set_keys_loaded(&self) {
        self.keys_loaded.store(true, Ordering::Release);
    }
    pub fn set_needs_keys(&self, needs: bool) {
        self.needs_keys.store(needs, Ordering::Release);
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    /// Adds a condition that makes the process unready while it holds.
    pub fn add_check(&self, check: ReadinessCheck) {
        self.checks
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(check);
    }
    /// `Err` names what is missing.
    pub fn check(&self) -> Result<(), std::borrow::Cow<'static, str>> {
        if self.draining.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        if !self.listening.load(Ordering::Acquire) {
            return Err("listener not bound".into());
        }
        if self.needs_keys.load(Ordering::Acquire) && !self.keys_loaded.load(Ordering::Acquire) {
            return Err("OpenID metadata and signing keys not loaded yet".into());
        }
        let checks = self
            .checks
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match checks.iter().find_map(|check| check()) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// Runs the recorder's upkeep (histogram maintenance) until the process stops.
pub async fn run_upkeep(
    handle: PrometheusHandle,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = shutdown.changed() => return,
        }
    }
}
