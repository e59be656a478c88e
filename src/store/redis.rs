//! The Redis store (fred): a connection pool with exponential reconnect, centralized, cluster
//! (`storage.redis_cluster_nodes` or a `redis-cluster://` URL) or sentinel (`redis-sentinel://`).
//! Every key lives under `storage.key_prefix`; records and dedup claims carry a TTL, the journal
//! hash of an instance is removed entry by entry as activities are answered.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use super::{JournalEntry, Put, StoreError};
use crate::config::StorageConfig;

/// Record kinds whose changes other instances pick up (see `admin::Admin::run_sync`).
const SYNCED_KINDS: &[&str] = &[
    "bots",
    "integrations",
    "setup",
    "tenant_connections",
    "destinations",
    "broadcasts",
];

pub struct RedisStore {
    pool: Pool,
    /// Appends only, when they wait for replicas: `WAIT` counts the writes sent before it on
    /// its connection, and blocks that connection meanwhile.
    appends: Option<Pool>,
    wait_replicas: u32,
    wait_timeout_ms: u64,
    prefix: String,
    journal_key: String,
    /// What the pool was built from: pub/sub clients are built alike.
    config: Config,
    command_timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn builder(config: Config, command_timeout: Duration) -> Builder {
    let clustered = config.server.is_clustered();
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = command_timeout;
            c.internal_command_timeout = command_timeout;
            if clustered {
                // A failed master's connection is found unresponsive and its slots are looked up
                // again (its replica is promoted) within a command's timeout.
                c.connection_timeout = command_timeout / 2;
                c.internal_command_timeout = command_timeout / 2;
                c.max_command_attempts = 3;
                c.unresponsive = fred::types::config::UnresponsiveConfig {
                    max_timeout: Some(command_timeout / 2),
                    interval: Duration::from_millis(100),
                };
            }
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
    builder
}

fn unavailable(e: fred::error::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    pub async fn connect(config: &StorageConfig, instance_id: &str) -> Result<Self, StoreError> {
        let redis_config = if config.redis_cluster_nodes.is_empty() {
            Config::from_url(&config.redis_url)
                .map_err(|e| StoreError::Unavailable(format!("storage.redis_url: {e}")))?
        } else {
            let mut hosts = Vec::new();
            for node in &config.redis_cluster_nodes {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
                    .ok_or_else(|| {
                        StoreError::Unavailable(format!(
                            "storage.redis_cluster_nodes: {node:?} is not host:port"
                        ))
                    })?;
                hosts.push((host, port));
            }
            Config {
                server: ServerConfig::new_clustered(hosts),
                ..Config::default()
            }
        };
        let command_timeout = Duration::from_millis(config.redis_command_timeout_ms);
        let redis_config = Config {
            // A command issued while disconnected fails at once instead of queueing: the caller
            // decides (degrade, retry later) and the request path never hangs on Redis.
            fail_fast: !redis_config.server.is_clustered(),
            ..redis_config
        };
        let pool = builder(redis_config.clone(), command_timeout)
            .build_pool(config.redis_pool_size.max(1))
            .map_err(unavailable)?;
        let appends = if config.redis_wait_replicas > 0 {
            let appends = builder(redis_config.clone(), command_timeout)
                .build_pool(config.redis_pool_size.max(1))
                .map_err(unavailable)?;
            let _connection_task = appends.init().await.map_err(unavailable)?;
            Some(appends)
        } else {
            None
        };
        // The pool keeps reconnecting in the background; a first failure is reported, not fatal.
        let _connection_task = pool.init().await.map_err(unavailable)?;
        Ok(Self {
            pool,
            prefix: config.key_prefix.clone(),
            journal_key: format!("{}:journal:{instance_id}", config.key_prefix),
            appends,
            wait_replicas: config.redis_wait_replicas,
            wait_timeout_ms: config.redis_wait_timeout_ms,
            config: redis_config,
            command_timeout,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A client of the pool (round robin).
    pub fn client(&self) -> &Client {
        self.pool.next()
    }

    /// The client appends go through (their own connections when they wait for replicas).
    pub fn append_client(&self) -> &Client {
        self.appends
            .as_ref()
            .map_or_else(|| self.pool.next(), Pool::next)
    }

    /// With `storage.redis_wait_replicas`: waits until that many replicas have what `client`
    /// wrote so far to the master of `slot` (the slot of the key just written).
    pub async fn wait_for_replicas(&self, client: &Client, slot: u16) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let confirmed: i64 = client
            .with_options(&fred::types::config::Options {
                cluster_hash: Some(fred::types::ClusterHash::Custom(slot)),
                ..Default::default()
            })
            .wait(i64::from(self.wait_replicas), self.wait_timeout_ms as i64)
            .await
            .map_err(unavailable)?;
        if confirmed < i64::from(self.wait_replicas) {
            return Err(StoreError::Unavailable(format!(
                "{confirmed} of {} replicas confirmed the write within {} ms",
                self.wait_replicas, self.wait_timeout_ms
            )));
        }
        Ok(())
    }

    /// A pub/sub client on the same servers (not connected yet).
    pub fn subscriber(&self) -> Result<fred::clients::SubscriberClient, fred::error::Error> {
        builder(self.config.clone(), self.command_timeout).build_subscriber_client()
    }

    /// The per-instance journals of earlier versions (`{prefix}:journal:<instance>`), each with
    /// its entries: what they acknowledged and did not answer moves to the partitions at start.
    pub async fn legacy_journals(&self) -> Result<Vec<(String, Vec<JournalEntry>)>, StoreError> {
        let pattern = format!("{}:journal:*", self.prefix);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let (next, found): (String, Vec<String>) = self
                .pool
                .next()
                .custom(
                    fred::cmd!("SCAN"),
                    vec![
                        cursor.clone(),
                        "MATCH".into(),
                        pattern.clone(),
                        "COUNT".into(),
                        "1000".into(),
                    ],
                )
                .await
                .map_err(unavailable)?;
            keys.extend(found);
            if next == "0" {
                break;
            }
            cursor = next;
        }
        let mut journals = Vec::new();
        for key in keys {
            let all: std::collections::HashMap<String, String> =
                self.pool.hgetall(&key).await.map_err(unavailable)?;
            let mut entries: Vec<JournalEntry> = all
                .into_values()
                .filter_map(|json| serde_json::from_str(&json).ok())
                .collect();
            entries.sort_by_key(|e| e.seq);
            journals.push((key, entries));
        }
        Ok(journals)
    }

    pub async fn delete_raw(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = self.pool.del(key).await.map_err(unavailable)?;
        Ok(())
    }

    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }

    fn dedup_key(&self, entry: &JournalEntry) -> String {
        format!(
            "{}:dedup:{}:{}:{}",
            self.prefix, entry.integration, entry.conversation_id, entry.activity_id
        )
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value: Option<Bytes> = self.pool.get(self.key(key)).await.map_err(unavailable)?;
        Ok(value.map(|b| b.to_vec()))
    }

    pub async fn put_many(&self, puts: &[Put]) -> Result<(), StoreError> {
        let pipeline = self.pool.next().pipeline();
        for put in puts {
            let ttl_ms = (put.ttl.as_millis() as i64).max(1);
            let _: () = pipeline
                .set(
                    self.key(&put.key),
                    Bytes::copy_from_slice(&put.value),
                    Some(Expiration::PX(ttl_ms)),
                    None,
                    false,
                )
                .await
                .map_err(unavailable)?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        Ok(())
    }

    /// Takes `key` for `holder` or extends it if `holder` has it; false when another has it.
    pub async fn lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        const LEASE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
";
        let held: i64 = self
            .pool
            .next()
            .eval(
                LEASE,
                vec![self.key(key)],
                vec![
                    Value::from(holder),
                    Value::from((ttl.as_millis() as i64).max(1)),
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    /// Takes `key` for `ttl` unless it is taken (`SET NX PX`).
    pub async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        let taken: Option<String> = self
            .pool
            .set(
                self.key(key),
                "1",
                Some(Expiration::PX((ttl.as_millis() as i64).max(1))),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(unavailable)?;
        Ok(taken.is_some())
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = self.pool.del(self.key(key)).await.map_err(unavailable)?;
        Ok(())
    }

    /// Journals first, then claims: a crash in between leaves a journal entry that recovery
    /// replays (and the conversation's dedup window drops if it was answered), never an
    /// acknowledged activity that nobody journaled.
    pub async fn append_journal(
        &self,
        entries: &[JournalEntry],
        dedup_ttl: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.pool.next();
        let mut fields = Vec::with_capacity(entries.len());
        for entry in entries {
            let json =
                serde_json::to_string(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            fields.push((entry.seq.to_string(), json));
        }
        let _: i64 = client
            .hset(&self.journal_key, fields)
            .await
            .map_err(unavailable)?;

        let pipeline = client.pipeline();
        let ttl_ms = (dedup_ttl.as_millis() as i64).max(1);
        for entry in entries {
            let _: () = pipeline
                .set(
                    self.dedup_key(entry),
                    1,
                    Some(Expiration::PX(ttl_ms)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .map_err(unavailable)?;
        }
        let claims: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        let fresh: Vec<bool> = claims.iter().map(|v| !v.is_null()).collect();
        let duplicates: Vec<String> = entries
            .iter()
            .zip(&fresh)
            .filter(|(_, fresh)| !**fresh)
            .map(|(e, _)| e.seq.to_string())
            .collect();
        if !duplicates.is_empty() {
            let _: i64 = client
                .hdel(&self.journal_key, duplicates)
                .await
                .map_err(unavailable)?;
        }
        Ok(fresh)
    }

    pub async fn complete_journal(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = seqs.iter().map(u64::to_string).collect();
        let _: i64 = self
            .pool
            .hdel(&self.journal_key, fields)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn pending_journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let all: std::collections::HashMap<String, String> = self
            .pool
            .hgetall(&self.journal_key)
            .await
            .map_err(unavailable)?;
        let mut entries = Vec::with_capacity(all.len());
        for (field, json) in all {
            match serde_json::from_str::<JournalEntry>(&json) {
                Ok(entry) => entries.push(entry),
                Err(e) => tracing::error!(%field, error = %e, "skipping a corrupt journal entry"),
            }
        }
        Ok(entries)
    }

    fn records_key(&self, kind: &str) -> String {
        format!("{}:records:{kind}", self.prefix)
    }

    fn revision_key(&self) -> String {
        format!("{}:records:revision", self.prefix)
    }

    /// Writes management records; a change of bots or integrations also bumps the revision other
    /// instances poll (contacts and event logs are read where they are written).
    pub async fn put_records(
        &self,
        kind: &str,
        records: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let fields: Vec<(String, Bytes)> = records
            .iter()
            .map(|(id, value)| (id.clone(), Bytes::copy_from_slice(value)))
            .collect();
        let pipeline = self.pool.next().pipeline();
        let _: () = pipeline
            .hset(self.records_key(kind), fields)
            .await
            .map_err(unavailable)?;
        self.finish_record_write(pipeline, kind).await
    }

    pub async fn delete_record(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        let pipeline = self.pool.next().pipeline();
        let _: () = pipeline
            .hdel(self.records_key(kind), id)
            .await
            .map_err(unavailable)?;
        self.finish_record_write(pipeline, kind).await
    }

    /// Sends a record write, with the revision bump when other instances follow that kind.
    async fn finish_record_write(
        &self,
        pipeline: fred::clients::Pipeline<Client>,
        kind: &str,
    ) -> Result<(), StoreError> {
        if SYNCED_KINDS.contains(&kind) {
            let _: () = pipeline
                .incr(self.revision_key())
                .await
                .map_err(unavailable)?;
        }
        let _: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn records(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let all: std::collections::HashMap<String, Bytes> = self
            .pool
            .hgetall(self.records_key(kind))
            .await
            .map_err(unavailable)?;
        Ok(all.into_iter().map(|(k, v)| (k, v.to_vec())).collect())
    }

    pub async fn records_by_ids(
        &self,
        kind: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let values: Vec<Option<Bytes>> = self
            .pool
            .hmget(self.records_key(kind), ids.to_vec())
            .await
            .map_err(unavailable)?;
        Ok(values.into_iter().map(|v| v.map(|b| b.to_vec())).collect())
    }

    pub async fn revision(&self) -> Result<u64, StoreError> {
        let value: Option<u64> = self
            .pool
            .get(self.revision_key())
            .await
            .map_err(unavailable)?;
        Ok(value.unwrap_or(0))
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.pool.ping(None).await.map_err(unavailable)?;
        Ok(())
    }
}
