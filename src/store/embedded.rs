//! The embedded store: one redb file under `storage.path`, durable on commit. Values carry their
//! expiry (8 bytes, little-endian milliseconds) in front of the payload; expired records read as
//! absent and are swept in the background.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{JournalEntry, Put, StoreError, now_ms};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// Management records (bots, integrations, contacts, event logs), keyed `{kind}/{id}`; no expiry.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
const FILE_NAME: &str = "teams-router.redb";

pub struct EmbeddedStore {
    /// `None` after a failed reopen; the next operation tries again.
    db: parking_lot::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    cache_bytes: usize,
    /// Set when this process had to use a file of its own (see [`EmbeddedStore::open`]).
    private_file: Option<std::path::PathBuf>,
    /// Times the file was reopened after an I/O error: a reopen drops every commit that had not
    /// reached the disk yet.
    reopened: std::sync::atomic::AtomicU64,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens `dir/teams-router.redb`. The file belongs to one process; when another process
    /// holds it and `allow_private` is set (no durable accept, so nothing acknowledged depends
    /// on the file), this process uses a file of its own, removed when it stops, and says so.
    pub fn open(dir: &Path, cache_bytes: usize, allow_private: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let create = |path: &Path| create(path, cache_bytes);
        let path = dir.join(FILE_NAME);
        let (db, private_file) = match create(&path) {
            Ok(db) => (db, None),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if allow_private => {
                let private = dir.join(format!("teams-router-{}.redb", std::process::id()));
                tracing::warn!(
                    shared = %path.display(),
                    private = %private.display(),
                    "the embedded store is in use by another process; this one keeps its state in a \
                     file of its own, which does not outlive it (give each process its own storage.path)"
                );
                let db = create(&private).map_err(|e| {
                    StoreError::Unavailable(format!("cannot open {}: {e}", private.display()))
                })?;
                (db, Some(private))
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is in use by another process; under durable accept each process needs its \
                     own storage.path",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot open {}: {e}",
                    path.display()
                )));
            }
        };
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(KV).map_err(unavailable)?;
        txn.open_table(JOURNAL).map_err(unavailable)?;
        txn.open_table(RECORDS).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(Self {
            path: private_file.clone().unwrap_or(path),
            db: parking_lot::RwLock::new(Some(db)),
            cache_bytes,
            private_file,
            reopened: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `op` on the database. redb refuses every operation after a failed write (a full
    /// disk, an I/O error) until the file is reopened; the store then reopens it, so that it
    /// serves again as soon as the cause is gone instead of until the process restarts.
    fn with_db<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        {
            let guard = self.db.read();
            if let Some(db) = guard.as_ref() {
                let result = op(db);
                if !matches!(&result, Err(StoreError::Unavailable(m)) if m.contains(POISONED)) {
                    return result;
                }
                drop(guard);
                self.reopen();
                return result;
            }
        }
        self.reopen();
        match self.db.read().as_ref() {
            Some(db) => op(db),
            None => Err(StoreError::Unavailable(format!(
                "{} cannot be reopened",
                self.path.display()
            ))),
        }
    }

    /// See [`EmbeddedStore::reopened`].
    pub fn reopen_count(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::Acquire)
    }

    fn reopen(&self) {
        let mut guard = self.db.write();
        self.reopened
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // The old handle holds the file's lock: it goes first.
        *guard = None;
        match create(&self.path, self.cache_bytes) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "embedded store reopened after an I/O error");
                *guard = Some(db);
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "embedded store cannot be reopened yet");
            }
        }
    }

    /// A write transaction end to end: whether the file takes writes.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(KV).map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(KV).map_err(unavailable)?;
            let Some(value) = table.get(key).map_err(unavailable)? else {
                return Ok(None);
            };
            let bytes = value.value();
            let (expiry, payload) = split_expiry(bytes)?;
            Ok((expiry > now_ms()).then(|| payload.to_vec()))
        })
    }

    /// Writes `puts` in one transaction; `durable` makes its commit (and every earlier one)
    /// reach the disk before it returns, else the commit is persisted by the next durable one.
    pub fn put_many(&self, puts: &[Put], durable: bool) -> Result<(), StoreError> {
        self.with_db(|db| {
            let now = now_ms();
            let mut txn = db.begin_write().map_err(unavailable)?;
            if !durable {
                txn.set_durability(redb::Durability::None)
                    .map_err(unavailable)?;
            }
            {
                let mut table = txn.open_table(KV).map_err(unavailable)?;
                let mut buf = Vec::new();
                for put in puts {
                    buf.clear();
                    let expiry = now.saturating_add(put.ttl.as_millis() as u64);
                    buf.extend_from_slice(&expiry.to_le_bytes());
                    buf.extend_from_slice(&put.value);
                    table
                        .insert(put.key.as_str(), buf.as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
    }

    /// Takes `key` for `ttl` unless it is taken (redb runs one write transaction at a time, so
    /// the look and the write are one step).
    pub fn claim(&self, key: &str, ttl: std::time::Duration) -> Result<bool, StoreError> {
        self.with_db(|db| {
            let now = now_ms();
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(KV).map_err(unavailable)?;
                if let Some(value) = table.get(key).map_err(unavailable)? {
                    let (expiry, _) = split_expiry(value.value())?;
                    if expiry > now {
                        return Ok(false);
                    }
                }
                let expiry = now.saturating_add(ttl.as_millis() as u64);
                table
                    .insert(key, expiry.to_le_bytes().as_slice())
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(true)
        })
    }

    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(KV)
                .map_err(unavailable)?
                .remove(key)
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
    }

    pub fn put_records(&self, kind: &str, records: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(RECORDS).map_err(unavailable)?;
                for (id, value) in records {
                    table
                        .insert(format!("{kind}/{id}").as_str(), value.as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
    }

    pub fn delete_record(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(RECORDS)
                .map_err(unavailable)?
                .remove(format!("{kind}/{id}").as_str())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)
        })
    }

    pub fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            // '0' is the byte after '/': the range holds exactly the keys `{kind}/...`.
            let (start, end) = (format!("{kind}/"), format!("{kind}0"));
            let mut out = Vec::new();
            for item in table
                .range(start.as_str()..end.as_str())
                .map_err(unavailable)?
            {
                let (key, value) = item.map_err(unavailable)?;
                let id = key.value()[start.len()..].to_owned();
                out.push((id, value.value().to_vec()));
            }
            Ok(out)
        })
    }

    pub fn records_by_ids(
        &self,
        kind: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            ids.iter()
                .map(|id| {
                    let value = table
                        .get(format!("{kind}/{id}").as_str())
                        .map_err(unavailable)?;
                    Ok(value.map(|v| v.value().to_vec()))
                })
                .collect()
        })
    }

    /// One process owns the file, so every entry is new; redeliveries are caught by the
    /// conversation's dedup window, which is part of its snapshot.
    pub fn append_journal(&self, entries: &[JournalEntry]) -> Result<Vec<bool>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(JOURNAL).map_err(unavailable)?;
                for entry in entries {
                    let bytes = serde_json::to_vec(entry)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    table
                        .insert(entry.seq, bytes.as_slice())
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)?;
            Ok(vec![true; entries.len()])
        })
    }

    pub fn complete_journal(&self, seqs: &[u64]) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(JOURNAL).map_err(unavailable)?;
                for seq in seqs {
                    table.remove(seq).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
    }

    pub fn pending_journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(JOURNAL).map_err(unavailable)?;
            let mut entries = Vec::new();
            for item in table.iter().map_err(unavailable)? {
                let (_, value) = item.map_err(unavailable)?;
                match serde_json::from_slice::<JournalEntry>(value.value()) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => tracing::error!(error = %e, "skipping a corrupt journal entry"),
                }
            }
            Ok(entries)
        })
    }

    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        self.with_db(|db| {
            let now = now_ms();
            let txn = db.begin_write().map_err(unavailable)?;
            let mut removed = 0;
            {
                let mut table = txn.open_table(KV).map_err(unavailable)?;
                table
                    .retain(|_, value| {
                        let keep = split_expiry(value).map(|(e, _)| e > now).unwrap_or(false);
                        removed += usize::from(!keep);
                        keep
                    })
                    .map_err(unavailable)?;
            }
            txn.commit().map_err(unavailable)?;
            Ok(removed)
        })
    }
}

/// What redb says once a write failed, until the file is reopened.
const POISONED: &str = "Previous I/O error";

fn create(path: &Path, cache_bytes: usize) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
}

fn split_expiry(bytes: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    let (head, payload) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| StoreError::Corrupt("record shorter than its expiry".into()))?;
    Ok((u64::from_le_bytes(*head), payload))
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(private) = &self.private_file {
            let _ = std::fs::remove_file(private);
        }
    }
}
