//! Durable state: key/value records with a TTL (sessions and conversation snapshots), the journal
//! of accepted-but-unanswered activities (durable accept), and, with Redis, the global dedup
//! claim. Two implementations behind one type, chosen by `[storage] backend`: an embedded redb
//! file (one process) and Redis through fred (many processes). The store knows nothing of Teams:
//! values are bytes.
//!
//! Nothing here runs on the request path except the durable-accept journal append, which the
//! [`writer::Journal`] batches across concurrent requests (group commit).

pub mod codec;
mod embedded;
pub mod partitions;
mod redis;
pub(crate) mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};

use crate::config::{StorageBackend, StorageConfig};
use crate::telemetry::{STORE_ERRORS, STORE_UP};
pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// Recorded on the master, not confirmed by the replicas asked for: neither lost nor safe,
    /// so neither acknowledged nor run a second time elsewhere.
    #[error("recorded, not yet on enough replicas: {0}")]
    NotReplicated(String),
}

/// An activity acknowledged under durable accept and not yet answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JournalEntry {
    /// Orders entries of one instance; recovery replays in this order.
    pub seq: u64,
    pub integration: String,
    pub conversation_id: String,
    pub activity_id: String,
    pub accepted_at_ms: u64,
    /// The activity as received (UTF-8 JSON, validated before it was journaled).
    pub body: String,
}

/// Where an accepted activity was recorded durably, to be finished once it is answered.
#[derive(Debug, Clone)]
pub enum Receipt {
    /// An entry of the journal (embedded store).
    Journal(u64),
    /// An entry of a partition's stream (shared Redis store).
    Stream(Arc<partitions::StreamReceipt>),
}

/// One key/value write with its time to live.
#[derive(Debug, Clone)]
pub struct Put {
    pub key: String,
    pub value: Arc<[u8]>,
    pub ttl: Duration,
}

pub enum Store {
    Embedded(Arc<EmbeddedStore>),
    Redis(Box<RedisStore>),
}

impl Store {
    pub async fn open(config: &StorageConfig, instance_id: &str) -> Result<Self, StoreError> {
        match config.backend {
            StorageBackend::Embedded => Ok(Self::Embedded(Arc::new(EmbeddedStore::open(
                &config.path,
                config.embedded_cache_bytes,
                !config.durable_accept(),
            )?))),
            StorageBackend::Redis => Ok(Self::Redis(Box::new(
                RedisStore::connect(config, instance_id).await?,
            ))),
        }
    }

    /// The Redis store, when it is one.
    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            Self::Redis(redis) => Some(redis.as_ref()),
            Self::Embedded(_) => None,
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, key) = (Arc::clone(s), key.to_owned());
                blocking(move || s.get(&key)).await
            }
            Self::Redis(s) => s.get(key).await,
        }
    }

    pub async fn put_many(&self, puts: Vec<Put>) -> Result<(), StoreError> {
        self.put_many_with(puts, true).await
    }

    /// [`Store::put_many`]; with `durable` false the embedded store commits without waiting for
    /// the disk (the next durable commit persists it; Redis decides its own persistence).
    pub async fn put_many_with(&self, puts: Vec<Put>, durable: bool) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.put_many(&puts, durable)).await
            }
            Self::Redis(s) => s.put_many(&puts).await,
        }
    }

    /// Changes whenever commits that had not reached the disk may have been dropped (the
    /// embedded file reopened after an I/O error); Redis keeps its own persistence.
    pub fn reopen_count(&self) -> u64 {
        match self {
            Self::Embedded(s) => s.reopen_count(),
            Self::Redis(_) => 0,
        }
    }

    /// Takes or extends the lease `key` for `holder`: false while another holder has it. One
    /// process owns an embedded store, so there it is always this one's.
    pub async fn lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Self::Embedded(_) => Ok(true),
            Self::Redis(s) => s.lease(key, holder, ttl).await,
        }
    }

    /// Takes `key` for `ttl` if nobody (no instance) holds it: true when this call took it.
    pub async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, key) = (Arc::clone(s), key.to_owned());
                blocking(move || s.claim(&key, ttl)).await
            }
            Self::Redis(s) => s.claim(key, ttl).await,
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, key) = (Arc::clone(s), key.to_owned());
                blocking(move || s.delete(&key)).await
            }
            Self::Redis(s) => s.delete(key).await,
        }
    }

    /// Records accepted activities in one write. Returns, per entry, whether it is new: with
    /// Redis an activity already claimed by any instance (`SET NX`) is a duplicate.
    pub async fn append_journal(
        &self,
        entries: Vec<JournalEntry>,
        dedup_ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.append_journal(&entries)).await
            }
            Self::Redis(s) => s.append_journal(&entries, dedup_ttl).await,
        }
    }

    /// Removes answered activities from the journal.
    pub async fn complete_journal(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.complete_journal(&seqs)).await
            }
            Self::Redis(s) => s.complete_journal(&seqs).await,
        }
    }

    /// This instance's accepted-but-unanswered activities, oldest first.
    pub async fn pending_journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let mut entries = match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.pending_journal()).await?
            }
            Self::Redis(s) => s.pending_journal().await?,
        };
        entries.sort_by_key(|e| e.seq);
        Ok(entries)
    }

    /// Drops expired records (Redis expires them itself).
    pub async fn sweep_expired(&self) -> Result<usize, StoreError> {
        match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.sweep_expired()).await
            }
            Self::Redis(_) => Ok(0),
        }
    }

    /// Writes management records of one kind (bots, integrations, contacts, event logs); they
    /// never expire.
    pub async fn put_records(
        &self,
        kind: &str,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, kind) = (Arc::clone(s), kind.to_owned());
                blocking(move || s.put_records(&kind, &records)).await
            }
            Self::Redis(s) => s.put_records(kind, &records).await,
        }
    }

    pub async fn delete_record(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, kind, id) = (Arc::clone(s), kind.to_owned(), id.to_owned());
                blocking(move || s.delete_record(&kind, &id)).await
            }
            Self::Redis(s) => s.delete_record(kind, id).await,
        }
    }

    /// Every record of a kind, as (id, value).
    pub async fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match self {
            Self::Embedded(s) => {
                let (s, kind) = (Arc::clone(s), kind.to_owned());
                blocking(move || s.records(&kind)).await
            }
            Self::Redis(s) => s.records(kind).await,
        }
    }

    /// The records of a kind with these ids, in their order (`None` where there is none): a
    /// page of a large kind read without reading the rest.
    pub async fn records_by_ids(
        &self,
        kind: &str,
        ids: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Self::Embedded(s) => {
                let (s, kind) = (Arc::clone(s), kind.to_owned());
                blocking(move || s.records_by_ids(&kind, &ids)).await
            }
            Self::Redis(s) => s.records_by_ids(kind, &ids).await,
        }
    }

    /// A number that changes with every management write of any instance (shared store only;
    /// a single process has nobody else's changes to pick up).
    pub async fn records_revision(&self) -> Result<u64, StoreError> {
        match self {
            Self::Embedded(_) => Ok(0),
            Self::Redis(s) => s.revision().await,
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Self::Embedded(s) => {
                let s = Arc::clone(s);
                blocking(move || s.ping()).await
            }
            Self::Redis(s) => s.ping().await,
        }
    }
}

/// redb is synchronous: its calls run on the blocking pool, never on a runtime worker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}

/// Every readable record of `kind` (an unreadable one is logged and skipped; a store that
/// cannot be read gives none, and its health says so).
pub async fn load_records<T: serde::de::DeserializeOwned>(
    store: &Store,
    health: &StoreHealth,
    kind: &str,
) -> Vec<(String, T)> {
    match store.records(kind).await {
        Ok(records) => records
            .into_iter()
            .filter_map(|(id, bytes)| match serde_json::from_slice::<T>(&bytes) {
                Ok(record) => Some((id, record)),
                Err(error) => {
                    tracing::warn!(kind, record = %id, %error, "stored record is unreadable; skipped");
                    None
                }
            })
            .collect(),
        Err(error) => {
            health.observe("records", &Err::<(), _>(error.clone()));
            tracing::warn!(kind, %error, "records could not be loaded");
            Vec::new()
        }
    }
}

/// Whether the store answers, tracked from the outcome of real operations; a change is logged
/// once, not per failure.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(true),
        }
    }
}

impl StoreHealth {
    /// Under durable accept: unready while the store cannot record activities.
    pub fn readiness_check(self: &Arc<Self>) -> crate::telemetry::ReadinessCheck {
        let health = Arc::downgrade(self);
        Box::new(move || {
            health.upgrade().filter(|h| !h.is_up()).map(|_| {
                "degraded: the store is unavailable, durable accept cannot be honoured".into()
            })
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn observe<T>(&self, op: &'static str, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::AcqRel) {
                    gauge!(STORE_UP).set(1.0);
                    tracing::info!("store is reachable again");
                }
            }
            Err(error) => {
                counter!(STORE_ERRORS, "op" => op).increment(1);
                if self.up.swap(false, Ordering::AcqRel) {
                    gauge!(STORE_UP).set(0.0);
                    tracing::warn!(%error, op, "store unavailable: serving from memory");
                }
            }
        }
    }
}

pub fn now_ms() -> u64 {
    crate::clock::unix_millis()
}
