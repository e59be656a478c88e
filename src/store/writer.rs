//! The two writers between the conversations and the store.
//!
//! - [`Snapshots`]: write-behind. A turn hands over its conversation's latest snapshot and goes
//!   on; snapshots of one key coalesce (only the newest is written), writes are batched, failed
//!   ones are retried and counted, and reads look at pending snapshots before the store. A
//!   snapshot stays pending until the store has it, so a read never falls between the two.
//! - [`Journal`]: durable accept with group commit. Concurrent requests' activities are written
//!   in one store operation; each request waits only for the write that holds its activity.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{counter, histogram};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{JournalEntry, Put, Store, StoreError, StoreHealth, now_ms};
use crate::telemetry::{SNAPSHOT_DURATION, SNAPSHOT_FAILURES};

const SNAPSHOT_BATCH: usize = 256;

pub struct Snapshots {
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    /// Newest unwritten snapshot per key, with the order it was saved in.
    pending: DashMap<String, (u64, Put)>,
    saved: AtomicU64,
    /// One batch at a time (the writer loop, or the flush at shutdown): a key's snapshots reach
    /// the store in the order they were saved.
    writing: tokio::sync::Mutex<()>,
    max_pending: usize,
    wake: Notify,
    /// Every batch waits for the disk (durable accept: the snapshot holds the dedup window that
    /// keeps a replayed activity from being answered twice).
    always_durable: bool,
    /// Snapshots committed without waiting for the disk since the last durable commit, kept
    /// until a durable commit has them: if it fails, they are written again, and reads see them
    /// meanwhile (a failed sync may take them back out of the store).
    committed_unsynced: DashMap<String, (u64, Put)>,
    /// The store's reopen count before the first of those commits: if it changed by the time
    /// of the durable commit, they may be gone, and are written again.
    unsynced_since: AtomicU64,
    /// When a commit last reached the disk.
    last_sync: parking_lot::Mutex<crate::clock::Instant>,
    /// Without durable accept, snapshot batches reach the disk at most this far apart: a kill -9
    /// loses at most this much session history (`storage.snapshot_sync_ms`).
    sync_every: Duration,
    /// How long a batch gathers snapshots before it is written, unless it fills first
    /// (`storage.snapshot_batch_ms`): one commit then carries many turns, and a busy
    /// conversation's snapshots of those turns are written once.
    gather_for: Duration,
}

/// How the snapshot writer batches and syncs (from `[storage]`).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPolicy {
    pub max_pending: usize,
    pub always_durable: bool,
    pub sync_every: Duration,
    pub gather_for: Duration,
}

impl SnapshotPolicy {
    pub fn of(config: &crate::config::StorageConfig) -> Self {
        Self {
            max_pending: config.snapshot_pending_max,
            always_durable: config.durable_accept(),
            sync_every: Duration::from_millis(config.snapshot_sync_ms),
            gather_for: Duration::from_millis(config.snapshot_batch_ms),
        }
    }
}

impl Snapshots {
    pub fn new(store: Arc<Store>, health: Arc<StoreHealth>, policy: SnapshotPolicy) -> Arc<Self> {
        Arc::new(Self {
            store,
            health,
            pending: DashMap::new(),
            saved: AtomicU64::new(0),
            writing: tokio::sync::Mutex::new(()),
            max_pending: policy.max_pending,
            wake: Notify::new(),
            always_durable: policy.always_durable || policy.sync_every.is_zero(),
            sync_every: policy.sync_every,
            gather_for: policy.gather_for,
            committed_unsynced: DashMap::new(),
            unsynced_since: AtomicU64::new(0),
            last_sync: parking_lot::Mutex::new(crate::clock::now()),
        })
    }

    /// How long a conversation may gather its turns into one snapshot: with the embedded store
    /// and without durable accept, a snapshot waits as long as the batches wait for the disk
    /// (a kill -9 loses at most that much more history); otherwise each turn is written (under
    /// durable accept, or for another instance to read).
    pub fn coalesce_window(&self) -> Option<Duration> {
        (matches!(*self.store, Store::Embedded(_)) && !self.always_durable)
            .then_some(self.sync_every)
    }

    /// Whether the next commit must wait for the disk.
    fn sync_due(&self) -> bool {
        self.always_durable || self.last_sync.lock().elapsed() >= self.sync_every
    }

    /// Records a successful commit; `reopens_before` is the store's reopen count read before it.
    fn committed(&self, durable: bool, reopens_before: u64) {
        if durable {
            *self.last_sync.lock() = crate::clock::now();
            if self.unsynced_since.load(Ordering::Acquire) == self.store.reopen_count() {
                self.committed_unsynced.clear();
            } else {
                // The file was reopened meanwhile: what was not on the disk is written again.
                self.requeue_unsynced();
            }
        } else if self.committed_unsynced.is_empty() {
            // The first commit since the disk last had everything.
            self.unsynced_since.store(reopens_before, Ordering::Release);
        }
    }

    /// A durable commit failed: what was committed without the disk is written again.
    fn requeue_unsynced(&self) {
        let keys: Vec<String> = self
            .committed_unsynced
            .iter()
            .map(|e| e.key().clone())
            .collect();
        for key in keys {
            if let Some((key, (order, put))) = self.committed_unsynced.remove(&key) {
                self.pending.entry(key).or_insert((order, put));
            }
        }
    }

    /// Makes every batch committed so far reach the disk (an empty durable commit).
    async fn sync(&self) -> Result<(), StoreError> {
        if self.committed_unsynced.is_empty() {
            return Ok(());
        }
        let _writing = self.writing.lock().await;
        let reopens_before = self.store.reopen_count();
        let result = self.store.put_many_with(Vec::new(), true).await;
        self.health.observe("put", &result);
        match &result {
            Ok(()) => self.committed(true, reopens_before),
            Err(_) => {
                // Those snapshots did not reach the disk: counted as failed, and written again.
                counter!(SNAPSHOT_FAILURES).increment(self.committed_unsynced.len() as u64);
                self.requeue_unsynced();
            }
        }
        result
    }

    /// Queues a snapshot; never waits. When the queue is full, a new key's snapshot is dropped,
    /// counted in `snapshot_failures_total`, and `false` says so (the caller keeps its state).
    pub fn save(&self, put: Put) -> bool {
        if self.pending.len() >= self.max_pending && !self.pending.contains_key(&put.key) {
            counter!(SNAPSHOT_FAILURES).increment(1);
            tracing::warn!("snapshot queue full; a snapshot was dropped");
            return false;
        }
        let order = self.saved.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(put.key.clone(), (order, put));
        self.wake.notify_one();
        true
    }

    /// The newest snapshot of `key`: a pending one, else the stored one.
    pub async fn load(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(entry) = self.pending.get(key) {
            return Ok(Some(entry.1.value.to_vec()));
        }
        if let Some(entry) = self.committed_unsynced.get(key) {
            return Ok(Some(entry.1.value.to_vec()));
        }
        let result = self.store.get(key).await;
        self.health.observe("get", &result);
        result
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Waits (up to `deadline`) until every snapshot queued before this call is in the store
    /// (or replaced by a newer one, itself written); false if some are not yet.
    pub async fn written_so_far(&self, deadline: Duration) -> bool {
        let queued_before = self.saved.load(Ordering::Relaxed);
        let until = crate::clock::now() + deadline;
        loop {
            if !self
                .pending
                .iter()
                .any(|entry| entry.value().0 < queued_before)
            {
                return true;
            }
            if crate::clock::now() >= until {
                return false;
            }
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes a batch of what is pending; a written snapshot leaves the queue only once the
    /// store has it, and only if no newer one of its key came meanwhile. Failed writes stay.
    pub async fn flush_once(&self) -> Result<usize, StoreError> {
        self.write_batch(self.sync_due()).await
    }

    async fn write_batch(&self, durable: bool) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().await;
        let (orders, batch): (Vec<u64>, Vec<Put>) = self
            .pending
            .iter()
            .take(SNAPSHOT_BATCH)
            .map(|entry| entry.value().clone())
            .unzip();
        if batch.is_empty() {
            return Ok(0);
        }
        let started = crate::clock::now();
        let count = batch.len();
        let kept: Vec<Put> = if durable { Vec::new() } else { batch.clone() };
        let keys: Vec<String> = batch.iter().map(|put| put.key.clone()).collect();
        let reopens_before = self.store.reopen_count();
        let result = self.store.put_many_with(batch, durable).await;
        self.health.observe("put", &result);
        match result {
            Ok(()) => {
                self.committed(durable, reopens_before);
                for (key, order) in keys.iter().zip(orders.iter().copied()) {
                    self.pending
                        .remove_if(key, |_, (pending, _)| *pending == order);
                }
                for (put, order) in kept.into_iter().zip(orders) {
                    self.committed_unsynced
                        .insert(put.key.clone(), (order, put));
                }
                let per_snapshot = started.elapsed().as_secs_f64() / count as f64;
                for _ in 0..count {
                    histogram!(SNAPSHOT_DURATION).record(per_snapshot);
                }
                Ok(count)
            }
            Err(error) => {
                counter!(SNAPSHOT_FAILURES).increment(count as u64);
                // A failed commit may have taken the store back to its last durable state (the
                // embedded store reopens its file): what was not on the disk is written again.
                self.requeue_unsynced();
                Err(error)
            }
        }
    }

    /// Writes pending snapshots until shutdown; backs off while the store fails.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.pending.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {},
                    _ = tokio::time::sleep(self.sync_every.max(Duration::from_millis(50))) => {
                        // Quiet: what was committed without the disk gets there now.
                        if self.sync_due() && self.sync().await.is_err() {
                            tracing::warn!("snapshot batches not synced to disk yet; retried");
                        }
                        continue;
                    },
                    _ = shutdown.changed() => return,
                }
            }
            if !self.gather_for.is_zero() && self.pending.len() < SNAPSHOT_BATCH {
                tokio::select! {
                    _ = tokio::time::sleep(self.gather_for) => {},
                    _ = shutdown.changed() => return,
                }
            }
            match self.flush_once().await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Drains what is pending (bounded by `deadline`) onto the disk, for shutdown.
    pub async fn flush(&self, deadline: Duration) {
        let until = crate::clock::now() + deadline;
        while !self.pending.is_empty() && crate::clock::now() < until {
            if self.write_batch(true).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if self.sync().await.is_err() {
            tracing::warn!("snapshot batches not synced to disk before exit");
        }
        if !self.pending.is_empty() {
            tracing::warn!(
                left = self.pending.len(),
                "snapshots not written before exit"
            );
        }
    }
}

type Done<T> = oneshot::Sender<Result<T, StoreError>>;

enum JournalCommand {
    Append(JournalEntry, Done<bool>),
    Complete(u64, Option<Done<()>>),
}

/// Handle of the durable-accept journal.
pub struct Journal {
    commands: mpsc::UnboundedSender<JournalCommand>,
    next_seq: AtomicU64,
    /// Appends waiting or being written; bounded so a stalled store sheds load.
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Journal {
    /// Starts the writer task. `first_seq` must be above every journaled sequence.
    pub fn start(
        store: Arc<Store>,
        health: Arc<StoreHealth>,
        batch_max: usize,
        dedup_ttl: Duration,
        first_seq: u64,
        shutdown: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let journal = Arc::new(Self {
            commands: tx,
            next_seq: AtomicU64::new(first_seq.max(now_ms() * 1_000)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(batch_max.max(1) * 16)),
        });
        let task = tokio::spawn(run_journal(
            store,
            health,
            rx,
            batch_max.max(1),
            dedup_ttl,
            shutdown,
        ));
        (journal, task)
    }

    /// Records an accepted activity; resolves when it is durable. `Ok(false)`: another instance
    /// already took this activity (global dedup).
    pub async fn append(
        &self,
        integration: &str,
        conversation_id: &str,
        activity_id: &str,
        body: &[u8],
    ) -> Result<(u64, bool), StoreError> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(StoreError::Unavailable("journal backlog is full".into()));
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = JournalEntry {
            seq,
            integration: integration.to_owned(),
            conversation_id: conversation_id.to_owned(),
            activity_id: activity_id.to_owned(),
            accepted_at_ms: now_ms(),
            body: String::from_utf8_lossy(body).into_owned(),
        };
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(JournalCommand::Append(entry, tx))
            .map_err(|_| StoreError::Unavailable("journal writer stopped".into()))?;
        let fresh = rx
            .await
            .map_err(|_| StoreError::Unavailable("journal writer stopped".into()))??;
        Ok((seq, fresh))
    }

    /// Marks an activity answered (it needed no reply, or was dropped); does not wait.
    pub fn complete(&self, seq: u64) {
        let _ = self.commands.send(JournalCommand::Complete(seq, None));
    }

    /// Records that an activity's reply was sent, and waits until that is durable: a crash
    /// before this returns replays the turn (one duplicate message), a crash after does not.
    pub async fn record_answered(&self, seq: u64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(JournalCommand::Complete(seq, Some(tx)))
            .map_err(|_| StoreError::Unavailable("journal writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("journal writer stopped".into()))?
    }
}

async fn run_journal(
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    mut commands: mpsc::UnboundedReceiver<JournalCommand>,
    batch_max: usize,
    dedup_ttl: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut completes: Vec<u64> = Vec::new();
    let mut complete_waiters: Vec<Done<()>> = Vec::new();
    let mut draining = false;
    loop {
        let first = if draining {
            commands.try_recv().ok()
        } else {
            tokio::select! {
                c = commands.recv() => c,
                _ = tokio::time::sleep(Duration::from_millis(200)), if !completes.is_empty() => None,
                _ = shutdown.changed() => { draining = true; None }
            }
        };
        let mut appends = Vec::new();
        let mut waiters = Vec::new();
        let mut next = first;
        loop {
            match next.take() {
                Some(JournalCommand::Append(entry, done)) => {
                    appends.push(entry);
                    waiters.push(done);
                }
                Some(JournalCommand::Complete(seq, done)) => {
                    completes.push(seq);
                    complete_waiters.extend(done);
                }
                None => {}
            }
            if appends.len() >= batch_max {
                break;
            }
            match commands.try_recv() {
                Ok(command) => next = Some(command),
                Err(_) => break,
            }
        }
        if !appends.is_empty() {
            let result = store.append_journal(appends, dedup_ttl).await;
            health.observe("journal_append", &result);
            match result {
                Ok(fresh) => {
                    for (done, fresh) in waiters.into_iter().zip(fresh) {
                        let _ = done.send(Ok(fresh));
                    }
                }
                Err(error) => {
                    for done in waiters {
                        let _ = done.send(Err(error.clone()));
                    }
                }
            }
        }
        if !completes.is_empty() {
            let batch = std::mem::take(&mut completes);
            let result = store.complete_journal(batch.clone()).await;
            health.observe("journal_complete", &result);
            for done in complete_waiters.drain(..) {
                let _ = done.send(result.clone());
            }
            if result.is_err() {
                // Kept for the next round: an answered activity must not be replayed later.
                completes = batch;
                if draining {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if draining && commands.is_empty() && completes.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn snapshots(name: &str, max_pending: usize) -> (Arc<Snapshots>, std::path::PathBuf) {
        snapshots_gathering(name, max_pending, Duration::ZERO)
    }

    fn snapshots_gathering(
        name: &str,
        max_pending: usize,
        gather_for: Duration,
    ) -> (Arc<Snapshots>, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("teams-router-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = EmbeddedStore::open(&dir, 1 << 20, false).unwrap();
        let store = Arc::new(Store::Embedded(Arc::new(store)));
        (
            Snapshots::new(
                store,
                Arc::new(StoreHealth::default()),
                SnapshotPolicy {
                    max_pending,
                    always_durable: true,
                    sync_every: Duration::ZERO,
                    gather_for,
                },
            ),
            dir,
        )
    }

    fn put(key: &str, value: &str) -> Put {
        Put {
            key: key.into(),
            value: value.as_bytes().into(),
            ttl: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_batch_gathers_snapshots_before_its_commit_and_they_stay_readable() {
        let (snapshots, dir) = snapshots_gathering("gather", 10, Duration::from_millis(300));
        let (stop, stopped) = watch::channel(false);
        let writer = tokio::spawn(Arc::clone(&snapshots).run(stopped));
        assert!(snapshots.save(put("a", "1")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(snapshots.save(put("a", "2")));
        assert!(snapshots.save(put("b", "1")));
        assert_eq!(
            snapshots.pending(),
            2,
            "still gathering: nothing written yet"
        );
        assert_eq!(snapshots.store.get("a").await.unwrap(), None);
        assert_eq!(
            snapshots.load("a").await.unwrap().as_deref(),
            Some(&b"2"[..]),
            "the newest snapshot of a key is read while it waits"
        );
        let until = crate::clock::now() + Duration::from_secs(5);
        while snapshots.pending() > 0 && crate::clock::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(snapshots.pending(), 0, "written after the gathering time");
        assert_eq!(
            snapshots.store.get("a").await.unwrap().as_deref(),
            Some(&b"2"[..]),
            "one key written once, with its newest snapshot"
        );
        let _ = stop.send(true);
        let _ = writer.await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_snapshot_is_readable_before_during_and_after_its_write() {
        let (snapshots, dir) = snapshots("readable", 10);
        assert!(snapshots.save(put("a", "1")));
        assert_eq!(
            snapshots.load("a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        // Reads while the batch is being written: the snapshot is pending or stored, never
        // neither.
        let reader = {
            let snapshots = Arc::clone(&snapshots);
            tokio::spawn(async move {
                for _ in 0..200 {
                    assert_eq!(
                        snapshots.load("a").await.unwrap().as_deref(),
                        Some(&b"1"[..])
                    );
                    tokio::task::yield_now().await;
                }
            })
        };
        assert_eq!(snapshots.flush_once().await.unwrap(), 1);
        reader.await.unwrap();
        assert_eq!(snapshots.pending(), 0);
        assert_eq!(
            snapshots.load("a").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_new_keys_and_coalesces_known_ones() {
        let (snapshots, dir) = snapshots("full", 2);
        assert!(snapshots.save(put("a", "1")));
        assert!(snapshots.save(put("b", "1")));
        assert!(!snapshots.save(put("c", "1")), "a new key is refused");
        assert!(snapshots.save(put("a", "2")), "a known key is replaced");
        assert_eq!(
            snapshots.load("a").await.unwrap().as_deref(),
            Some(&b"2"[..])
        );
        snapshots.flush_once().await.unwrap();
        assert!(snapshots.save(put("c", "1")), "room again once written");
        let _ = std::fs::remove_dir_all(dir);
    }
}
