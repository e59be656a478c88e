//! One holder per partition of conversations (shared Redis store): this instance's leases, the
//! readers of its partitions' streams, and the hand-over of their entries to the conversations.
//!
//! Every third of `storage.lease_ms` the instance heartbeats, renews what it holds, and balances:
//! with `n` live instances each aims at `partitions / n` (one more for the first `partitions % n`
//! in run-id order, so the shares add up); one holding more gives partitions
//! up once nothing read from them is in flight, one holding fewer takes free ones. A partition
//! taken over (its holder died, or gave it up) is first replayed: the entries the group still has
//! pending, whoever read them, in stream order, then new ones. A partition is read by one task at
//! a time, so its entries reach their conversations in stream order; a conversation's turns then
//! run one at a time in that order. A lapsed lease stops everything of its partition: nothing more
//! is read, turns not yet started are dropped (the next holder runs them), and an answer finished
//! late is refused by the lease check in Redis (fencing).
//!
//! See `docs/scale-out.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use metrics::{counter, gauge};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::activity::TurnActivity;
use crate::connector::pacing::Share;
use crate::conversation::{Admission, Directory};
use crate::store::partitions::{
    Appended, HandedOver, Lease, PartitionLog, ReadFrom, StreamEntry, StreamReceipt, parse_id,
};
use crate::store::{Receipt, StoreError};
use crate::telemetry::{PARTITION_REPLAYED, PARTITION_TAKEOVERS, PARTITIONS_HELD};

/// Entries read from a partition in one call.
const READ_BATCH: usize = 128;
/// Every held partition is read this often even without a wake-up (a pub/sub message can be
/// lost while a connection is re-established; the holder's own appends wake it directly): one
/// read script per held partition, so an idle instance holding 1,024 partitions sends about 200
/// a second.
const POLL: Duration = Duration::from_secs(5);
/// Every this many polls a holder also looks at its partitions' pending entries (those it has in
/// flight aside): one `XAUTOCLAIM` per partition.
const SWEEP_EVERY_POLLS: u32 = 6;
/// A conversation that cannot take an entry now (its mailbox is full) is offered it again after
/// this long; the partition's later entries wait behind it, in order.
const RETRY: Duration = Duration::from_millis(50);

/// A partition this instance holds.
struct Held {
    lease: Arc<Lease>,
    /// A task is reading it.
    reading: AtomicBool,
    /// Woken while being read: read once more.
    again: AtomicBool,
}

pub struct Owner {
    log: Arc<PartitionLog>,
    /// This process's name as a consumer and lease holder: new at every start, so that nothing
    /// depends on an instance's name surviving it.
    run: String,
    lease_ms: u64,
    dedup_ttl: Duration,
    /// Off: the 200 went out before the append, and an activity Redis refuses runs unrecorded.
    durable_accept: bool,
    directory: Arc<Directory>,
    held: Vec<Mutex<Option<Arc<Held>>>>,
    wakes: mpsc::UnboundedSender<u16>,
    /// Shutting down: nothing more is read or taken.
    stopping: AtomicBool,
    /// This instance's part of Teams' per-app-and-tenant budgets follows the partitions it holds.
    budget: Arc<Share>,
    /// Other instances were live at the last heartbeat.
    shared: AtomicBool,
}

/// How an instance holds partitions (from the `storage` settings).
pub struct OwnerSettings<'a> {
    pub instance_id: &'a str,
    pub lease_ms: u64,
    pub dedup_ttl: Duration,
    pub durable_accept: bool,
}

impl Owner {
    /// Takes a first share of the partitions, and starts the lease, reader and wake-up tasks.
    pub async fn start(
        log: Arc<PartitionLog>,
        directory: Arc<Directory>,
        settings: OwnerSettings<'_>,
        budget: Arc<Share>,
        shutdown: watch::Receiver<bool>,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let OwnerSettings {
            instance_id,
            lease_ms,
            dedup_ttl,
            durable_accept,
        } = settings;
        budget.partitioned(log.partitions);
        let (wakes, woken) = mpsc::unbounded_channel();
        let run = format!(
            "{}-{:016x}",
            instance_id.replace([':', '{', '}', ' '], "_"),
            rand::random::<u64>()
        );
        let owner = Arc::new(Self {
            held: (0..log.partitions).map(|_| Mutex::new(None)).collect(),
            log,
            run,
            lease_ms,
            dedup_ttl,
            durable_accept,
            directory,
            wakes,
            stopping: AtomicBool::new(false),
            budget,
            shared: AtomicBool::new(true),
        });
        tracing::info!(run = %owner.run, partitions = owner.log.partitions, "taking partitions");
        owner.tend().await;
        let tasks = vec![
            tokio::spawn(Arc::clone(&owner).keep_leases(shutdown.clone())),
            tokio::spawn(Arc::clone(&owner).read_woken(woken, shutdown.clone())),
            tokio::spawn(Arc::clone(&owner).listen_for_wakes(shutdown)),
        ];
        (owner, tasks)
    }

    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// Records an accepted activity in its partition. Held here, and with nothing of the
    /// partition still to hand over before it, the activity goes to its conversation at once
    /// (no read back); else the holder is woken and reads it. False: a redelivery some instance
    /// claimed before.
    pub async fn accept(
        &self,
        integration: &Arc<str>,
        conversation_id: &str,
        activity_id: &str,
        body: &Bytes,
        activity: Option<Box<TurnActivity>>,
    ) -> Result<bool, StoreError> {
        let appended = self
            .log
            .append(
                &self.run,
                self.dedup_ttl,
                integration,
                conversation_id,
                activity_id,
                body,
            )
            .await;
        let appended = match (appended, activity) {
            (Ok(appended), activity) => (appended, activity),
            (Err(error), None) => return Err(error),
            (Err(error), Some(activity)) => {
                return Err(self.run_unrecorded(
                    integration,
                    conversation_id,
                    activity_id,
                    activity,
                    error,
                ));
            }
        };
        let (appended, activity) = appended;
        let Some(appended) = appended else {
            return Ok(false);
        };
        if appended.holder != self.run {
            return Ok(true);
        }
        let partition = self.log.partition_of(integration, conversation_id);
        let handed = match (activity, self.held(partition)) {
            (Some(activity), Some(held)) if self.may_read(&held.lease) => self.hand_over_accepted(
                &held.lease,
                integration,
                conversation_id,
                activity_id,
                activity,
                &appended,
            ),
            _ => false,
        };
        if !handed {
            let _ = self.wakes.send(partition);
        }
        Ok(true)
    }

    /// Without durable accept (acknowledged before Redis answered), an activity Redis refused
    /// still runs here, unrecorded, as with a single instance; the error is passed on.
    fn run_unrecorded(
        &self,
        integration: &Arc<str>,
        conversation_id: &str,
        activity_id: &str,
        activity: Box<TurnActivity>,
        error: StoreError,
    ) -> StoreError {
        // Recorded but not confirmed by the replicas: its holder runs it.
        if !self.durable_accept && !matches!(error, StoreError::NotReplicated(_)) {
            let _ = self.directory.accept_recorded(
                integration,
                conversation_id,
                activity_id,
                activity,
                None,
            );
        }
        error
    }

    /// The request's own hand-over, when every entry before this one was handed over already
    /// (else the reader keeps the stream's order).
    fn hand_over_accepted(
        &self,
        lease: &Arc<Lease>,
        integration: &Arc<str>,
        conversation_id: &str,
        activity_id: &str,
        activity: Box<TurnActivity>,
        appended: &Appended,
    ) -> bool {
        let Some(id) = parse_id(&appended.id) else {
            return false;
        };
        let previous = parse_id(&appended.previous);
        let mut handed_over = lease.handed_over();
        if id <= handed_over.upto || previous.is_some_and(|p| p > handed_over.upto) {
            return false;
        }
        let receipt = Arc::new(StreamReceipt::new(
            Arc::clone(&self.log),
            Arc::clone(lease),
            appended.id.clone(),
        ));
        let admission = self.directory.accept_recorded(
            integration,
            conversation_id,
            activity_id,
            activity,
            Some(Receipt::Stream(Arc::clone(&receipt))),
        );
        let duplicate = matches!(admission, Admission::Duplicate(_));
        // Full or overloaded: the reader offers it again, in order.
        let taken = duplicate || matches!(admission, Admission::Accepted(_));
        if taken {
            handed_over.upto = id;
            receipt.handed_over(&mut handed_over);
        }
        // Released before the receipt can drop: its drop takes the same lock.
        drop(handed_over);
        if duplicate {
            finish_later(receipt);
        }
        taken
    }

    fn held(&self, partition: u16) -> Option<Arc<Held>> {
        self.held
            .get(usize::from(partition))
            .and_then(|slot| slot.lock().clone())
    }

    fn all_held(&self) -> Vec<Arc<Held>> {
        self.held
            .iter()
            .filter_map(|slot| slot.lock().clone())
            .collect()
    }

    /// Tells the pacer how many partitions are held now. Called before a lease is given back
    /// and after one is taken, so that this instance's part of the budget and the next holder's
    /// never overlap.
    fn held_changed(&self) {
        let held = self
            .held
            .iter()
            .filter(|slot| slot.lock().is_some())
            .count();
        self.budget.set_held(held);
    }

    async fn keep_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis((self.lease_ms / 3).max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            if !self.stopping.load(Ordering::Acquire) {
                self.tend().await;
            } else {
                // Draining: what it holds stays its own until it is released, or the
                // acknowledgements (and snapshots) of its last turns would be refused and the
                // next holder would answer them again. Nothing is taken or balanced any more.
                self.renew_held().await;
            }
        }
    }

    /// Renews every lease held (a lapsed one is not renewed).
    async fn renew_held(&self) {
        let leases: Vec<Arc<Lease>> = self
            .all_held()
            .iter()
            .map(|h| Arc::clone(&h.lease))
            .collect();
        if let Err(error) = self.log.renew(&leases, self.lease_ms).await {
            tracing::warn!(%error, "some partition leases not renewed this round; their turns stop if they lapse");
        }
    }

    /// Heartbeat, renewals, hand-backs and takeovers: one round.
    async fn tend(&self) {
        // Renewed first and whatever the heartbeat does: in a cluster the live set's key and a
        // partition's lease may be on different nodes, and one node failing must not cost the
        // leases kept on the others.
        self.renew_held().await;
        let live = self.log.heartbeat(&self.run, self.lease_ms).await;
        self.forget_lapsed().await;
        self.hand_back_released().await;
        let live = match live {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "live instances unknown this round; partitions not balanced");
                return;
            }
        };
        self.budget.set_instances(live.len());
        self.shared
            .store(live.iter().any(|r| *r != self.run), Ordering::Release);

        let target = share(usize::from(self.log.partitions), &live, &self.run);
        let keeping: Vec<Arc<Held>> = self
            .all_held()
            .into_iter()
            .filter(|h| !h.lease.is_releasing())
            .collect();
        if keeping.len() > target {
            // The least busy go first; each is released once nothing read from it is in flight.
            let mut by_load = keeping;
            by_load.sort_by_key(|h| h.lease.in_flight());
            let surplus = by_load.len() - target;
            for held in by_load.into_iter().take(surplus) {
                held.lease.start_releasing();
            }
            self.hand_back_released().await;
        } else if keeping.len() < target {
            self.take(target - keeping.len()).await;
        }
        gauge!(PARTITIONS_HELD).set(self.all_held().len() as f64);
    }

    /// Leases that lapsed (not renewed in time, or renewed by nobody) are no longer this
    /// instance's: given back at once (if Redis still has them), so that a new holder (maybe
    /// this instance, under a new epoch) replays what was left pending, in order.
    async fn forget_lapsed(&self) {
        let mut lapsed = Vec::new();
        for slot in &self.held {
            let mut slot = slot.lock();
            if slot.as_ref().is_some_and(|h| !h.lease.is_held())
                && let Some(held) = slot.take()
            {
                tracing::warn!(partition = held.lease.partition, "partition lease lapsed");
                lapsed.push(held);
            }
        }
        if !lapsed.is_empty() {
            self.held_changed();
        }
        let _ =
            futures_util::future::join_all(lapsed.iter().map(|h| self.log.release(&h.lease))).await;
    }

    /// Releases the partitions being given up whose entries are all finished (together: one
    /// round trip, so that renewals are not held up behind them).
    async fn hand_back_released(&self) {
        let mut done = Vec::new();
        for held in self.all_held() {
            if held.lease.is_releasing()
                && held.lease.in_flight() == 0
                && !held.reading.load(Ordering::Acquire)
            {
                if let Some(slot) = self.held.get(usize::from(held.lease.partition)) {
                    slot.lock().take();
                }
                tracing::debug!(partition = held.lease.partition, "partition given back");
                done.push(held);
            }
        }
        if !done.is_empty() {
            self.held_changed();
            // Their last turns' snapshots reach Redis before the next holder can read them
            // (bounded: renewals of the other partitions wait behind this).
            let bound = Duration::from_millis((self.lease_ms / 6).max(50));
            if !self.directory.snapshots_written(bound).await {
                tracing::warn!(
                    "snapshots of partitions being given back not all written yet; their next holder may read older ones"
                );
            }
        }
        let released =
            futures_util::future::join_all(done.iter().map(|held| self.log.release(&held.lease)))
                .await;
        for (held, result) in done.iter().zip(released) {
            if let Err(error) = result {
                tracing::warn!(%error, partition = held.lease.partition, "partition not released; it is free once its lease lapses");
            }
        }
    }

    /// Takes up to `wanted` free partitions, starting at a random one so that instances
    /// starting together do not race for the same.
    async fn take(&self, wanted: usize) {
        let count = self.log.partitions;
        let start = rand::random::<u16>() % count;
        let candidates: Vec<u16> = (0..count)
            .map(|n| ((u32::from(start) + u32::from(n)) % u32::from(count)) as u16)
            .filter(|&p| self.held(p).is_none())
            .collect();
        let free = match self.log.free(&candidates).await {
            Ok(free) => free,
            Err(error) => {
                tracing::warn!(%error, "free partitions cannot be listed");
                return;
            }
        };
        let wanted: Vec<u16> = free.into_iter().take(wanted).collect();
        if wanted.is_empty() {
            return;
        }
        let taken = match self.log.acquire(&self.run, self.lease_ms, &wanted).await {
            Ok(taken) => taken,
            Err(error) => {
                tracing::warn!(%error, "partitions not taken this round");
                return;
            }
        };
        counter!(PARTITION_TAKEOVERS).increment(taken.len() as u64);
        if self.shared.load(Ordering::Acquire) {
            self.budget.taking(taken.len());
        }
        let partitions: Vec<u16> = taken.iter().map(|lease| lease.partition).collect();
        for lease in taken {
            tracing::debug!(partition = lease.partition, lease = %lease.value, "partition taken");
            let partition = lease.partition;
            if let Some(slot) = self.held.get(usize::from(partition)) {
                *slot.lock() = Some(Arc::new(Held {
                    lease,
                    reading: AtomicBool::new(false),
                    again: AtomicBool::new(false),
                }));
            }
        }
        self.held_changed();
        for partition in partitions {
            let _ = self.wakes.send(partition);
        }
    }

    /// Reads the partitions that were woken, and every held one once per [`POLL`].
    async fn read_woken(
        self: Arc<Self>,
        mut woken: mpsc::UnboundedReceiver<u16>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut polls = 0u32;
        loop {
            let partitions: Vec<u16> = tokio::select! {
                Some(partition) = woken.recv() => vec![partition],
                _ = poll.tick() => {
                    polls = polls.wrapping_add(1);
                    let held = self.all_held();
                    if polls.is_multiple_of(SWEEP_EVERY_POLLS) {
                        // A read whose answer was lost (a connection cut under it, then the
                        // command retried on another) left entries delivered to nobody here.
                        for held in &held {
                            held.lease.replay_later();
                        }
                    }
                    held.iter().map(|h| h.lease.partition).collect()
                }
                _ = shutdown.changed() => return,
            };
            for partition in partitions {
                self.read_partition(partition);
            }
        }
    }

    /// Starts a reader of the partition unless one runs (which then reads once more).
    fn read_partition(self: &Arc<Self>, partition: u16) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let Some(held) = self.held(partition) else {
            return;
        };
        held.again.store(true, Ordering::Release);
        if held.reading.swap(true, Ordering::AcqRel) {
            return;
        }
        let owner = Arc::clone(self);
        tokio::spawn(async move {
            while held.again.swap(false, Ordering::AcqRel) {
                if let Err(error) = owner.drain(&held).await {
                    tracing::warn!(%error, partition, "partition not read; retried at the next poll");
                    break;
                }
            }
            held.reading.store(false, Ordering::Release);
        });
    }

    /// Hands a partition's unread entries (after a takeover, first its pending ones) to their
    /// conversations, in stream order.
    async fn drain(self: &Arc<Self>, held: &Held) -> Result<(), StoreError> {
        let lease = &held.lease;
        if lease.take_replay_due() {
            let mut cursor = "0-0".to_owned();
            loop {
                if !self.may_read(lease) {
                    return Ok(());
                }
                let read = self
                    .log
                    .read(lease, &self.run, ReadFrom::Pending(&cursor), READ_BATCH)
                    .await
                    .inspect_err(|_| lease.replay_later())?;
                let Some((next, entries)) = read else {
                    lease.lapse();
                    return Ok(());
                };
                let entries: Vec<StreamEntry> = {
                    let handed_over = lease.handed_over();
                    entries
                        .into_iter()
                        .filter(|e| {
                            parse_id(&e.id).is_none_or(|id| !handed_over.live.contains(&id))
                        })
                        .collect()
                };
                if !entries.is_empty() {
                    counter!(PARTITION_REPLAYED).increment(entries.len() as u64);
                    tracing::info!(
                        partition = lease.partition,
                        count = entries.len(),
                        "replaying what the partition's last holder had not finished"
                    );
                }
                self.hand_over(lease, entries).await;
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        loop {
            if !self.may_read(lease) {
                return Ok(());
            }
            let read = self
                .log
                .read(lease, &self.run, ReadFrom::New, READ_BATCH)
                .await
                .inspect_err(|_| lease.replay_later())?;
            let Some((_, entries)) = read else {
                lease.lapse();
                return Ok(());
            };
            let full = entries.len() == READ_BATCH;
            self.hand_over(lease, entries).await;
            if !full {
                return Ok(());
            }
        }
    }

    fn may_read(&self, lease: &Lease) -> bool {
        lease.is_held() && !lease.is_releasing() && !self.stopping.load(Ordering::Acquire)
    }

    /// Offers each entry to its conversation in order; one that cannot be taken now is offered
    /// again (the ones after it wait) while the partition is still held.
    async fn hand_over(&self, lease: &Arc<Lease>, entries: Vec<StreamEntry>) {
        for entry in entries {
            let id = parse_id(&entry.id).unwrap_or_default();
            loop {
                let (offered, receipt) = {
                    let mut handed_over = lease.handed_over();
                    if handed_over.live.contains(&id) {
                        // Handed over already (by the accepting request, or before a replay).
                        break;
                    }
                    let (offered, receipt) = self.offer(lease, &entry, &mut handed_over);
                    if matches!(offered, Offer::Taken) {
                        handed_over.upto = handed_over.upto.max(id);
                    }
                    (offered, receipt)
                };
                // Dropped only once the lock is released: if the turn is already over, this is
                // the last reference, and the receipt's drop takes the same lock.
                drop(receipt);
                match offered {
                    Offer::Taken => break,
                    Offer::Later if lease.is_held() => tokio::time::sleep(RETRY).await,
                    // Left pending: the partition's next holder replays it.
                    Offer::Later => return,
                }
            }
        }
    }

    /// Hands one entry to its conversation; answers this side's reference to its receipt, for
    /// the caller to drop once `handed_over`'s lock is released.
    fn offer(
        &self,
        lease: &Arc<Lease>,
        entry: &StreamEntry,
        handed_over: &mut HandedOver,
    ) -> (Offer, Option<Arc<StreamReceipt>>) {
        let receipt = Arc::new(StreamReceipt::new(
            Arc::clone(&self.log),
            Arc::clone(lease),
            entry.id.clone(),
        ));
        let activity = match crate::activity::parse_turn(&entry.body) {
            Ok(activity) => Box::new(activity),
            // Appended after the same parse succeeded: only a damaged entry gets here.
            Err(error) => {
                tracing::error!(%error, id = %entry.id, "stream entry cannot be read; dropped");
                finish_later(receipt);
                return (Offer::Taken, None);
            }
        };
        let integration: Arc<str> = entry.integration.as_str().into();
        let admission = self.directory.accept_recorded(
            &integration,
            &entry.conversation_id,
            &entry.activity_id,
            activity,
            Some(Receipt::Stream(Arc::clone(&receipt))),
        );
        match admission {
            Admission::Accepted(_) => {
                receipt.handed_over(handed_over);
                (Offer::Taken, Some(receipt))
            }
            // Not live: its drop (after the finish) takes no lock.
            Admission::Duplicate(_) => {
                finish_later(receipt);
                (Offer::Taken, None)
            }
            Admission::MailboxFull | Admission::Overloaded => (Offer::Later, Some(receipt)),
        }
    }

    /// Subscribes to this instance's wake-up channel (again after an outage).
    async fn listen_for_wakes(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let mut wakes = match self.log.subscribe_wakes(&self.run).await {
                Ok(wakes) => wakes,
                Err(error) => {
                    tracing::warn!(%error, "no wake-ups from other instances yet; partitions are polled");
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    woken = wakes.next() => match woken {
                        Some(partition) => {
                            let _ = self.wakes.send(partition);
                        }
                        None => break,
                    },
                    _ = shutdown.changed() => {
                        wakes.close().await;
                        return;
                    }
                }
            }
        }
    }

    /// At shutdown, once the conversations are drained: stops reading, releases every lease
    /// (the others take the partitions at once, without waiting for expiry) and leaves.
    pub async fn release_all(&self, deadline: Duration) {
        self.stopping.store(true, Ordering::Release);
        let until = crate::clock::now() + deadline;
        for held in self.all_held() {
            held.lease.start_releasing();
        }
        while self
            .all_held()
            .iter()
            .any(|h| h.lease.in_flight() > 0 || h.reading.load(Ordering::Acquire))
            && crate::clock::now() < until
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held = self.all_held();
        for slot in &self.held {
            slot.lock().take();
        }
        self.held_changed();
        let released =
            futures_util::future::join_all(held.iter().map(|h| self.log.release(&h.lease))).await;
        if let Some(Err(error)) = released.into_iter().find(Result::is_err) {
            tracing::warn!(%error, "partitions not released; they are free once their leases lapse");
        }
        gauge!(PARTITIONS_HELD).set(0.0);
        if let Err(error) = self.log.leave(&self.run).await {
            tracing::warn!(%error, "instance not removed from the live set; it ages out");
        }
    }

    /// Stops reading partitions (shutdown begins): what is queued finishes, nothing new starts.
    pub fn stop_reading(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// This instance's share of the partitions: `partitions / n` each, and one more for the first
/// `partitions % n` live instances in run-id order, so that the shares add up exactly.
fn share(partitions: usize, live: &[String], run: &str) -> usize {
    let mut live: Vec<&str> = live.iter().map(String::as_str).collect();
    if !live.contains(&run) {
        live.push(run);
    }
    live.sort_unstable();
    let rank = live.iter().position(|r| *r == run).unwrap_or(0);
    partitions / live.len() + usize::from(rank < partitions % live.len())
}

enum Offer {
    Taken,
    Later,
}

fn finish_later(receipt: Arc<StreamReceipt>) {
    tokio::spawn(async move {
        if let Err(error) = receipt.finish(&[]).await {
            tracing::warn!(%error, "a stream entry stays pending; its partition's next holder sees it again");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up_to_every_partition() {
        let live: Vec<String> = ["b-1", "a-2", "c-3"].map(String::from).to_vec();
        let shares: Vec<usize> = live.iter().map(|run| share(1024, &live, run)).collect();
        assert_eq!(shares.iter().sum::<usize>(), 1024);
        assert!(shares.iter().all(|&s| s == 341 || s == 342), "{shares:?}");
        // Not yet in the live set (its first heartbeat raced): counted anyway.
        assert_eq!(share(10, &["x".into()], "y"), 5);
        assert_eq!(share(10, &[], "y"), 10);
    }
}
