//! Each integration's event log: what happened to it (callbacks accepted, refused or ignored,
//! conversation and installation updates, setup results, connector and backend errors), bounded
//! to the newest `admin.event_log_size` entries and kept in the store, where it outlives the
//! integration. Accepted callbacks are summed up once a second per integration (one event with
//! the count per activity type), so the request path only bumps a counter and busy traffic does
//! not push refusals and setup results out of the log. Other events go through a bounded queue
//! ([`EventSink`]); one task appends them and writes changed logs to the store once a second.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use metrics::counter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::registry::Registry;
use crate::store::{Store, StoreHealth, now_ms};
use crate::telemetry::EVENTS_DROPPED;

pub const STORE_KIND: &str = "events";
/// Events waiting for the log task at most; beyond it they are dropped and counted.
const QUEUE_CAPACITY: usize = 65_536;

/// One logged event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Increases by one per event of the integration; the list cursor.
    pub seq: u64,
    pub at: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An event before the log numbers it.
#[derive(Debug, Default)]
pub struct EventDraft {
    pub kind: &'static str,
    pub activity_type: Option<String>,
    pub activity_id: Option<String>,
    pub reason: Option<String>,
    pub message: Option<String>,
}

impl EventDraft {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }
    pub fn activity(mut self, kind: &str, id: &str) -> Self {
        self.activity_type = Some(kind.to_owned());
        self.activity_id = Some(id.to_owned());
        self
    }
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// Where the data path and the management API send events. Cloning is cheap; sending never
/// waits.
#[derive(Clone)]
pub struct EventSink {
    queue: Option<mpsc::Sender<(Arc<str>, EventDraft, u64)>>,
}

impl EventSink {
    /// A sink that drops everything (tools, benches).
    pub fn disabled() -> Self {
        Self { queue: None }
    }

    pub fn record(&self, integration: &Arc<str>, draft: EventDraft) {
        let Some(queue) = &self.queue else {
            return;
        };
        if queue
            .try_send((Arc::clone(integration), draft, now_ms()))
            .is_err()
        {
            counter!(EVENTS_DROPPED).increment(1);
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Ring {
    next_seq: u64,
    events: VecDeque<Event>,
    /// The account of the integration, so its log stays readable after it is deleted.
    #[serde(default)]
    account: Option<String>,
}

/// The logs, in memory and in the store.
pub struct EventLog {
    rings: DashMap<String, Mutex<Ring>>,
    capacity: usize,
}

impl EventLog {
    /// Loads the stored logs and starts the task that fills and saves them.
    pub async fn start(
        registry: Arc<Registry>,
        store: Arc<Store>,
        health: Arc<StoreHealth>,
        capacity: usize,
        shutdown: watch::Receiver<bool>,
    ) -> (Arc<Self>, EventSink, tokio::task::JoinHandle<()>) {
        let log = Arc::new(Self {
            rings: DashMap::new(),
            capacity: capacity.max(1),
        });
        match store.records(STORE_KIND).await {
            Ok(records) => {
                for (id, bytes) in records {
                    match serde_json::from_slice::<Ring>(&bytes) {
                        Ok(ring) => {
                            log.rings.insert(id, Mutex::new(ring));
                        }
                        Err(error) => {
                            tracing::warn!(integration = %id, %error, "stored event log is unreadable; starting it afresh")
                        }
                    }
                }
            }
            Err(error) => {
                health.observe("records", &Err::<(), _>(error.clone()));
                tracing::warn!(%error, "event logs could not be loaded; new events are kept");
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let task = tokio::spawn(Arc::clone(&log).run(rx, registry, store, health, shutdown));
        (log, EventSink { queue: Some(tx) }, task)
    }

    fn append(&self, integration: &str, draft: EventDraft, at: u64) {
        let ring = self.rings.entry(integration.to_owned()).or_default();
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.events.push_back(Event {
            seq,
            at,
            kind: draft.kind.to_owned(),
            activity_type: draft.activity_type,
            activity_id: draft.activity_id,
            reason: draft.reason,
            message: draft.message,
        });
        while ring.events.len() > self.capacity {
            ring.events.pop_front();
        }
    }

    /// Records which account an integration's log belongs to.
    pub fn claim(&self, integration: &str, account: &str) {
        let ring = self.rings.entry(integration.to_owned()).or_default();
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.account.as_deref() != Some(account) {
            ring.account = Some(account.to_owned());
        }
    }

    /// The account a log belongs to, if it is known.
    pub fn owner(&self, integration: &str) -> Option<String> {
        let ring = self.rings.get(integration)?;
        let ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.account.clone()
    }

    /// A copy of an integration's events, oldest first.
    pub fn events(&self, integration: &str) -> Vec<Event> {
        self.rings
            .get(integration)
            .map(|ring| {
                let ring = ring.lock().unwrap_or_else(|p| p.into_inner());
                ring.events.iter().cloned().collect()
            })
            .unwrap_or_default()
    }

    async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<(Arc<str>, EventDraft, u64)>,
        registry: Arc<Registry>,
        store: Arc<Store>,
        health: Arc<StoreHealth>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut dirty: HashSet<Arc<str>> = HashSet::new();
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Some((integration, draft, at)) => {
                        self.append(&integration, draft, at);
                        dirty.insert(integration);
                    }
                    None => break,
                },
                _ = flush.tick() => {
                    self.sum_up_accepted(&registry, &mut dirty);
                    self.save(&mut dirty, &store, &health).await;
                }
                _ = shutdown.changed() => break,
            }
        }
        self.sum_up_accepted(&registry, &mut dirty);
        while let Ok((integration, draft, at)) = rx.try_recv() {
            self.append(&integration, draft, at);
            dirty.insert(integration);
        }
        self.save(&mut dirty, &store, &health).await;
    }

    /// One `callback.accepted` event per integration that acknowledged activities since the
    /// last tick (the count per type in the message), and one `callback.rejected` per
    /// integration that refused unauthenticated requests (the count per reason).
    fn sum_up_accepted(&self, registry: &Registry, dirty: &mut HashSet<Arc<str>>) {
        for integration in registry.integrations() {
            if self.sum_up(&integration) {
                dirty.insert(Arc::clone(&integration.id));
            }
        }
    }

    /// Sums up what `integration` counted since the last tick into its log; true when it
    /// added something. Called at every tick, and once more when the integration is deleted.
    pub fn sum_up(&self, integration: &crate::registry::Integration) -> bool {
        let mut added = false;
        let accepted = integration.take_accepted();
        if !accepted.is_empty() {
            let total: u64 = accepted.iter().map(|(_, n)| n).sum();
            let by_type: Vec<String> = accepted.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let draft = EventDraft::new("callback.accepted").message(format!(
                "{total} activit{} accepted ({})",
                if total == 1 { "y" } else { "ies" },
                by_type.join(", ")
            ));
            self.append(&integration.id, draft, now_ms());
            added = true;
        }
        let refused = integration.take_refused();
        if !refused.is_empty() {
            let total: u64 = refused.iter().map(|(_, n)| n).sum();
            let by_reason: Vec<String> = refused.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            let mut draft = EventDraft::new("callback.rejected").message(format!(
                "{total} unauthenticated request{} refused ({})",
                if total == 1 { "" } else { "s" },
                by_reason.join(", ")
            ));
            if let [(reason, _)] = refused.as_slice() {
                draft = draft.reason(*reason);
            }
            self.append(&integration.id, draft, now_ms());
            added = true;
        }
        added
    }

    async fn save(&self, dirty: &mut HashSet<Arc<str>>, store: &Store, health: &StoreHealth) {
        if dirty.is_empty() {
            return;
        }
        let mut records = Vec::with_capacity(dirty.len());
        for integration in dirty.iter() {
            if let Some(ring) = self.rings.get(integration.as_ref()) {
                let ring = ring.lock().unwrap_or_else(|p| p.into_inner());
                if let Ok(bytes) = serde_json::to_vec(&*ring) {
                    records.push((integration.to_string(), bytes));
                }
            }
        }
        let result = store.put_records(STORE_KIND, records).await;
        health.observe("records", &result);
        // Kept dirty on failure: the next tick writes them again.
        if result.is_ok() {
            dirty.clear();
        }
    }
}
