//! Broadcasts: one message to many recipients, paced within Teams' limits, resumable and
//! accountable. A job and each of its recipients are stored (the job with the management
//! records, its recipients in a record kind of their own, `broadcast-recipients:{job}`); a
//! runner sends to the pending recipients through the connector's pacer, at most
//! `broadcast.max_share` percent of each tenant's budget (live conversations keep the rest),
//! a few sends in flight per tenant and tenants in parallel. Each recipient ends `sent` (with
//! its activity id) or `failed` with a reason mapped from Teams' documented answers.
//!
//! A recipient is written with its attempt counted before it is sent, and with its outcome
//! after: a router killed mid-job resumes at start with the recipients still pending, and
//! those it had in flight (counted, `resumedInFlight`) are sent again, so duplicates are at
//! most those. With several routers, a job runs where its lease is (`broadcast-run:{job}` in
//! the store, renewed while it runs); another instance takes it over when the lease lapses.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::registry::{Integration, Registry};
use crate::store::{Store, StoreError, StoreHealth, load_records, now_ms};
use crate::telemetry::{BROADCAST_EDITS, BROADCAST_RECIPIENTS, BROADCASTS_ACTIVE};

pub const JOBS_KIND: &str = "broadcasts";
/// Sends in flight per tenant; tenants run in parallel up to [`MAX_IN_FLIGHT`].
const PER_TENANT_IN_FLIGHT: usize = 8;
const MAX_IN_FLIGHT: usize = 128;
/// How long sends of a process that stopped may still count in Teams' windows.
const PREDECESSOR_WINDOW: Duration = Duration::from_millis(1_100);
/// How long a runner's lease on a job lasts without renewal.
const LEASE: Duration = Duration::from_secs(10);

fn recipients_kind(job: &str) -> String {
    format!("broadcast-recipients:{job}")
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
}

/// A job with its recipients, as one instance holds it.
pub struct Held {
    job: Mutex<Job>,
    recipients: Mutex<Vec<Recipient>>,
    /// A runner works on it here.
    running: AtomicBool,
    /// Sends finished since the runner started, for the rate (and when it started).
    sent_since_start: AtomicU64,
    run_started_ms: AtomicU64,
}

impl Held {
    pub fn job(&self) -> Job {
        self.job.lock().clone()
    }

    pub fn recipients(&self) -> Vec<Recipient> {
        self.recipients.lock().clone()
    }

    /// Counts by status, and failures by reason.
    pub fn counts(&self) -> (HashMap<&'static str, usize>, HashMap<String, usize>) {
        let mut by_status: HashMap<&'static str, usize> = HashMap::new();
        let mut by_reason: HashMap<String, usize> = HashMap::new();
        for recipient in self.recipients.lock().iter() {
            *by_status.entry(recipient.status.as_str()).or_default() += 1;
            if recipient.status == RecipientStatus::Failed
                && let Some(reason) = &recipient.reason
            {
                *by_reason.entry(reason.clone()).or_default() += 1;
            }
        }
        (by_status, by_reason)
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

/// The pending recipients of a job by tenant, in index order (tenants where the app is
/// disabled left out).
fn pending_by_tenant(held: &Held, disabled: &HashSet<String>) -> HashMap<String, VecDeque<u32>> {
    let mut queues: HashMap<String, VecDeque<u32>> = HashMap::new();
    for recipient in held.recipients.lock().iter() {
        if recipient.has_work() && !disabled.contains(recipient.tenant()) {
            queues
                .entry(recipient.tenant().to_owned())
                .or_default()
                .push_back(recipient.index);
        }
    }
    queues
}

/// Settings of the broadcast runner.
#[derive(Debug, Clone, Copy)]
pub struct BroadcastSettings {
    /// Percent of each tenant's Teams budget broadcasts may fill.
    pub max_share: u32,
}

/// One recipient's state on its way to the store.
struct RecipientWrite {
    kind: String,
    id: String,
    bytes: Vec<u8>,
    /// Told once the batch holding it is stored (or failed).
    stored: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
}

/// Writes recipients' states in batches (one store transaction per job and batch, gathered for
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
    /// This process's name in job leases.
    run_id: String,
    /// When this process started: the sends of the one before it may still be in Teams' windows.
    started: crate::clock::Instant,
    writes: tokio::sync::mpsc::UnboundedSender<RecipientWrite>,
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
        for (id, job) in stored {
            let known = self.jobs.get(&id).map(|h| Arc::clone(h.value()));
            let held = match known {
                Some(held) => {
                    if !held.running.load(Ordering::Acquire) {
                        *held.job.lock() = job;
                    }
                    held
                }
                None => {
                    let recipients = self.load_recipients(&id).await;
                    let held = Arc::new(Held {
                        job: Mutex::new(job),
                        recipients: Mutex::new(recipients),
                        running: AtomicBool::new(false),
                        sent_since_start: AtomicU64::new(0),
                        run_started_ms: AtomicU64::new(0),
                    });
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

    async fn load_recipients(&self, job: &str) -> Vec<Recipient> {
        let mut recipients: Vec<Recipient> =
            load_records::<Recipient>(&self.store, &self.health, &recipients_kind(job))
                .await
                .into_iter()
                .map(|(_, r)| r)
                .collect();
        recipients.sort_by_key(|r| r.index);
        recipients
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

    /// Stores one recipient's state with the others of its batch; `wait`: returns once it is
    /// stored (a send waits for its attempt to be recorded), else at once.
    async fn write_recipient(
        &self,
        job: &str,
        recipient: &Recipient,
        wait: bool,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(recipient)
            .map_err(|e| StoreError::Corrupt(format!("recipient does not serialize: {e}")))?;
        let (stored, done) = if wait {
            let (sender, receiver) = tokio::sync::oneshot::channel();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        self.writes
            .send(RecipientWrite {
                kind: recipients_kind(job),
                id: recipient_id(recipient.index),
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

    /// Returns once every state queued before is stored.
    async fn flush_writes(&self) -> Result<(), StoreError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.writes
            .send(RecipientWrite {
                kind: String::new(),
                id: String::new(),
                bytes: Vec::new(),
                stored: Some(sender),
            })
            .map_err(|_| StoreError::Unavailable("the recipient writer stopped".into()))?;
        receiver
            .await
            .map_err(|_| StoreError::Unavailable("the recipient writer stopped".into()))?
    }

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

    /// Stores a new job (pending) with its first recipients.
    pub async fn create(
        &self,
        job: Job,
        recipients: Vec<Recipient>,
    ) -> Result<Arc<Held>, StoreError> {
        self.put_recipients(&job.id, &recipients).await?;
        self.put_job(&job).await?;
        let held = Arc::new(Held {
            job: Mutex::new(job.clone()),
            recipients: Mutex::new(recipients),
            running: AtomicBool::new(false),
            sent_since_start: AtomicU64::new(0),
            run_started_ms: AtomicU64::new(0),
        });
        self.jobs.insert(job.id, Arc::clone(&held));
        Ok(held)
    }

    /// Appends recipients to a job that has not started.
    pub async fn append(
        &self,
        held: &Arc<Held>,
        targets: Vec<Recipient>,
    ) -> Result<usize, StoreError> {
        let job = held.job().id;
        let first = held.recipients.lock().len() as u32;
        let recipients: Vec<Recipient> = targets
            .into_iter()
            .enumerate()
            .map(|(n, r)| Recipient {
                index: first + n as u32,
                ..r
            })
            .collect();
        self.put_recipients(&job, &recipients).await?;
        let mut held_recipients = held.recipients.lock();
        held_recipients.extend(recipients);
        Ok(held_recipients.len())
    }

    /// Changes a job's status (stored first) and starts or stops its runner.
    pub async fn set_status(
        self: &Arc<Self>,
        held: &Arc<Held>,
        status: JobStatus,
    ) -> Result<Job, StoreError> {
        let mut job = held.job();
        job.status = status;
        let now = now_ms();
        match status {
            JobStatus::Running if job.started_at.is_none() => job.started_at = Some(now),
            JobStatus::Done | JobStatus::Cancelled => job.finished_at = Some(now),
            JobStatus::Running => job.finished_at = None,
            _ => {}
        }
        self.put_job(&job).await?;
        *held.job.lock() = job.clone();
        tracing::info!(job = %job.id, status = status.as_str(), "broadcast");
        if status == JobStatus::Running {
            self.run(held);
        }
        self.count_active();
        Ok(job)
    }

    /// Asks for `edit` of every delivered copy (with the job's message replaced first for an
    /// update); the runner makes them. Returns how many copies.
    pub async fn edit_delivered(
        &self,
        held: &Arc<Held>,
        edit: Edit,
        message: Option<Message>,
    ) -> Result<usize, StoreError> {
        if let Some(message) = message {
            let mut job = held.job();
            job.message = message;
            self.put_job(&job).await?;
            *held.job.lock() = job;
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
    pub async fn retry_failed(&self, held: &Arc<Held>) -> Result<usize, StoreError> {
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

    /// Changes the recipients `pick` selects with `change`: stored first, then in memory.
    /// Returns how many.
    async fn change_recipients(
        &self,
        held: &Arc<Held>,
        pick: impl Fn(&Recipient) -> bool,
        change: impl Fn(Recipient) -> Recipient,
    ) -> Result<usize, StoreError> {
        // Outcomes still queued would land after these changes.
        self.flush_writes().await?;
        let now = now_ms();
        let changed: Vec<Recipient> = held
            .recipients
            .lock()
            .iter()
            .filter(|r| pick(r))
            .map(|r| Recipient {
                updated_at: now,
                ..change(r.clone())
            })
            .collect();
        self.put_recipients(&held.job().id, &changed).await?;
        let mut recipients = held.recipients.lock();
        for recipient in &changed {
            if let Some(slot) = recipients.get_mut(recipient.index as usize) {
                *slot = recipient.clone();
            }
        }
        Ok(changed.len())
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

    async fn run_job(self: &Arc<Self>, held: &Arc<Held>) {
        let job = held.job();
        if !self.hold_lease(&job.id).await {
            return;
        }
        let Some(integration) = self.registry.integration(&job.integration_id) else {
            tracing::warn!(job = %job.id, "the broadcast's integration is gone; the job stays as it is");
            return;
        };
        // A restarted router does not know what it sent just before; Teams does. Its first
        // window passes before a job goes on (Teams' windows are a second long, plus a margin).
        tokio::time::sleep_until(self.started + PREDECESSOR_WINDOW).await;
        if self.store.is_shared() {
            // Another instance may have run it since this one read its recipients.
            let recipients = self.load_recipients(&job.id).await;
            if !recipients.is_empty() {
                *held.recipients.lock() = recipients;
            }
        }
        held.sent_since_start.store(0, Ordering::Release);
        held.run_started_ms.store(now_ms(), Ordering::Release);
        // Written with an attempt counted and no outcome: in flight when the last runner stopped.
        let interrupted = held
            .recipients
            .lock()
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending && r.sending)
            .count() as u32;
        if interrupted > 0 {
            let mut job = held.job();
            job.resumed_in_flight += interrupted;
            if self.put_job(&job).await.is_ok() {
                *held.job.lock() = job;
            }
            tracing::info!(job = %held.job().id, interrupted, "broadcast resumed; recipients in flight before are sent again");
        }
        let mut queues = pending_by_tenant(held, &HashSet::new());
        let mut in_flight = FuturesUnordered::new();
        let mut per_tenant: HashMap<String, usize> = HashMap::new();
        let mut disabled_tenants: HashSet<String> = HashSet::new();
        let mut lease_renewed = crate::clock::now();
        loop {
            let stopping = held.job.lock().status != JobStatus::Running;
            if lease_renewed.elapsed() > LEASE / 3 {
                if !self.hold_lease(&held.job().id).await {
                    tracing::warn!(job = %held.job().id, "broadcast lease lost; another instance runs the job");
                    break;
                }
                lease_renewed = crate::clock::now();
            }
            // Fill the window: each tenant up to its own bound, tenants side by side.
            let mut store_failed = false;
            for (tenant, queue) in queues.iter_mut() {
                if stopping || store_failed {
                    break;
                }
                while in_flight.len() < MAX_IN_FLIGHT
                    && per_tenant.get(tenant).copied().unwrap_or(0) < PER_TENANT_IN_FLIGHT
                    && !disabled_tenants.contains(tenant)
                {
                    let Some(index) = queue.pop_front() else {
                        break;
                    };
                    let Some(mut recipient) = held
                        .recipients
                        .lock()
                        .get(index as usize)
                        .filter(|r| r.has_work())
                        .cloned()
                    else {
                        continue;
                    };
                    if recipient.status == RecipientStatus::Pending {
                        recipient.attempts += 1;
                        recipient.sending = true;
                        recipient.updated_at = now_ms();
                        if let Err(error) =
                            self.write_recipient(&held.job().id, &recipient, true).await
                        {
                            tracing::warn!(%error, "a broadcast waits for the store: a recipient's attempt cannot be recorded");
                            queue.push_front(index);
                            store_failed = true;
                            break;
                        }
                        if let Some(slot) = held.recipients.lock().get_mut(index as usize) {
                            slot.attempts = recipient.attempts;
                            slot.sending = false;
                        }
                    }
                    *per_tenant.entry(tenant.clone()).or_default() += 1;
                    let (broadcasts, integration, message) = (
                        Arc::clone(self),
                        Arc::clone(&integration),
                        held.job().message,
                    );
                    in_flight.push(async move {
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
                        (recipient, outcome)
                    });
                }
            }
            if store_failed && in_flight.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let Some((recipient, outcome)) = in_flight.next().await else {
                if stopping {
                    break;
                }
                // Every queue ran dry: what is still pending (sent later, or made pending
                // again by a retry) makes the next round.
                queues = pending_by_tenant(held, &disabled_tenants);
                if queues.values().all(VecDeque::is_empty) {
                    break;
                }
                continue;
            };
            let tenant = recipient.tenant().to_owned();
            if let Some(count) = per_tenant.get_mut(&tenant) {
                *count = count.saturating_sub(1);
            }
            let later = matches!(outcome, Outcome::Later);
            let index = recipient.index;
            self.record(held, recipient, outcome, &mut disabled_tenants)
                .await;
            if later {
                queues.entry(tenant).or_default().push_back(index);
            }
        }
        let status = held.job.lock().status;
        let pending = held
            .recipients
            .lock()
            .iter()
            .filter(|r| r.has_work())
            .count();
        if status == JobStatus::Running && pending == 0 {
            // Done only once every outcome is stored: a job stored as done is never resumed.
            if let Err(error) = self.flush_writes().await {
                tracing::warn!(%error, "a finished broadcast's last outcomes are not stored yet; it stays running");
                return;
            }
            if let Err(error) = self.set_status(held, JobStatus::Done).await {
                tracing::warn!(%error, "a finished broadcast is not recorded as done yet");
            }
        } else if status == JobStatus::Running && !disabled_tenants.is_empty() {
            // Only recipients of tenants where the app is disabled are left.
            if let Err(error) = self.set_status(held, JobStatus::Paused).await {
                tracing::warn!(%error, "a broadcast waiting for disabled tenants is not recorded as paused");
            }
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
            .get(&integration.record.id, &format!("conv:{conversation_id}"))
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
    async fn record(
        self: &Arc<Self>,
        held: &Arc<Held>,
        mut recipient: Recipient,
        outcome: Outcome,
        disabled_tenants: &mut HashSet<String>,
    ) {
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
                disabled_tenants.insert(recipient.tenant().to_owned());
                recipient.reason = Some("admin_disabled".into());
                "admin_disabled"
            }
            Outcome::TooLarge => {
                recipient.status = RecipientStatus::Failed;
                recipient.reason = Some("too_large".into());
                let mut job = held.job();
                job.error = Some("too_large: Teams refused the message as too large (413)".into());
                job.status = JobStatus::Done;
                job.finished_at = Some(now_ms());
                if self.put_job(&job).await.is_ok() {
                    *held.job.lock() = job;
                }
                "too_large"
            }
            Outcome::Later => "later",
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
                self.keep(held, recipient).await;
                return;
            }
        };
        counter!(BROADCAST_RECIPIENTS, "outcome" => label).increment(1);
        self.keep(held, recipient).await;
    }

    /// A recipient's new state: queued for the store, and in memory at once.
    async fn keep(&self, held: &Held, recipient: Recipient) {
        if let Err(error) = self
            .write_recipient(&held.job().id, &recipient, false)
            .await
        {
            tracing::warn!(%error, "a broadcast recipient's state is not stored; it is sent again if the job resumes elsewhere");
        }
        if let Some(slot) = held.recipients.lock().get_mut(recipient.index as usize) {
            *slot = recipient;
        }
    }
}
