//! Conversations in partitions of a shared Redis (many instances): each partition has an inbound
//! stream, a lease with its fencing epoch and the dedup claims of its activities, all under one
//! hash tag so that every script below runs in one slot of a Redis Cluster.
//!
//! Any instance appends (claim + `XADD` in one script, which also wakes the lease holder over
//! pub/sub); the holder reads the stream with a consumer group, and finishes each activity with an
//! `XACK` that only the current lease value may do (a lapsed holder's finish is refused). What a
//! dead holder read and did not finish stays pending in the group until the next holder claims it
//! (`XAUTOCLAIM`): nothing depends on an instance's name surviving. The store knows nothing of
//! Teams: an entry is an integration, a conversation, an activity id and a body.
//!
//! Key layout (`{p}` the partition number; every id part is length-prefixed so that ids
//! containing `:` or `-` cannot collide): `{prefix}:{p<p>}:stream`, `...:lease`, `...:epoch`,
//! `...:dedup:<len>:<integration><len>:<conversation><activity>`. Live instances heartbeat in the
//! sorted set `{prefix}:instances`.

use std::hash::Hasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::scripts::Script;

use super::redis::RedisStore;
use super::{Put, Store, StoreError};

/// The consumer group every instance reads partitions with.
const GROUP: &str = "owners";

/// The partition of a conversation: a stable hash (XXH64, seed 0) of its integration and id, the
/// same in every instance and version.
pub fn partition_of(integration: &str, conversation_id: &str, partitions: u16) -> u16 {
    let mut hash = twox_hash::XxHash64::with_seed(0);
    hash.write(&(integration.len() as u64).to_le_bytes());
    hash.write(integration.as_bytes());
    hash.write(conversation_id.as_bytes());
    (hash.finish() % u64::from(partitions.max(1))) as u16
}

/// Claims the activity, appends it, and tells the lease holder (unless it is the caller) which
/// partition has news. Returns false for a duplicate, else the entry id, the holder's run id
/// ('' when nobody holds the partition) and the id of the entry before it ('' if none is left:
/// finished entries are deleted, so what remains is unread or in flight).
const APPEND: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return false
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local previous = ''
if last[1] then previous = last[1][1] end
local id = redis.call('XADD', KEYS[2], '*', 'i', ARGV[5], 'c', ARGV[6], 'a', ARGV[7], 'b', ARGV[8])
local holder = redis.call('GET', KEYS[3])
local run = ''
if holder then
  run = string.match(holder, '^(.*):%d+$') or ''
  if run ~= '' and run ~= ARGV[2] then redis.call('PUBLISH', ARGV[3] .. run, ARGV[4]) end
end
return {id, run, previous}
";

/// Takes a free partition: a new epoch, the lease `run:epoch`, and the consumer group (from the
/// stream's start, so that entries appended while nobody held it are read).
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. ':' .. epoch
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[3], '0', 'MKSTREAM')
return value
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Reads for the lease holder only: new entries (`>`), or the group's pending ones from a cursor
/// (`XAUTOCLAIM`, whoever read them before). Returns false when the lease is not the caller's,
/// else the next cursor followed by id, integration, conversation, activity, body per entry.
const READ: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local out = {}
local entries
if ARGV[5] == 'new' then
  out[1] = '0-0'
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], '>')
  if not r then return out end
  entries = r[1][2]
else
  local r = redis.call('XAUTOCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[5], 'COUNT', ARGV[4])
  out[1] = r[1]
  entries = r[2]
end
for _, entry in ipairs(entries) do
  local fields = {}
  local raw = entry[2]
  if raw then
    for i = 1, #raw, 2 do fields[raw[i]] = raw[i + 1] end
    table.insert(out, entry[1])
    table.insert(out, fields['i'] or '')
    table.insert(out, fields['c'] or '')
    table.insert(out, fields['a'] or '')
    table.insert(out, fields['b'] or '')
  end
end
return out
";

/// Finishes an entry for the lease holder only (fencing): the conversation's snapshots written
/// (KEYS[3..], each with a value and a time to live in ARGV[4..]), the entry acknowledged and
/// removed. A holder that lost the lease writes nothing.
const FINISH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'PX', ARGV[2 * i - 1])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
";

/// Heartbeat of a live instance; answers the live ones.
const HEARTBEAT: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// One entry of a partition's stream.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub integration: String,
    pub conversation_id: String,
    pub activity_id: String,
    pub body: Bytes,
}

/// A fresh append: its entry id, the run id of the partition's holder ("" if none), and the id
/// of the unfinished entry before it ("" if none).
#[derive(Debug, Clone)]
pub struct Appended {
    pub id: String,
    pub holder: String,
    pub previous: String,
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// The conversation's dedup window and turn sequence.
    Record,
    /// The session of a group chat or channel.
    ConversationSession,
    /// A personal chat's session, the user's.
    UserSession,
}

/// A stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
pub type StreamId = (u64, u64);

pub fn parse_id(id: &str) -> Option<StreamId> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// How far a holder has handed its partition's entries to their conversations: every entry up
/// to `upto` was handed over (or finished), in stream order. `live` holds the entries handed
/// over and not finished (those the accepting request handed over itself among them), which
/// the reader skips when it meets them.
#[derive(Debug, Default)]
pub struct HandedOver {
    pub upto: StreamId,
    pub live: std::collections::HashSet<StreamId>,
}

/// What to read of a partition.
#[derive(Debug, Clone, Copy)]
pub enum ReadFrom<'a> {
    /// Entries nobody has read yet.
    New,
    /// The group's pending entries, from this cursor on (`0-0` first).
    Pending(&'a str),
}

/// One partition held by this instance.
#[derive(Debug)]
pub struct Lease {
    pub partition: u16,
    /// `run:epoch`: what the fencing checks compare.
    pub value: String,
    /// Held until this instant (monotonic, in ms of [`Lease::clock_ms`]); a renewal moves it.
    held_until_ms: AtomicU64,
    /// Entries read and not yet finished or dropped.
    in_flight: AtomicUsize,
    /// Being given up: nothing more is read, and it is released once nothing is in flight.
    releasing: AtomicBool,
    handed_over: parking_lot::Mutex<HandedOver>,
    /// The group's pending entries must be looked at again: at a takeover, and after a read or
    /// an acknowledgement whose outcome is not known (Redis may have run it after the client
    /// gave up, leaving entries delivered to nobody).
    replay_due: AtomicBool,
}

impl Lease {
    pub fn new(partition: u16, value: String, held_until_ms: u64) -> Self {
        Self {
            partition,
            value,
            held_until_ms: AtomicU64::new(held_until_ms),
            in_flight: AtomicUsize::new(0),
            releasing: AtomicBool::new(false),
            handed_over: parking_lot::Mutex::new(HandedOver::default()),
            replay_due: AtomicBool::new(true),
        }
    }

    pub fn take_replay_due(&self) -> bool {
        self.replay_due.swap(false, Ordering::AcqRel)
    }

    pub fn replay_later(&self) {
        self.replay_due.store(true, Ordering::Release);
    }

    /// The partition's hand-over order; held while an entry is handed over.
    pub fn handed_over(&self) -> parking_lot::MutexGuard<'_, HandedOver> {
        self.handed_over.lock()
    }

    /// Milliseconds on the process's monotonic clock (a paused, resumed process sees its lease
    /// lapsed at once, before any renewal runs).
    pub fn clock_ms() -> u64 {
        static START: std::sync::OnceLock<crate::clock::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(crate::clock::now);
        u64::try_from(crate::clock::now().duration_since(start).as_millis()).unwrap_or(u64::MAX)
    }

    /// Still this instance's: turns of its conversations may run and send.
    pub fn is_held(&self) -> bool {
        Self::clock_ms() < self.held_until_ms.load(Ordering::Acquire)
    }

    /// Moves the lease's end, unless it lapsed here meanwhile: turns of the partition may have
    /// been left pending since, and only a new holder (a new epoch, maybe this instance again)
    /// replays them before newer entries, in order.
    pub fn extend_to(&self, held_until_ms: u64) {
        let now = Self::clock_ms();
        let _ = self
            .held_until_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                (until > now && held_until_ms > until).then_some(held_until_ms)
            });
    }

    pub fn lapse(&self) {
        self.held_until_ms.store(0, Ordering::Release);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Acquire)
    }

    pub fn start_releasing(&self) {
        self.releasing.store(true, Ordering::Release);
    }
}

impl std::fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// An entry handed to a conversation: finished (acknowledged) once its turn is answered; dropped
/// unfinished, it stays pending for the partition's next holder.
#[derive(Debug)]
pub struct StreamReceipt {
    log: Arc<PartitionLog>,
    lease: Arc<Lease>,
    id: String,
    /// In the lease's live entries (once handed over): removed when this receipt drops.
    live: AtomicBool,
}

impl StreamReceipt {
    pub fn new(log: Arc<PartitionLog>, lease: Arc<Lease>, id: String) -> Self {
        lease.in_flight.fetch_add(1, Ordering::AcqRel);
        Self {
            log,
            lease,
            id,
            live: AtomicBool::new(false),
        }
    }

    /// Counts it among the partition's live entries (`handed_over` is the lease's, held).
    pub fn handed_over(&self, handed_over: &mut HandedOver) {
        if let Some(id) = parse_id(&self.id) {
            handed_over.live.insert(id);
            self.live.store(true, Ordering::Release);
        }
    }

    pub fn partition(&self) -> u16 {
        self.lease.partition
    }

    /// The lease (`run:epoch`) under which the entry was read.
    pub fn lease_value(&self) -> &str {
        &self.lease.value
    }

    /// Its partition is still this instance's.
    pub fn is_current(&self) -> bool {
        self.lease.is_held()
    }

    /// Its turn was not run: if the partition is still (or again) this instance's, its pending
    /// entries are looked at again.
    pub fn left_pending(&self) {
        self.lease.replay_later();
    }

    /// Acknowledges the entry, writing `snapshots` (keys of [`PartitionLog::snapshot_key`]) in
    /// the same fenced script; false when the lease was lost (another holder will replay it,
    /// and nothing was written).
    pub async fn finish(&self, snapshots: &[Put]) -> Result<bool, StoreError> {
        let finished = self.log.finish(&self.lease, &self.id, snapshots).await;
        if finished.is_err() {
            self.lease.replay_later();
        }
        finished
    }
}

impl Drop for StreamReceipt {
    fn drop(&mut self) {
        // Finished, it is deleted and the reader never meets it; unfinished, the reader hands
        // it over again (the conversation's dedup window drops it if it was answered).
        if self.live.load(Ordering::Acquire)
            && let Some(id) = parse_id(&self.id)
        {
            self.lease.handed_over().live.remove(&id);
        }
        self.lease.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The partitioned inbound log of a shared Redis store.
pub struct PartitionLog {
    store: Arc<Store>,
    prefix: String,
    pub partitions: u16,
    append: Script,
    read: Script,
    finish: Script,
}

fn store_error(e: fred::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn length_prefixed(out: &mut String, part: &str) {
    use std::fmt::Write;
    let _ = write!(out, "{}:{part}", part.len());
}

impl PartitionLog {
    /// `None` unless the store is Redis.
    pub fn new(store: Arc<Store>, partitions: u16) -> Option<Arc<Self>> {
        let prefix = store.redis()?.prefix().to_owned();
        Some(Arc::new(Self {
            store,
            prefix,
            partitions: partitions.max(1),
            append: Script::from_lua(APPEND),
            read: Script::from_lua(READ),
            finish: Script::from_lua(FINISH),
        }))
    }

    fn redis(&self) -> Result<&RedisStore, StoreError> {
        self.store
            .redis()
            .ok_or_else(|| StoreError::Unavailable("not a Redis store".into()))
    }

    fn tag(&self, partition: u16) -> String {
        format!("{}:{{p{partition}}}", self.prefix)
    }

    pub fn stream_key(&self, partition: u16) -> String {
        format!("{}:stream", self.tag(partition))
    }

    pub fn lease_key(&self, partition: u16) -> String {
        format!("{}:lease", self.tag(partition))
    }

    fn epoch_key(&self, partition: u16) -> String {
        format!("{}:epoch", self.tag(partition))
    }

    fn dedup_key(
        &self,
        partition: u16,
        integration: &str,
        conversation: &str,
        activity: &str,
    ) -> String {
        let mut key = format!("{}:dedup:", self.tag(partition));
        length_prefixed(&mut key, integration);
        length_prefixed(&mut key, conversation);
        key.push_str(activity);
        key
    }

    /// Where a conversation's snapshot is stored: in its partition's slot, so that the fenced
    /// finishing script writes it. `owner` is the conversation's id, or the user's for a
    /// personal chat's session; ids with separators cannot collide (length-prefixed).
    pub fn snapshot_key(
        &self,
        partition: u16,
        kind: SnapshotKind,
        integration: &str,
        owner: &str,
    ) -> String {
        format!(
            "{}:{}",
            self.prefix,
            self.snapshot_name(partition, kind, integration, owner)
        )
    }

    /// [`PartitionLog::snapshot_key`] without the store's prefix, as the key/value store's own
    /// methods (and the snapshot writer) take keys.
    pub fn snapshot_name(
        &self,
        partition: u16,
        kind: SnapshotKind,
        integration: &str,
        owner: &str,
    ) -> String {
        let kind = match kind {
            SnapshotKind::Record => "record",
            SnapshotKind::ConversationSession => "session:c",
            SnapshotKind::UserSession => "session:u",
        };
        let mut key = format!("{{p{partition}}}:{kind}:");
        length_prefixed(&mut key, integration);
        length_prefixed(&mut key, owner);
        key
    }

    /// A snapshot stored under [`PartitionLog::snapshot_key`].
    pub async fn snapshot(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value: Option<Bytes> = self.redis()?.client().get(key).await.map_err(store_error)?;
        Ok(value.map(|b| b.to_vec()))
    }

    fn instances_key(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    /// The pub/sub channel that wakes the instance running as `run`.
    pub fn wake_channel(&self, run: &str) -> String {
        format!("{}:wake:{run}", self.prefix)
    }

    pub fn partition_of(&self, integration: &str, conversation_id: &str) -> u16 {
        partition_of(integration, conversation_id, self.partitions)
    }

    /// Claims and appends an activity. `None`: a duplicate (claimed before, by any instance).
    #[allow(clippy::too_many_arguments)]
    pub async fn append(
        &self,
        run: &str,
        dedup_ttl: Duration,
        integration: &str,
        conversation_id: &str,
        activity_id: &str,
        body: &Bytes,
    ) -> Result<Option<Appended>, StoreError> {
        let partition = self.partition_of(integration, conversation_id);
        let keys = vec![
            self.dedup_key(partition, integration, conversation_id, activity_id),
            self.stream_key(partition),
            self.lease_key(partition),
        ];
        let args: Vec<Value> = vec![
            Value::from((dedup_ttl.as_millis() as i64).max(1)),
            run.into(),
            format!("{}:wake:", self.prefix).into(),
            Value::from(i64::from(partition)),
            integration.into(),
            conversation_id.into(),
            activity_id.into(),
            Value::Bytes(body.clone()),
        ];
        let redis = self.redis()?;
        let slot = fred::util::redis_keyslot(keys[1].as_bytes());
        let mut client = redis.append_client();
        let started = crate::clock::now();
        let mut answer = self
            .append
            .evalsha_with_reload::<Value, _, _>(client, keys.clone(), args.clone())
            .await;
        if answer.is_err() && started.elapsed() < Duration::from_millis(50) {
            // Refused at once: that connection of the pool is still reconnecting (after a Redis
            // restart) while another may be up. Once more on the next; a script that did run
            // makes the second a duplicate of it.
            client = redis.append_client();
            answer = self.append.evalsha_with_reload(client, keys, args).await;
        }
        let answer = answer.map_err(store_error)?;
        // Acknowledged only once the replicas asked for have the entry. Refused, the Bot
        // Connector redelivers; the claim makes the copy a duplicate, whose script still writes
        // (the claim's expiry), so that its own wait covers the first copy's entry too.
        redis
            .wait_for_replicas(client, slot)
            .await
            .map_err(|error| StoreError::NotReplicated(error.to_string()))?;
        if answer.is_null() {
            return Ok(None);
        }
        let mut parts = answer.into_array().into_iter();
        let id = parts
            .next()
            .and_then(Value::into_string)
            .unwrap_or_default();
        let holder = parts
            .next()
            .and_then(Value::into_string)
            .unwrap_or_default();
        let previous = parts
            .next()
            .and_then(Value::into_string)
            .unwrap_or_default();
        if id.is_empty() {
            return Err(StoreError::Corrupt("append returned no entry id".into()));
        }
        Ok(Some(Appended {
            id,
            holder,
            previous,
        }))
    }

    /// Tries to take each partition (those held by someone are left); answers the leases taken.
    pub async fn acquire(
        &self,
        run: &str,
        lease_ms: u64,
        partitions: &[u16],
    ) -> Result<Vec<Arc<Lease>>, StoreError> {
        let mut taken = Vec::new();
        let client = self.redis()?.client();
        for chunk in partitions.chunks(256) {
            let started = Lease::clock_ms();
            // Sent together: the client pipelines concurrent commands on its connection.
            let answers = futures_util::future::join_all(chunk.iter().map(|&partition| {
                let keys = vec![
                    self.lease_key(partition),
                    self.epoch_key(partition),
                    self.stream_key(partition),
                ];
                let args: Vec<Value> = vec![run.into(), Value::from(lease_ms as i64), GROUP.into()];
                client.eval::<Value, _, _, _>(ACQUIRE, keys, args)
            }))
            .await;
            for (&partition, answer) in chunk.iter().zip(answers) {
                if let Some(value) = answer.map_err(store_error)?.into_string() {
                    taken.push(Arc::new(Lease::new(
                        partition,
                        value,
                        started + lease_ms * 9 / 10,
                    )));
                }
            }
        }
        Ok(taken)
    }

    /// The partitions nobody holds, of those given.
    pub async fn free(&self, partitions: &[u16]) -> Result<Vec<u16>, StoreError> {
        let mut free = Vec::new();
        for chunk in partitions.chunks(512) {
            let pipeline = self.redis()?.client().pipeline();
            for &partition in chunk {
                let _: () = pipeline
                    .exists(self.lease_key(partition))
                    .await
                    .map_err(store_error)?;
            }
            let answers: Vec<i64> = pipeline.all().await.map_err(store_error)?;
            free.extend(
                chunk
                    .iter()
                    .zip(answers)
                    .filter(|(_, exists)| *exists == 0)
                    .map(|(p, _)| *p),
            );
        }
        Ok(free)
    }

    /// Extends the leases still held; the others are marked lapsed. An error (one lease's
    /// node did not answer) leaves that lease to lapse on time and is told after the others.
    pub async fn renew(&self, leases: &[Arc<Lease>], lease_ms: u64) -> Result<(), StoreError> {
        let client = self.redis()?.client();
        let mut failed = None;
        for chunk in leases.chunks(256) {
            let started = Lease::clock_ms();
            let answers = futures_util::future::join_all(chunk.iter().map(|lease| {
                let args: Vec<Value> =
                    vec![lease.value.as_str().into(), Value::from(lease_ms as i64)];
                client.eval::<i64, _, _, _>(RENEW, vec![self.lease_key(lease.partition)], args)
            }))
            .await;
            for (lease, renewed) in chunk.iter().zip(answers) {
                match renewed {
                    Ok(1) => lease.extend_to(started + lease_ms * 9 / 10),
                    Ok(_) => lease.lapse(),
                    // Not known: it lapses on its own unless a later renewal answers.
                    Err(error) => failed = failed.or(Some(store_error(error))),
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Gives a partition up (only if the lease is still this one).
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        lease.lapse();
        let _: i64 = self
            .redis()?
            .client()
            .eval(
                RELEASE,
                vec![self.lease_key(lease.partition)],
                vec![lease.value.as_str()],
            )
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// Reads a partition for its holder. `None`: the lease is not this one any more. With
    /// [`ReadFrom::Pending`], the cursor to go on from comes back (`0-0` at the end).
    pub async fn read(
        &self,
        lease: &Lease,
        consumer: &str,
        from: ReadFrom<'_>,
        count: usize,
    ) -> Result<Option<(String, Vec<StreamEntry>)>, StoreError> {
        let keys = vec![
            self.lease_key(lease.partition),
            self.stream_key(lease.partition),
        ];
        let mode = match from {
            ReadFrom::New => "new",
            ReadFrom::Pending(cursor) => cursor,
        };
        let args: Vec<Value> = vec![
            lease.value.as_str().into(),
            GROUP.into(),
            consumer.into(),
            Value::from(count.max(1) as i64),
            mode.into(),
        ];
        let answer: Value = self
            .read
            .evalsha_with_reload(self.redis()?.client(), keys, args)
            .await
            .map_err(store_error)?;
        if answer.is_null() {
            return Ok(None);
        }
        let mut parts = answer.into_array().into_iter();
        let cursor = parts
            .next()
            .and_then(Value::into_string)
            .unwrap_or_default();
        let mut entries = Vec::new();
        loop {
            let Some(id) = parts.next() else { break };
            let (Some(integration), Some(conversation), Some(activity), Some(body)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(StoreError::Corrupt("a stream entry is cut short".into()));
            };
            entries.push(StreamEntry {
                id: id.into_string().unwrap_or_default(),
                integration: integration.into_string().unwrap_or_default(),
                conversation_id: conversation.into_string().unwrap_or_default(),
                activity_id: activity.into_string().unwrap_or_default(),
                body: body.into_bytes().unwrap_or_default(),
            });
        }
        Ok(Some((cursor, entries)))
    }

    /// Acknowledges an entry for the lease holder, with the snapshots its turn left; false when
    /// the lease is not this one.
    pub async fn finish(
        &self,
        lease: &Lease,
        id: &str,
        snapshots: &[Put],
    ) -> Result<bool, StoreError> {
        let mut keys = Vec::with_capacity(2 + snapshots.len());
        keys.push(self.lease_key(lease.partition));
        keys.push(self.stream_key(lease.partition));
        let mut args: Vec<Value> = Vec::with_capacity(3 + 2 * snapshots.len());
        args.extend([lease.value.as_str().into(), GROUP.into(), id.into()]);
        for put in snapshots {
            keys.push(put.key.clone());
            args.push(Value::Bytes(Bytes::copy_from_slice(&put.value)));
            args.push(Value::from((put.ttl.as_millis() as i64).max(1)));
        }
        let done: i64 = self
            .finish
            .evalsha_with_reload(self.redis()?.client(), keys, args)
            .await
            .map_err(store_error)?;
        Ok(done == 1)
    }

    /// Says this instance is live (for `lease_ms`); answers the live instances' run ids.
    pub async fn heartbeat(&self, run: &str, lease_ms: u64) -> Result<Vec<String>, StoreError> {
        let now = super::now_ms();
        let args: Vec<Value> = vec![
            run.into(),
            Value::from((now + lease_ms) as i64),
            Value::from(now as i64),
        ];
        let live: Vec<String> = self
            .redis()?
            .client()
            .eval(HEARTBEAT, vec![self.instances_key()], args)
            .await
            .map_err(store_error)?;
        Ok(live)
    }

    /// This instance leaves (at shutdown): the others count without it at once.
    pub async fn leave(&self, run: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .redis()?
            .client()
            .zrem(self.instances_key(), run)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// This instance's wake channel, subscribed: partitions other instances appended to.
    pub async fn subscribe_wakes(&self, run: &str) -> Result<Wakes, StoreError> {
        let subscriber = self.redis()?.subscriber().map_err(store_error)?;
        let _connection = subscriber.init().await.map_err(store_error)?;
        let _resubscribe = subscriber.manage_subscriptions();
        subscriber
            .subscribe(self.wake_channel(run))
            .await
            .map_err(store_error)?;
        let messages = subscriber.message_rx();
        Ok(Wakes {
            subscriber,
            messages,
        })
    }
}

/// Wake-ups sent to this instance (a partition number each).
pub struct Wakes {
    subscriber: fred::clients::SubscriberClient,
    messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
}

impl Wakes {
    /// The next partition woken; `None` once the subscription is gone (subscribe again).
    /// Wake-ups missed while lagging are covered by the holder's polls.
    pub async fn next(&mut self) -> Option<u16> {
        loop {
            match self.messages.recv().await {
                Ok(message) => {
                    if let Some(partition) = message
                        .value
                        .as_string()
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        return Some(partition);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    pub async fn close(self) {
        let _ = self.subscriber.quit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned: the same conversation lands in the same partition in every version.
        assert_eq!(
            partition_of("teams_dev", "a:conversation", 1024),
            partition_of("teams_dev", "a:conversation", 1024)
        );
        let mut counts = vec![0usize; 16];
        for n in 0..16_000 {
            counts[usize::from(partition_of("teams_dev", &format!("conv-{n}"), 16))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (700..1300).contains(&c)),
            "{counts:?}"
        );
        // The integration's length is hashed: ("ab", "c") and ("a", "bc") differ.
        let spread: std::collections::HashSet<u16> = (0..64)
            .map(|n| partition_of(&"a".repeat(n % 8 + 1), &format!("{n}"), 1024))
            .collect();
        assert!(spread.len() > 32);
    }

    #[test]
    fn stream_ids_order_as_redis_orders_them() {
        assert!(parse_id("1700000000000-2") < parse_id("1700000000000-10"));
        assert!(parse_id("999-5") < parse_id("1000-0"));
        assert_eq!(parse_id("nonsense"), None);
    }

    #[test]
    fn ids_with_separators_do_not_collide_in_keys() {
        let mut a = String::new();
        length_prefixed(&mut a, "x:1");
        length_prefixed(&mut a, "2");
        let mut b = String::new();
        length_prefixed(&mut b, "x");
        length_prefixed(&mut b, "1:2");
        assert_ne!(a, b);
    }
}
