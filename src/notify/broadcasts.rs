//! Broadcasts: one message to many recipients, paced within Teams' limits, resumable and
//! accountable. A job and each of its recipients are stored (the job with the management
//! records, its recipients in a record kind of their own, `broadcast-recipients:{job}`, with
//! each tenant's recipient numbers in chunks beside them, `broadcast-lanes:{job}`). Memory holds
//! the job and its counts, never its recipients: a runner reads each tenant's next few dozen at
//! a time, so a million recipients cost what a hundred do. It sends through the connector's
//! pacer, at most
//! `broadcast.max_share` percent of each tenant's budget (live conversations keep the rest),
//! a few sends in flight per tenant and tenants in parallel. Each recipient ends `sent` (with
//! its activity id) or `failed` with a reason mapped from Teams' documented answers.
//!
//! A recipient is written with its attempt counted before it is sent, and with its outcome
//! after: a router killed mid-job resumes at start with the recipients still pending, and
//! those it had in flight (counted, `resumedInFlight`) are sent again, so duplicates are at
//! most those. With several routers, a job runs where its lease is (`broadcast-run:{job}` in
//! the store, renewed while it runs); another instance takes it over when the lease lapses.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use metrics::{counter, gauge};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::destinations::Destinations;
use super::proactive::{self, MessageRequest, ProactiveError};
use super::workflows::Workflows;
use crate::connector::{Connector, ConnectorError, Route};
use crate::ledger::addresses::{AddressBook, CompactJson};
use crate::ledger::events::{EventDraft, EventSink};
use crate::registry::{Integration, Registry};
use crate::store::{Store, StoreError, StoreHealth, load_records, now_ms};
use crate::telemetry::{BROADCAST_EDITS, BROADCAST_RECIPIENTS, BROADCASTS_ACTIVE};

pub const JOBS_KIND: &str = "broadcasts";
/// Sends in flight per tenant; tenants run in parallel up to [`MAX_IN_FLIGHT`].
const PER_TENANT_IN_FLIGHT: usize = 16;
const MAX_IN_FLIGHT: usize = 512;
/// How long sends of a process that stopped may still count in Teams' windows.
const PREDECESSOR_WINDOW: Duration = Duration::from_millis(1_100);
/// How long a runner's lease on a job lasts without renewal.
const LEASE: Duration = Duration::from_secs(10);

/// What each job has sent, failed and has left, by job id: written by the runner as it goes.
const TALLIES_KIND: &str = "broadcast-tallies";

fn recipients_kind(job: &str) -> String {
    format!("broadcast-recipients:{job}")
}

/// Per tenant, the recipients' numbers in chunks: `{tenant}#{chunk}`.
fn lanes_kind(job: &str) -> String {
    format!("broadcast-lanes:{job}")
}

fn lane_chunk_id(tenant: &str, chunk: u32) -> String {
    format!("{tenant}#{chunk:06}")
}

/// Each recipient's target once, so that appending the same user twice adds one recipient.
fn targets_kind(job: &str) -> String {
    format!("broadcast-targets:{job}")
}

fn recipient_id(index: u32) -> String {
    format!("{index:010}")
}

/// The message every recipient gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Message {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_format: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub alert: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<Value>,
}

impl Message {
    fn request(&self, to: &To) -> MessageRequest {
        let mut request = MessageRequest {
            text: self.text.clone(),
            attachments: self.attachments.clone(),
            text_format: self.text_format.clone(),
            summary: self.summary.clone(),
            alert: self.alert,
            mentions: self.mentions.clone(),
            ..MessageRequest::default()
        };
        match to {
            To::User { user_id, tenant_id } => {
                request.user_id = Some(user_id.clone());
                request.tenant_id = tenant_id.clone();
            }
            To::Channel {
                channel_id,
                tenant_id,
            } => {
                request.channel_id = Some(channel_id.clone());
                request.tenant_id = tenant_id.clone();
            }
            To::Conversation { conversation_id } => {
                request.conversation_id = Some(conversation_id.clone());
            }
            To::Workflow { .. } => {}
        }
        request
    }

    /// Checks it as a proactive message would be checked.
    pub fn check(&self) -> Result<(), ProactiveError> {
        self.request(&To::Conversation {
            conversation_id: "check".into(),
        })
        .check()
    }
}

/// Where one recipient's copy goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum To {
    /// A user's personal chat (created when there is none).
    #[serde(rename_all = "camelCase")]
    User {
        user_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
    },
    /// A new thread in a team channel.
    #[serde(rename_all = "camelCase")]
    Channel {
        channel_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant_id: Option<String>,
    },
    /// A conversation the router has seen.
    #[serde(rename_all = "camelCase")]
    Conversation { conversation_id: String },
    /// A Teams Workflows webhook (a destination: its URL is sealed there).
    #[serde(rename_all = "camelCase")]
    Workflow { destination_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    Pending,
    Sent,
    Failed,
}

impl RecipientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    pub index: u32,
    pub to: To,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber_id: Option<String>,
    pub status: RecipientStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    /// Sends started (one more before each send is written first).
    #[serde(default)]
    pub attempts: u32,
    /// Written true before a send and false with its outcome: true in the store means the
    /// runner stopped while the send was in flight.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sending: bool,
    /// A change of the delivered copy still to make (`update` or `recall` of the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<Edit>,
    /// The delivered copy was deleted (`recall`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recalled: bool,
    /// The last edit that failed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_error: Option<String>,
    pub updated_at: u64,
}

/// A change to a delivered copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Edit {
    /// Replace it with the job's (new) message.
    Update,
    /// Delete it.
    Recall,
}

impl Recipient {
    pub fn new(index: u32, to: To) -> Self {
        Self {
            index,
            to,
            destination_id: None,
            subscriber_id: None,
            status: RecipientStatus::Pending,
            reason: None,
            conversation_id: None,
            activity_id: None,
            attempts: 0,
            sending: false,
            edit: None,
            recalled: false,
            edit_error: None,
            updated_at: now_ms(),
        }
    }

    /// Whether the runner has something to do for it: a send, or an edit of its copy.
    fn has_work(&self) -> bool {
        self.status == RecipientStatus::Pending
            || (self.status == RecipientStatus::Sent && self.edit.is_some())
    }

    /// The tenant whose budget its send uses ("" when it is not known before sending).
    fn tenant(&self) -> &str {
        match &self.to {
            To::User { tenant_id, .. } | To::Channel { tenant_id, .. } => {
                tenant_id.as_deref().unwrap_or_default()
            }
            To::Conversation { .. } | To::Workflow { .. } => "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Paused,
    Done,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub integration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub message: Message,
    pub status: JobStatus,
    /// Why the whole job failed (a message Teams finds too large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    pub order: u64,
    /// Recipients that were being sent to when a router running the job stopped, and were
    /// sent again: the most duplicates the job may have.
    #[serde(default)]
    pub resumed_in_flight: u32,
    /// Recipients, numbered 0 to `total - 1`.
    #[serde(default)]
    pub total: u32,
    /// Per tenant ("" where it is known only once sent), how many chunks of recipient numbers
    /// it has (`broadcast-lanes:{job}`): the runner reads each tenant's recipients a window at
    /// a time, so tenants run side by side whatever order recipients were given in.
    #[serde(default)]
    pub lanes: BTreeMap<String, u32>,
}

/// How many recipients a job has in each state, failures by reason, and delivered copies with
/// an edit still to make: kept as outcomes come, so that a job's counts never need its
/// recipients in memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    pub pending: u64,
    pub sent: u64,
    pub failed: u64,
    pub reasons: BTreeMap<String, u64>,
    pub edits: u64,
}

impl Tally {
    fn add(&mut self, recipient: &Recipient) {
        match recipient.status {
            RecipientStatus::Pending => self.pending += 1,
            RecipientStatus::Sent => self.sent += 1,
            RecipientStatus::Failed => {
                self.failed += 1;
                if let Some(reason) = &recipient.reason {
                    *self.reasons.entry(reason.clone()).or_default() += 1;
                }
            }
        }
        if recipient.status == RecipientStatus::Sent && recipient.edit.is_some() {
            self.edits += 1;
        }
    }

    fn remove(&mut self, recipient: &Recipient) {
        match recipient.status {
            RecipientStatus::Pending => self.pending = self.pending.saturating_sub(1),
            RecipientStatus::Sent => self.sent = self.sent.saturating_sub(1),
            RecipientStatus::Failed => {
                self.failed = self.failed.saturating_sub(1);
                if let Some(reason) = &recipient.reason
                    && let Some(count) = self.reasons.get_mut(reason)
                {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.reasons.remove(reason);
                    }
                }
            }
        }
        if recipient.status == RecipientStatus::Sent && recipient.edit.is_some() {
            self.edits = self.edits.saturating_sub(1);
        }
    }

    fn change(&mut self, before: &Recipient, after: &Recipient) {
        self.remove(before);
        self.add(after);
    }

    /// Sends and edits left.
    fn work(&self) -> u64 {
        self.pending + self.edits
    }
}

/// A job as one instance holds it: the job, its counts, whether it runs here. Its recipients
/// stay in the store; the runner reads them a window at a time.
pub struct Held {
    job: Mutex<Job>,
    tally: Mutex<Tally>,
    /// Job writes one at a time, each of the job as it is then (the runner and the API both
    /// change it).
    saving: tokio::sync::Mutex<()>,
    /// A runner works on it here.
    running: AtomicBool,
    /// Sends finished since the runner started, for the rate (and when it started).
    sent_since_start: AtomicU64,
    run_started_ms: AtomicU64,
}

impl Held {
    fn new(job: Job, tally: Tally) -> Self {
        Self {
            job: Mutex::new(job),
            tally: Mutex::new(tally),
            saving: tokio::sync::Mutex::new(()),
            running: AtomicBool::new(false),
            sent_since_start: AtomicU64::new(0),
            run_started_ms: AtomicU64::new(0),
        }
    }

    pub fn job(&self) -> Job {
        self.job.lock().clone()
    }

    pub fn tally(&self) -> Tally {
        self.tally.lock().clone()
    }

    /// Recipients finished per second since its runner started here (0 when not running).
    pub fn rate(&self) -> f64 {
        if !self.running.load(Ordering::Acquire) {
            return 0.0;
        }
        let elapsed =
            now_ms().saturating_sub(self.run_started_ms.load(Ordering::Acquire)) as f64 / 1000.0;
        if elapsed <= 0.0 {
            return 0.0;
        }
        self.sent_since_start.load(Ordering::Acquire) as f64 / elapsed
    }
}

/// What a send came to.
enum Outcome {
    Sent {
        conversation_id: Option<String>,
        activity_id: Option<String>,
    },
    Failed(&'static str),
    /// Teams says the app is disabled in the whole tenant: its other recipients wait.
    TenantDisabled,
    /// The whole job fails: Teams refuses the message itself.
    TooLarge,
    /// Not sent, not failed: tried again later (the bot's outbound queue is full).
    Later,
    /// An edit of a delivered copy was made, or failed (the copy stays as it was).
    Edited(Result<Edit, &'static str>),
    /// Not sent: its attempt could not be recorded (the store fails); tried again later.
    Unrecorded,
}

/// The reason a refusal of Teams maps to (protocol.md §3.3).
fn refusal(status: u16, detail: &str) -> Outcome {
    let says = |code: &str| detail.contains(code);
    match status {
        403 if says("BotDisabledByAdmin") => Outcome::TenantDisabled,
        403 if says("MessageWritesBlocked") || says("ConversationBlockedByUser") => {
            Outcome::Failed("blocked")
        }
        403 if says("BotNotInConversationRoster") || says("ForbiddenOperationException") => {
            Outcome::Failed("not_installed")
        }
        403 => Outcome::Failed("forbidden"),
        404 => Outcome::Failed("not_found"),
        413 => Outcome::TooLarge,
        _ => Outcome::Failed("error"),
    }
}

fn outcome(result: Result<Value, ProactiveError>) -> Outcome {
    match result {
        Ok(answer) => Outcome::Sent {
            conversation_id: answer
                .get("conversationId")
                .and_then(Value::as_str)
                .map(str::to_owned),
            activity_id: answer
                .get("activityId")
                .and_then(Value::as_str)
                .map(str::to_owned),
        },
        Err(ProactiveError::Invalid { .. }) => Outcome::Failed("invalid"),
        Err(ProactiveError::Unknown(_)) => Outcome::Failed("unknown_address"),
        Err(ProactiveError::Development) => Outcome::Failed("error"),
        Err(ProactiveError::NotInstalled) => Outcome::Failed("not_installed"),
        Err(ProactiveError::Connector(error)) => match &error {
            ConnectorError::Rejected { status, detail } => refusal(*status, detail),
            ConnectorError::Exhausted { last, .. } if last.starts_with("HTTP 429") => {
                Outcome::Failed("throttled_out")
            }
            ConnectorError::Exhausted { last, .. }
                if last.starts_with("HTTP 500") || last.contains("timed out") =>
            {
                Outcome::Failed("ambiguous")
            }
            ConnectorError::MayHavePosted { .. } => Outcome::Failed("ambiguous"),
            ConnectorError::QueueFull(_) => Outcome::Later,
            _ => Outcome::Failed("error"),
        },
    }
}

/// Recipients a runner reads of one tenant at a time.
const LANE_WINDOW: usize = 64;
/// Recipient numbers in one stored chunk of a tenant's lane.
const LANE_CHUNK: usize = 4_096;
/// Recipients read at a time when a whole job is gone through (counts, retry, edits, lists).
const SCAN_PAGE: u32 = 1_000;
/// How long a runner waits before starting sends again once the store failed.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// How often a runner stores its job's counts.
const TALLY_EVERY: Duration = Duration::from_secs(1);

/// A job's recipient numbers in pages of [`SCAN_PAGE`].
fn pages(total: u32) -> impl Iterator<Item = Vec<u32>> {
    (0..total)
        .step_by(SCAN_PAGE as usize)
        .map(move |from| (from..(from + SCAN_PAGE).min(total)).collect())
}

/// One tenant's recipients as a runner goes through them: the chunk of numbers it is in, and
/// a window of recipients read ahead.
struct Lane {
    tenant: String,
    chunks: u32,
    chunk: u32,
    numbers: Vec<u32>,
    offset: usize,
    window: VecDeque<Recipient>,
    in_flight: usize,
    /// Teams says the app is disabled in this tenant: its recipients wait.
    disabled: bool,
    /// Part of its recipient numbers could not be read from the store.
    unreadable: bool,
}

impl Lane {
    fn new(tenant: String, chunks: u32) -> Self {
        Self {
            tenant,
            chunks,
            chunk: 0,
            numbers: Vec::new(),
            offset: 0,
            window: VecDeque::new(),
            in_flight: 0,
            disabled: false,
            unreadable: false,
        }
    }

    /// Every recipient of this pass has been read.
    fn read_through(&self) -> bool {
        self.chunk >= self.chunks && self.offset >= self.numbers.len()
    }

    fn idle(&self) -> bool {
        self.disabled || (self.read_through() && self.window.is_empty())
    }

    fn start_pass(&mut self) {
        self.chunk = 0;
        self.numbers.clear();
        self.offset = 0;
        self.window.clear();
    }
}

/// Settings of the broadcast runner.
#[derive(Debug, Clone, Copy)]
pub struct BroadcastSettings {
    /// Percent of each tenant's Teams budget broadcasts may fill.
    pub max_share: u32,
}

/// One record on its way to the store.
struct RecipientWrite {
    kind: String,
    id: String,
    bytes: Vec<u8>,
    /// Told once the batch holding it is stored (or failed).
    stored: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
}

/// Writes recipients' states in batches (one store transaction per kind and batch, gathered for
/// at most [`WRITE_BATCH_WAIT`]): one transaction per send would bound a broadcast by the
/// store's commits per second (the embedded store waits for the disk at each).
fn start_writer(
    store: Arc<Store>,
    health: Arc<StoreHealth>,
) -> tokio::sync::mpsc::UnboundedSender<RecipientWrite> {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<RecipientWrite>();
    tokio::spawn(async move {
        while let Some(first) = receiver.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + WRITE_BATCH_WAIT;
            while batch.len() < WRITE_BATCH_MAX {
                match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(write)) => batch.push(write),
                    Ok(None) | Err(_) => break,
                }
            }
            let mut by_kind: HashMap<String, Vec<(String, Vec<u8>)>> = HashMap::new();
            let mut waiting = Vec::new();
            for write in batch {
                // An empty kind only waits for what was queued before it.
                if !write.kind.is_empty() {
                    by_kind
                        .entry(write.kind)
                        .or_default()
                        .push((write.id, write.bytes));
                }
                waiting.extend(write.stored);
            }
            let mut outcome = Ok(());
            for (kind, records) in by_kind {
                let result = store.put_records(&kind, records).await;
                health.observe("records", &result);
                if let Err(error) = result {
                    tracing::warn!(%error, "broadcast recipients' states not stored");
                    outcome = Err(error);
                }
            }
            for stored in waiting {
                let _ = stored.send(outcome.clone());
            }
        }
    });
    sender
}

const WRITE_BATCH_WAIT: Duration = Duration::from_millis(20);
const WRITE_BATCH_MAX: usize = 2_000;

/// What the broadcast runner works with.
pub struct BroadcastParts {
    pub store: Arc<Store>,
    pub health: Arc<StoreHealth>,
    pub connector: Arc<Connector>,
    pub addresses: Arc<AddressBook>,
    pub registry: Arc<Registry>,
    pub destinations: Arc<Destinations>,
    pub workflows: Workflows,
    pub settings: BroadcastSettings,
    /// Each job's state changes go to its integration's event log.
    pub events: EventSink,
}

pub struct Broadcasts {
    jobs: DashMap<String, Arc<Held>>,
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    connector: Arc<Connector>,
    addresses: Arc<AddressBook>,
    registry: Arc<Registry>,
    /// Destinations Teams says the bot is not in any more are marked so.
    destinations: Arc<Destinations>,
    workflows: Workflows,
    settings: BroadcastSettings,
    events: EventSink,
    /// This process's name in job leases.
    run_id: String,
    /// When this process started: the sends of the one before it may still be in Teams' windows.
    started: crate::clock::Instant,
    writes: tokio::sync::mpsc::UnboundedSender<RecipientWrite>,
}

/// How a runner's pass over its lanes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Nothing left to do.
    Finished,
    /// What is left waits: for tenants where the app is disabled, or for recipients the store
    /// could not give.
    Disabled,
    /// The job was paused, cancelled or failed.
    Stopped,
    /// Another instance runs it now.
    LeaseLost,
}

/// What going through a whole job found.
#[derive(Default)]
struct Scan {
    tally: Tally,
    /// Written with an attempt counted and no outcome: in flight when a runner stopped.
    interrupted: u32,
}

impl Broadcasts {
    pub async fn load(parts: BroadcastParts) -> Arc<Self> {
        let BroadcastParts {
            store,
            health,
            connector,
            addresses,
            registry,
            destinations,
            workflows,
            settings,
            events,
        } = parts;
        let broadcasts = Arc::new(Self {
            jobs: DashMap::new(),
            health: Arc::clone(&health),
            connector,
            addresses,
            registry,
            destinations,
            workflows,
            settings,
            events,
            run_id: format!("run-{:016x}", rand::random::<u64>()),
            started: crate::clock::now(),
            writes: start_writer(Arc::clone(&store), Arc::clone(&health)),
            store,
        });
        broadcasts.refresh().await;
        broadcasts
    }

    /// Reads the jobs from the store again (other instances' included) and runs the running
    /// ones whose lease this instance can take.
    pub async fn refresh(self: &Arc<Self>) {
        let stored = load_records::<Job>(&self.store, &self.health, JOBS_KIND).await;
        let mut tallies: HashMap<String, Tally> =
            load_records::<Tally>(&self.store, &self.health, TALLIES_KIND)
                .await
                .into_iter()
                .collect();
        for (id, job) in stored {
            let tally = tallies.remove(&id).unwrap_or_default();
            let held = match self.jobs.get(&id).map(|h| Arc::clone(h.value())) {
                Some(held) => {
                    if !held.running.load(Ordering::Acquire) {
                        *held.job.lock() = job;
                        *held.tally.lock() = tally;
                    }
                    held
                }
                None => {
                    let held = Arc::new(Held::new(job, tally));
                    self.jobs.insert(id.clone(), Arc::clone(&held));
                    held
                }
            };
            if held.job.lock().status == JobStatus::Running {
                self.run(&held);
            }
        }
        self.count_active();
    }

    /// Looks for running jobs whose runner stopped (this instance's before a restart, or
    /// another instance that died) every half lease, until `stopped` flips.
    pub async fn adopt(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(LEASE / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh().await,
                _ = stopped.changed() => return,
            }
        }
    }

    fn count_active(&self) {
        let active = self
            .jobs
            .iter()
            .filter(|h| h.job.lock().status == JobStatus::Running)
            .count();
        gauge!(BROADCASTS_ACTIVE).set(active as f64);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Held>> {
        self.jobs.get(id).map(|h| Arc::clone(h.value()))
    }

    /// The job of `integration` created with `key`, if any.
    pub fn by_idempotency_key(&self, integration: &str, key: &str) -> Option<Arc<Held>> {
        self.jobs
            .iter()
            .find(|h| {
                let job = h.job.lock();
                job.integration_id == integration && job.idempotency_key.as_deref() == Some(key)
            })
            .map(|h| Arc::clone(h.value()))
    }

    /// The integration's jobs.
    pub fn of_integration(&self, integration: &str) -> Vec<Arc<Held>> {
        self.jobs
            .iter()
            .filter(|h| h.job.lock().integration_id == integration)
            .map(|h| Arc::clone(h.value()))
            .collect()
    }

    async fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(job)
            .map_err(|e| StoreError::Corrupt(format!("job does not serialize: {e}")))?;
        let result = self
            .store
            .put_records(JOBS_KIND, vec![(job.id.clone(), bytes)])
            .await;
        self.health.observe("records", &result);
        result
    }

    /// Stores the job changed by `change`, and changes it in memory once stored (only the
    /// fields `change` sets: the runner may change others meanwhile).
    async fn save_job(&self, held: &Held, change: impl Fn(&mut Job)) -> Result<Job, StoreError> {
        let _one_at_a_time = held.saving.lock().await;
        let mut job = held.job();
        change(&mut job);
        self.put_job(&job).await?;
        let mut current = held.job.lock();
        change(&mut current);
        Ok(current.clone())
    }

    async fn put_tally(&self, job: &str, tally: &Tally) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(tally)
            .map_err(|e| StoreError::Corrupt(format!("tally does not serialize: {e}")))?;
        let result = self
            .store
            .put_records(TALLIES_KIND, vec![(job.to_owned(), bytes)])
            .await;
        self.health.observe("records", &result);
        result
    }

    /// The recipients with these numbers that are stored (in their order).
    async fn read_recipients(
        &self,
        job: &str,
        numbers: &[u32],
    ) -> Result<Vec<Recipient>, StoreError> {
        let ids = numbers.iter().map(|&n| recipient_id(n)).collect();
        let result = self.store.records_by_ids(&recipients_kind(job), ids).await;
        self.health.observe("records", &result);
        Ok(result?
            .into_iter()
            .flatten()
            .filter_map(|bytes| match serde_json::from_slice::<Recipient>(&bytes) {
                Ok(recipient) => Some(recipient),
                Err(error) => {
                    tracing::warn!(job, %error, "a stored broadcast recipient is unreadable; skipped");
                    None
                }
            })
            .collect())
    }

    /// Counts a job's recipients from the store.
    async fn scan(&self, held: &Held) -> Result<Scan, StoreError> {
        let job = held.job();
        let mut scan = Scan::default();
        for numbers in pages(job.total) {
            for recipient in self.read_recipients(&job.id, &numbers).await? {
                scan.tally.add(&recipient);
                if recipient.status == RecipientStatus::Pending && recipient.sending {
                    scan.interrupted += 1;
                }
            }
        }
        Ok(scan)
    }

    /// A page of a job's recipients that `keep` selects, after number `after` (exclusive) in
    /// ascending or descending order; and whether there are more.
    pub async fn page_recipients(
        &self,
        held: &Held,
        after: Option<u32>,
        ascending: bool,
        take: usize,
        keep: impl Fn(&Recipient) -> bool,
    ) -> Result<(Vec<Recipient>, bool), StoreError> {
        let job = held.job();
        let mut page = Vec::new();
        let (mut low, mut high) = match (after, ascending) {
            (Some(after), true) => (after.saturating_add(1), job.total),
            (Some(after), false) => (0, after.min(job.total)),
            (None, _) => (0, job.total),
        };
        while low < high && page.len() <= take {
            let numbers: Vec<u32> = if ascending {
                let to = (low + SCAN_PAGE).min(high);
                let numbers = (low..to).collect();
                low = to;
                numbers
            } else {
                let from = high.saturating_sub(SCAN_PAGE).max(low);
                let numbers = (from..high).rev().collect();
                high = from;
                numbers
            };
            page.extend(
                self.read_recipients(&job.id, &numbers)
                    .await?
                    .into_iter()
                    .filter(|r| keep(r)),
            );
        }
        let more = page.len() > take;
        page.truncate(take);
        Ok((page, more))
    }

    /// Stores recipients' states directly (not through the batch writer).
    async fn put_recipients(&self, job: &str, recipients: &[Recipient]) -> Result<(), StoreError> {
        let kind = recipients_kind(job);
        for chunk in recipients.chunks(1_000) {
            let records = chunk
                .iter()
                .filter_map(|r| Some((recipient_id(r.index), serde_json::to_vec(r).ok()?)))
                .collect();
            let result = self.store.put_records(&kind, records).await;
            self.health.observe("records", &result);
            result?;
        }
        Ok(())
    }

    /// Stores one record with the others of its batch; `wait`: returns once it is stored (a
    /// send waits for its attempt to be recorded), else at once.
    async fn write(
        &self,
        kind: String,
        id: String,
        bytes: Vec<u8>,
        wait: bool,
    ) -> Result<(), StoreError> {
        let (stored, done) = if wait {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        self.writes
            .send(RecipientWrite {
                kind,
                id,
                bytes,
                stored,
            })
            .map_err(|_| StoreError::Unavailable("the recipient writer stopped".into()))?;
        match done {
            Some(done) => done
                .await
                .map_err(|_| StoreError::Unavailable("the recipient writer stopped".into()))?,
            None => Ok(()),
        }
    }

    async fn write_recipient(
        &self,
        job: &str,
        recipient: &Recipient,
        wait: bool,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(recipient)
            .map_err(|e| StoreError::Corrupt(format!("recipient does not serialize: {e}")))?;
        self.write(
            recipients_kind(job),
            recipient_id(recipient.index),
            bytes,
            wait,
        )
        .await
    }

    /// Returns once every state queued before is stored.
    async fn flush_writes(&self) -> Result<(), StoreError> {
        self.write(String::new(), String::new(), Vec::new(), true)
            .await
    }

    /// Stores a new job (pending) with its first recipients.
    pub async fn create(
        &self,
        job: Job,
        recipients: Vec<Recipient>,
    ) -> Result<Arc<Held>, StoreError> {
        let held = Arc::new(Held::new(
            Job {
                total: 0,
                lanes: BTreeMap::new(),
                ..job
            },
            Tally::default(),
        ));
        self.append(&held, recipients).await?;
        self.jobs.insert(held.job().id, Arc::clone(&held));
        Ok(held)
    }

    /// Appends recipients to a job that has not started, each target once (one the job has
    /// already is left out). Returns how many were added, and the job's recipients.
    pub async fn append(
        &self,
        held: &Held,
        targets: Vec<Recipient>,
    ) -> Result<(usize, u32), StoreError> {
        let job = held.job();
        let target_ids: Vec<String> = targets
            .iter()
            .map(|r| serde_json::to_string(&r.to).unwrap_or_default())
            .collect();
        let known = self
            .store
            .records_by_ids(&targets_kind(&job.id), target_ids.clone())
            .await?;
        let mut seen = HashSet::new();
        let mut added: Vec<Recipient> = Vec::new();
        let mut added_targets = Vec::new();
        for ((recipient, target), known) in targets.into_iter().zip(target_ids).zip(known) {
            if known.is_some() || !seen.insert(target.clone()) {
                continue;
            }
            let index = job.total + added.len() as u32;
            added_targets.push((target, index.to_string().into_bytes()));
            added.push(Recipient { index, ..recipient });
        }
        if added.is_empty() {
            return Ok((0, job.total));
        }
        self.put_recipients(&job.id, &added).await?;
        let mut lanes = job.lanes.clone();
        let mut by_tenant: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for recipient in &added {
            by_tenant
                .entry(recipient.tenant())
                .or_default()
                .push(recipient.index);
        }
        let mut chunks = Vec::new();
        for (tenant, numbers) in by_tenant {
            for part in numbers.chunks(LANE_CHUNK) {
                let next = lanes.entry(tenant.to_owned()).or_default();
                let bytes = serde_json::to_vec(part)
                    .map_err(|e| StoreError::Corrupt(format!("lane does not serialize: {e}")))?;
                chunks.push((lane_chunk_id(tenant, *next), bytes));
                *next += 1;
            }
        }
        let result = self.store.put_records(&lanes_kind(&job.id), chunks).await;
        self.health.observe("records", &result);
        result?;
        let total = job.total + added.len() as u32;
        let mut tally = held.tally();
        for recipient in &added {
            tally.add(recipient);
        }
        self.put_tally(&job.id, &tally).await?;
        self.save_job(held, |job| {
            job.total = total;
            job.lanes.clone_from(&lanes);
        })
        .await?;
        *held.tally.lock() = tally;
        // Last: a failure before leaves the targets free for the same call again.
        let result = self
            .store
            .put_records(&targets_kind(&job.id), added_targets)
            .await;
        self.health.observe("records", &result);
        if let Err(error) = result {
            tracing::warn!(%error, "a broadcast's targets are not stored: appending them again would add them twice");
        }
        Ok((added.len(), total))
    }

    /// Changes a job's status (stored first) and starts or stops its runner.
    pub async fn set_status(
        self: &Arc<Self>,
        held: &Arc<Held>,
        status: JobStatus,
    ) -> Result<Job, StoreError> {
        let now = now_ms();
        let job = self
            .save_job(held, |job| {
                job.status = status;
                match status {
                    JobStatus::Running if job.started_at.is_none() => job.started_at = Some(now),
                    JobStatus::Done | JobStatus::Cancelled => job.finished_at = Some(now),
                    JobStatus::Running => job.finished_at = None,
                    _ => {}
                }
            })
            .await?;
        tracing::info!(job = %job.id, status = status.as_str(), "broadcast");
        self.event(
            &job,
            "broadcast.status",
            format!("{} {}", job.id, status.as_str()),
        );
        if status == JobStatus::Running {
            self.run(held);
        }
        self.count_active();
        Ok(job)
    }

    /// An entry in the job's integration's event log.
    pub fn event(&self, job: &Job, kind: &'static str, message: String) {
        self.events.record(
            &Arc::from(job.integration_id.as_str()),
            EventDraft::new(kind).message(message),
        );
    }

    /// Asks for `edit` of every delivered copy (with the job's message replaced first for an
    /// update); the runner makes them. Returns how many copies.
    pub async fn edit_delivered(
        &self,
        held: &Arc<Held>,
        edit: Edit,
        message: Option<Message>,
    ) -> Result<u64, StoreError> {
        if let Some(message) = message {
            self.save_job(held, |job| job.message = message.clone())
                .await?;
        }
        self.change_recipients(
            held,
            |r| r.status == RecipientStatus::Sent && !r.recalled,
            |r| Recipient {
                edit: Some(edit),
                ..r
            },
        )
        .await
    }

    /// Failed recipients become pending again (the sent ones stay as they are); returns how many.
    pub async fn retry_failed(&self, held: &Arc<Held>) -> Result<u64, StoreError> {
        self.change_recipients(
            held,
            |r| r.status == RecipientStatus::Failed,
            |r| Recipient {
                status: RecipientStatus::Pending,
                reason: None,
                ..r
            },
        )
        .await
    }

    /// Changes the recipients `pick` selects with `change`, a page at a time. Returns how many.
    async fn change_recipients(
        &self,
        held: &Arc<Held>,
        pick: impl Fn(&Recipient) -> bool,
        change: impl Fn(Recipient) -> Recipient,
    ) -> Result<u64, StoreError> {
        // Outcomes still queued would land after these changes.
        self.flush_writes().await?;
        let job = held.job().id;
        let now = now_ms();
        let mut changed_count = 0;
        let mut tally = held.tally();
        let mut outcome = Ok(());
        for numbers in pages(held.job().total) {
            let page = match self.read_recipients(&job, &numbers).await {
                Ok(page) => page,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            };
            let changed: Vec<(Recipient, Recipient)> = page
                .into_iter()
                .filter(|r| pick(r))
                .map(|r| {
                    let after = Recipient {
                        updated_at: now,
                        ..change(r.clone())
                    };
                    (r, after)
                })
                .collect();
            let after: Vec<Recipient> = changed.iter().map(|(_, a)| a.clone()).collect();
            if let Err(error) = self.put_recipients(&job, &after).await {
                outcome = Err(error);
                break;
            }
            for (before, after) in &changed {
                tally.change(before, after);
            }
            changed_count += changed.len() as u64;
        }
        // What was changed is changed, even when a later page failed.
        *held.tally.lock() = tally.clone();
        if let Err(error) = self.put_tally(&job, &tally).await {
            tracing::warn!(%error, "a broadcast's counts are not stored; they are counted again when it runs");
        }
        outcome.map(|()| changed_count)
    }

    /// Starts the job's runner here unless one runs already.
    fn run(self: &Arc<Self>, held: &Arc<Held>) {
        if held.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (broadcasts, held) = (Arc::clone(self), Arc::clone(held));
        tokio::spawn(async move {
            broadcasts.run_job(&held).await;
            held.running.store(false, Ordering::Release);
            broadcasts.count_active();
        });
    }

    /// Holds the job's lease in the store: true while this instance may run it.
    async fn hold_lease(&self, job: &str) -> bool {
        match self
            .store
            .lease(&format!("broadcast-run:{job}"), &self.run_id, LEASE)
            .await
        {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, job, "broadcast lease not renewed: the job waits for the store");
                false
            }
        }
    }

    /// The job's status as stored: another instance's API may have paused or cancelled it.
    async fn stored_status(&self, job: &str) -> Option<JobStatus> {
        let stored = self
            .store
            .records_by_ids(JOBS_KIND, vec![job.to_owned()])
            .await
            .ok()?
            .into_iter()
            .next()
            .flatten()?;
        serde_json::from_slice::<Job>(&stored)
            .ok()
            .map(|job| job.status)
    }

    /// Reads the next window of a lane's recipients that have work.
    async fn fill(&self, job: &str, lane: &mut Lane) -> Result<usize, StoreError> {
        let mut found = 0;
        while lane.window.len() < LANE_WINDOW && !lane.read_through() {
            if lane.offset >= lane.numbers.len() {
                let id = lane_chunk_id(&lane.tenant, lane.chunk);
                let stored = self
                    .store
                    .records_by_ids(&lanes_kind(job), vec![id])
                    .await?;
                let numbers = stored
                    .into_iter()
                    .next()
                    .flatten()
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok());
                if numbers.is_none() {
                    // Its recipients stay pending: the job pauses instead of ending as done.
                    tracing::error!(job, tenant = %lane.tenant, chunk = lane.chunk, "a broadcast's lane chunk is missing or unreadable in the store");
                    lane.unreadable = true;
                }
                lane.numbers = numbers.unwrap_or_default();
                lane.offset = 0;
                lane.chunk += 1;
                continue;
            }
            let end = (lane.offset + LANE_WINDOW).min(lane.numbers.len());
            let numbers = &lane.numbers[lane.offset..end];
            let recipients = self.read_recipients(job, numbers).await?;
            lane.offset = end;
            for recipient in recipients {
                if recipient.has_work() {
                    found += 1;
                    lane.window.push_back(recipient);
                }
            }
        }
        Ok(found)
    }

    async fn run_job(self: &Arc<Self>, held: &Arc<Held>) {
        let job_id = held.job().id;
        if !self.hold_lease(&job_id).await {
            return;
        }
        let Some(integration) = self.registry.integration(&held.job().integration_id) else {
            tracing::warn!(job = %job_id, "the broadcast's integration is gone; the job stays as it is");
            return;
        };
        // A restarted router does not know what it sent just before; Teams does. Its first
        // window passes before a job goes on (Teams' windows are a second long, plus a margin).
        tokio::time::sleep_until(self.started + PREDECESSOR_WINDOW).await;
        // Another instance, or this one before a restart, may have run it: count from the store.
        if let Err(error) = self.flush_writes().await {
            tracing::warn!(%error, job = %job_id, "a broadcast waits for the store");
            return;
        }
        let scan = match self.scan(held).await {
            Ok(scan) => scan,
            Err(error) => {
                tracing::warn!(%error, job = %job_id, "a broadcast's recipients cannot be read; it waits for the store");
                return;
            }
        };
        *held.tally.lock() = scan.tally;
        held.sent_since_start.store(0, Ordering::Release);
        held.run_started_ms.store(now_ms(), Ordering::Release);
        if scan.interrupted > 0 {
            let interrupted = scan.interrupted;
            if let Err(error) = self
                .save_job(held, |job| job.resumed_in_flight += interrupted)
                .await
            {
                tracing::warn!(%error, "a resumed broadcast's in-flight count is not stored");
            }
            tracing::info!(job = %job_id, interrupted, "broadcast resumed; recipients in flight before are sent again");
            self.event(
                &held.job(),
                "broadcast.resumed",
                format!(
                    "{job_id} resumed; {interrupted} recipient(s) in flight before are sent again"
                ),
            );
        }
        let lanes: Vec<Lane> = held
            .job()
            .lanes
            .into_iter()
            .map(|(tenant, chunks)| Lane::new(tenant, chunks))
            .collect();
        let end = self.run_lanes(held, &integration, lanes).await;
        if end == End::LeaseLost {
            return;
        }
        if let Err(error) = self.flush_writes().await {
            tracing::warn!(%error, "a broadcast's last outcomes are not stored yet; it stays as it is");
            return;
        }
        if let Err(error) = self.put_tally(&job_id, &held.tally()).await {
            tracing::warn!(%error, "a broadcast's counts are not stored; they are counted again when it runs");
        }
        if held.job.lock().status != JobStatus::Running {
            return;
        }
        // Done only once every outcome is stored: a job stored as done is never resumed.
        let (next, what) = match end {
            End::Disabled => (
                JobStatus::Paused,
                "waiting for tenants where the app is disabled",
            ),
            _ => (JobStatus::Done, "done"),
        };
        if let Err(error) = self.set_status(held, next).await {
            tracing::warn!(%error, "a broadcast {what} is not recorded so yet");
        }
    }

    /// Sends to each lane's recipients, a window at a time, lanes side by side, until every
    /// lane is gone through with nothing left to do (or the job stops, or its lease is lost).
    async fn run_lanes(
        self: &Arc<Self>,
        held: &Arc<Held>,
        integration: &Arc<Integration>,
        mut lanes: Vec<Lane>,
    ) -> End {
        let job_id = held.job().id;
        let mut in_flight = FuturesUnordered::new();
        let mut lease_renewed = crate::clock::now();
        let mut tally_stored = crate::clock::now();
        let mut found_in_pass = 0usize;
        let mut store_wait_until = crate::clock::now();
        loop {
            let stopping = held.job.lock().status != JobStatus::Running;
            if lease_renewed.elapsed() > LEASE / 3 {
                if !self.hold_lease(&job_id).await {
                    tracing::warn!(job = %job_id, "broadcast lease lost; another instance runs the job");
                    return End::LeaseLost;
                }
                lease_renewed = crate::clock::now();
                if self.store.is_shared()
                    && let Some(stored) = self.stored_status(&job_id).await
                    && stored != JobStatus::Running
                {
                    // Paused or cancelled through another instance.
                    held.job.lock().status = stored;
                }
            }
            if tally_stored.elapsed() > TALLY_EVERY {
                tally_stored = crate::clock::now();
                if let Err(error) = self.put_tally(&job_id, &held.tally()).await {
                    tracing::warn!(%error, "a broadcast's counts are not stored");
                }
            }
            let mut store_failed = crate::clock::now() < store_wait_until;
            for (lane_index, lane) in lanes.iter_mut().enumerate() {
                if stopping || store_failed || lane.disabled {
                    continue;
                }
                if lane.window.len() < LANE_WINDOW / 2 && !lane.read_through() {
                    match self.fill(&job_id, lane).await {
                        Ok(found) => found_in_pass += found,
                        Err(error) => {
                            tracing::warn!(%error, "a broadcast waits for the store: recipients cannot be read");
                            store_failed = true;
                            store_wait_until = crate::clock::now() + STORE_WAIT;
                            continue;
                        }
                    }
                }
                while in_flight.len() < MAX_IN_FLIGHT && lane.in_flight < PER_TENANT_IN_FLIGHT {
                    let Some(recipient) = lane.window.pop_front() else {
                        break;
                    };
                    lane.in_flight += 1;
                    let message = held.job.lock().message.clone();
                    in_flight.push(self.send_one(
                        integration,
                        &job_id,
                        message,
                        recipient,
                        lane_index,
                    ));
                }
            }
            if store_failed && in_flight.is_empty() {
                tokio::time::sleep_until(store_wait_until).await;
                continue;
            }
            let Some((lane_index, recipient, outcome)) = in_flight.next().await else {
                if stopping {
                    return End::Stopped;
                }
                if lanes.iter().all(Lane::idle) {
                    // A pass is over. Recipients of tenants where the app is disabled wait
                    // (the job pauses); others may have been made pending again meanwhile.
                    if lanes.iter().any(|l| l.disabled || l.unreadable) {
                        return End::Disabled;
                    }
                    if held.tally.lock().work() == 0 || found_in_pass == 0 {
                        return End::Finished;
                    }
                    found_in_pass = 0;
                    lanes.iter_mut().for_each(Lane::start_pass);
                }
                continue;
            };
            let lane = &mut lanes[lane_index];
            lane.in_flight = lane.in_flight.saturating_sub(1);
            match outcome {
                Outcome::Later => lane.window.push_back(recipient),
                Outcome::Unrecorded => {
                    lane.window.push_front(recipient);
                    store_wait_until = crate::clock::now() + STORE_WAIT;
                }
                Outcome::TenantDisabled => {
                    lane.disabled = true;
                    self.record(held, recipient, outcome).await;
                }
                outcome => self.record(held, recipient, outcome).await,
            }
        }
    }

    /// Sends one recipient its copy, or makes the edit its copy waits for. A send is recorded
    /// as attempted first (the attempts of sends started together share a store write).
    fn send_one(
        self: &Arc<Self>,
        integration: &Arc<Integration>,
        job: &str,
        message: Message,
        recipient: Recipient,
        lane: usize,
    ) -> impl std::future::Future<Output = (usize, Recipient, Outcome)> + use<> {
        let (broadcasts, integration, job) =
            (Arc::clone(self), Arc::clone(integration), job.to_owned());
        async move {
            let mut recipient = recipient;
            if recipient.status == RecipientStatus::Pending {
                let attempted = Recipient {
                    attempts: recipient.attempts + 1,
                    sending: true,
                    updated_at: now_ms(),
                    ..recipient.clone()
                };
                if let Err(error) = broadcasts.write_recipient(&job, &attempted, true).await {
                    tracing::warn!(%error, "a broadcast waits for the store: a recipient's attempt cannot be recorded");
                    return (lane, recipient, Outcome::Unrecorded);
                }
                recipient = attempted;
            }
            let edit = recipient
                .edit
                .filter(|_| recipient.status == RecipientStatus::Sent);
            let outcome = match (edit, &recipient.to) {
                (Some(edit), _) => {
                    broadcasts
                        .edit(&integration, &message, &recipient, edit)
                        .await
                }
                (None, To::Workflow { destination_id }) => {
                    broadcasts.post_workflow(destination_id, &message).await
                }
                (None, _) => outcome(
                    proactive::send(
                        &broadcasts.addresses,
                        &broadcasts.connector,
                        &integration,
                        message.request(&recipient.to),
                        broadcasts.settings.max_share,
                    )
                    .await,
                ),
            };
            if matches!(outcome, Outcome::Later) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (lane, recipient, outcome)
        }
    }

    /// A workflow recipient: accepted is sent (the copy has no activity id to edit later).
    async fn post_workflow(&self, destination_id: &str, message: &Message) -> Outcome {
        let Some(destination) = self.destinations.get(destination_id) else {
            return Outcome::Failed("not_found");
        };
        match self.workflows.post(&destination, message).await {
            Ok(()) => Outcome::Sent {
                conversation_id: None,
                activity_id: None,
            },
            Err("too_large") => Outcome::Failed("too_large"),
            Err(reason) => Outcome::Failed(reason),
        }
    }

    /// Changes the copy `recipient` got: replaced with `message`, or deleted.
    async fn edit(
        &self,
        integration: &Integration,
        message: &Message,
        recipient: &Recipient,
        edit: Edit,
    ) -> Outcome {
        let (Some(conversation_id), Some(activity_id)) =
            (&recipient.conversation_id, &recipient.activity_id)
        else {
            // Teams gave no id (a 202 without body): the copy cannot be changed.
            return Outcome::Edited(Err("no_activity_id"));
        };
        let Some(address) = self
            .addresses
            .find(&integration.record.id, &format!("conv:{conversation_id}"))
            .await
        else {
            return Outcome::Edited(Err("unknown_address"));
        };
        let route = Route {
            credentials: integration.credentials.as_deref(),
            tenant: address.tenant_id.as_deref(),
            service_url: &address.service_url,
            conversation_id,
            budget_percent: self.settings.max_share,
        };
        let result = match edit {
            Edit::Update => {
                let conversation = address.conversation.as_ref().map_or_else(
                    || serde_json::json!({"id": conversation_id}),
                    CompactJson::value,
                );
                let mut activity = message
                    .request(&recipient.to)
                    .message(&address, conversation);
                activity["id"] = Value::from(activity_id.as_str());
                self.connector
                    .update(route, activity_id, &activity)
                    .await
                    .map(drop)
            }
            Edit::Recall => self.connector.delete(route, activity_id).await,
        };
        match result {
            Ok(()) => Outcome::Edited(Ok(edit)),
            // Gone already: what a recall wants.
            Err(ConnectorError::Rejected { status: 404, .. }) if edit == Edit::Recall => {
                Outcome::Edited(Ok(edit))
            }
            Err(ConnectorError::QueueFull(_)) => Outcome::Later,
            Err(error) => match refusal(error.status().unwrap_or(0), error.detail()) {
                Outcome::Failed(reason) => Outcome::Edited(Err(reason)),
                _ => Outcome::Edited(Err("error")),
            },
        }
    }

    /// Records what one send came to.
    async fn record(self: &Arc<Self>, held: &Arc<Held>, recipient: Recipient, outcome: Outcome) {
        let before = recipient.clone();
        let mut recipient = recipient;
        recipient.updated_at = now_ms();
        recipient.sending = false;
        let label = match outcome {
            Outcome::Sent {
                conversation_id,
                activity_id,
            } => {
                recipient.status = RecipientStatus::Sent;
                recipient.reason = None;
                recipient.conversation_id = conversation_id;
                recipient.activity_id = activity_id;
                held.sent_since_start.fetch_add(1, Ordering::AcqRel);
                self.remember_sent(held, &recipient).await;
                "sent"
            }
            Outcome::Failed(reason) => {
                recipient.status = RecipientStatus::Failed;
                recipient.reason = Some(reason.to_owned());
                if reason == "not_installed"
                    && let Some(destination) = &recipient.destination_id
                {
                    self.destinations
                        .not_installed(destination, "Teams: the bot is not in the conversation (BotNotInConversationRoster)")
                        .await;
                }
                held.sent_since_start.fetch_add(1, Ordering::AcqRel);
                reason
            }
            Outcome::TenantDisabled => {
                // Not failed one by one: the tenant's recipients wait for the admin.
                recipient.reason = Some("admin_disabled".into());
                "admin_disabled"
            }
            Outcome::TooLarge => {
                recipient.status = RecipientStatus::Failed;
                recipient.reason = Some("too_large".into());
                let now = now_ms();
                if let Err(error) = self
                    .save_job(held, |job| {
                        job.error =
                            Some("too_large: Teams refused the message as too large (413)".into());
                        job.status = JobStatus::Done;
                        job.finished_at = Some(now);
                    })
                    .await
                {
                    tracing::warn!(%error, "a broadcast Teams finds too large is not recorded as failed yet");
                }
                "too_large"
            }
            Outcome::Later | Outcome::Unrecorded => "later",
            Outcome::Edited(result) => {
                recipient.edit = None;
                recipient.edit_error = result.err().map(str::to_owned);
                if result == Ok(Edit::Recall) {
                    recipient.recalled = true;
                }
                let label = match result {
                    Ok(Edit::Update) => "updated",
                    Ok(Edit::Recall) => "recalled",
                    Err(_) => "failed",
                };
                counter!(BROADCAST_EDITS, "outcome" => label).increment(1);
                self.keep(held, &before, recipient).await;
                return;
            }
        };
        counter!(BROADCAST_RECIPIENTS, "outcome" => label).increment(1);
        self.keep(held, &before, recipient).await;
    }

    /// A delivered copy is remembered as the router's own, so that `…/message/update` and
    /// `…/message/delete` find it.
    async fn remember_sent(&self, held: &Held, recipient: &Recipient) {
        let (Some(conversation), Some(activity)) =
            (&recipient.conversation_id, &recipient.activity_id)
        else {
            return;
        };
        let integration = held.job.lock().integration_id.clone();
        let record = serde_json::json!({
            "conversationId": conversation,
            "activityId": activity,
            "broadcast": held.job.lock().id,
            "sentAt": recipient.updated_at,
        });
        if let Err(error) = self
            .write(
                proactive::SENT_KIND.to_owned(),
                proactive::sent_id(&integration, conversation, activity),
                record.to_string().into_bytes(),
                false,
            )
            .await
        {
            tracing::warn!(%error, "a broadcast's copy is not remembered: it cannot be changed through …/message");
        }
    }

    /// A recipient's new state: counted at once, queued for the store.
    async fn keep(&self, held: &Held, before: &Recipient, recipient: Recipient) {
        held.tally.lock().change(before, &recipient);
        if let Err(error) = self
            .write_recipient(&held.job().id, &recipient, false)
            .await
        {
            tracing::warn!(%error, "a broadcast recipient's state is not stored; it is sent again if the job resumes elsewhere");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(index: u32) -> Recipient {
        Recipient::new(
            index,
            To::User {
                user_id: format!("29:u{index}"),
                tenant_id: Some("t".into()),
            },
        )
    }

    #[test]
    fn the_tally_follows_each_recipient_through_its_states() {
        let mut tally = Tally::default();
        let pending = user(0);
        tally.add(&pending);
        tally.add(&user(1));
        assert_eq!((tally.pending, tally.work()), (2, 2));
        let failed = Recipient {
            status: RecipientStatus::Failed,
            reason: Some("blocked".into()),
            ..pending.clone()
        };
        tally.change(&pending, &failed);
        assert_eq!((tally.pending, tally.failed), (1, 1));
        assert_eq!(tally.reasons.get("blocked"), Some(&1));
        let retried = Recipient {
            status: RecipientStatus::Pending,
            reason: None,
            ..failed.clone()
        };
        tally.change(&failed, &retried);
        assert!(
            tally.reasons.is_empty(),
            "a reason leaves with its last recipient"
        );
        let sent = Recipient {
            status: RecipientStatus::Sent,
            ..retried.clone()
        };
        tally.change(&retried, &sent);
        let to_update = Recipient {
            edit: Some(Edit::Update),
            ..sent.clone()
        };
        tally.change(&sent, &to_update);
        assert_eq!((tally.sent, tally.edits, tally.work()), (1, 1, 2));
    }

    #[test]
    fn pages_cover_every_number_once() {
        let numbers: Vec<u32> = pages(2_345).flatten().collect();
        assert_eq!(numbers, (0..2_345).collect::<Vec<_>>());
        assert_eq!(pages(0).count(), 0);
        assert_eq!(pages(SCAN_PAGE).count(), 1);
    }

    #[test]
    fn a_lane_is_idle_once_read_through_and_emptied() {
        let mut lane = Lane::new("t".into(), 1);
        assert!(!lane.idle());
        lane.chunk = 1;
        assert!(lane.read_through() && lane.idle());
        lane.window.push_back(user(0));
        assert!(!lane.idle());
        lane.start_pass();
        assert!(!lane.idle(), "a new pass reads the lane again");
    }
}
