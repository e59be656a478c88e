//! One suite, both stores: the embedded redb file and a real `redis-server` on a free port.

use std::sync::Arc;
use std::time::Duration;

use loadtest::redis::RedisServer;
use teams_router::config::{StorageBackend, StorageConfig};
use teams_router::store::{JournalEntry, Put, Store};

fn scratch(what: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("teams-router-store-{}-{what}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn embedded(what: &str) -> Store {
    let config = StorageConfig {
        path: scratch(what),
        ..StorageConfig::default()
    };
    Store::open(&config, "test")
        .await
        .expect("embedded store opens")
}

async fn redis(server: &RedisServer, instance: &str) -> Store {
    let config = StorageConfig {
        backend: StorageBackend::Redis,
        redis_url: server.url(),
        ..StorageConfig::default()
    };
    Store::open(&config, instance)
        .await
        .expect("redis store connects")
}

fn entry(seq: u64, conversation: &str, activity: &str) -> JournalEntry {
    JournalEntry {
        seq,
        integration: "teams_prod".into(),
        conversation_id: conversation.into(),
        activity_id: activity.into(),
        accepted_at_ms: 1,
        body: format!("{{\"id\":\"{activity}\"}}"),
    }
}

fn put(key: &str, value: &str, ttl: Duration) -> Put {
    Put {
        key: key.into(),
        value: Arc::from(value.as_bytes()),
        ttl,
    }
}

async fn records_round_trip_and_expire(store: &Store) {
    store
        .put_many(vec![
            put("teams-session-i-29:a", "alpha", Duration::from_secs(60)),
            put("teams-session-i-29:b", "beta", Duration::from_millis(300)),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.get("teams-session-i-29:a").await.unwrap().as_deref(),
        Some(&b"alpha"[..])
    );
    assert_eq!(
        store.get("teams-session-i-29:b").await.unwrap().as_deref(),
        Some(&b"beta"[..])
    );
    assert_eq!(store.get("missing").await.unwrap(), None);
    // Overwrite wins.
    store
        .put_many(vec![put(
            "teams-session-i-29:a",
            "alpha2",
            Duration::from_secs(60),
        )])
        .await
        .unwrap();
    assert_eq!(
        store.get("teams-session-i-29:a").await.unwrap().as_deref(),
        Some(&b"alpha2"[..])
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.get("teams-session-i-29:b").await.unwrap(),
        None,
        "expired after its TTL"
    );
    store.sweep_expired().await.unwrap();
    store.delete("teams-session-i-29:a").await.unwrap();
    assert_eq!(store.get("teams-session-i-29:a").await.unwrap(), None);
}

async fn journal_keeps_what_is_not_answered_in_order(store: &Store) {
    let ttl = Duration::from_secs(60);
    let fresh = store
        .append_journal(
            vec![
                entry(3, "c1", "a3"),
                entry(1, "c1", "a1"),
                entry(2, "c2", "a2"),
            ],
            ttl,
        )
        .await
        .unwrap();
    assert_eq!(fresh, vec![true, true, true]);
    store.complete_journal(vec![2]).await.unwrap();
    let pending = store.pending_journal().await.unwrap();
    assert_eq!(
        pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(pending[0], entry(1, "c1", "a1"));
    store.complete_journal(vec![1, 3]).await.unwrap();
    assert!(store.pending_journal().await.unwrap().is_empty());
}

#[tokio::test]
async fn embedded_store() {
    let store = embedded("suite").await;
    records_round_trip_and_expire(&store).await;
    journal_keeps_what_is_not_answered_in_order(&store).await;
}

#[tokio::test]
async fn redis_store() {
    let server = RedisServer::start().expect("redis-server");
    let store = redis(&server, "instance-a").await;
    records_round_trip_and_expire(&store).await;
    journal_keeps_what_is_not_answered_in_order(&store).await;
}

#[tokio::test]
async fn embedded_store_is_durable_across_reopen() {
    let dir = scratch("reopen");
    let config = StorageConfig {
        path: dir.clone(),
        ..StorageConfig::default()
    };
    {
        let store = Store::open(&config, "x").await.unwrap();
        store
            .put_many(vec![put("k", "v", Duration::from_secs(60))])
            .await
            .unwrap();
        store
            .append_journal(vec![entry(7, "c", "a")], Duration::from_secs(1))
            .await
            .unwrap();
    }
    let store = Store::open(&config, "x").await.unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(store.pending_journal().await.unwrap().len(), 1);
}

#[tokio::test]
async fn redis_dedup_is_global_and_journals_are_per_instance() {
    let server = RedisServer::start().expect("redis-server");
    let a = redis(&server, "instance-a").await;
    let b = redis(&server, "instance-b").await;
    let ttl = Duration::from_secs(60);
    assert_eq!(
        a.append_journal(vec![entry(1, "c", "same")], ttl)
            .await
            .unwrap(),
        vec![true]
    );
    // The same activity redelivered to the other instance is a duplicate there.
    assert_eq!(
        b.append_journal(vec![entry(1, "c", "same"), entry(2, "c", "other")], ttl)
            .await
            .unwrap(),
        vec![false, true]
    );
    assert_eq!(a.pending_journal().await.unwrap().len(), 1);
    let b_pending = b.pending_journal().await.unwrap();
    assert_eq!(b_pending.len(), 1, "a duplicate leaves no journal entry");
    assert_eq!(b_pending[0].activity_id, "other");
}

#[tokio::test]
async fn redis_outage_is_an_error_not_a_hang_and_recovers() {
    let mut server = RedisServer::start().expect("redis-server");
    let store = redis(&server, "outage").await;
    store
        .put_many(vec![put("k", "v", Duration::from_secs(60))])
        .await
        .unwrap();
    server.stop();
    let started = std::time::Instant::now();
    assert!(store.get("k").await.is_err());
    assert!(store.ping().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    server.resume().unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        if store.ping().await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the pool reconnects by itself");
    store
        .put_many(vec![put("k2", "v2", Duration::from_secs(60))])
        .await
        .unwrap();
    assert_eq!(store.get("k2").await.unwrap().as_deref(), Some(&b"v2"[..]));
}

/// The finishing script is the only writer of a conversation's snapshots with a shared store:
/// a holder whose lease was taken over writes nothing, its successor writes them with the
/// acknowledgement.
#[tokio::test]
async fn a_stale_holder_acknowledges_and_writes_nothing() {
    use teams_router::store::partitions::{PartitionLog, ReadFrom, SnapshotKind};
    let server = RedisServer::start().expect("redis-server");
    let log = PartitionLog::new(Arc::new(redis(&server, "fencing").await), 4).expect("redis");
    let (integration, conversation) = ("teams_prod", "a:fenced");
    let partition = log.partition_of(integration, conversation);
    let appended = log
        .append(
            "writer",
            Duration::from_secs(60),
            integration,
            conversation,
            "1",
            &bytes::Bytes::from_static(b"{}"),
        )
        .await
        .unwrap()
        .expect("new");
    let first = log.acquire("run-a", 300, &[partition]).await.unwrap();
    let first = first.first().expect("free partition taken");
    let (_, read) = log
        .read(first, "run-a", ReadFrom::New, 10)
        .await
        .unwrap()
        .expect("held");
    assert_eq!(read[0].id, appended.id);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = log.acquire("run-b", 5_000, &[partition]).await.unwrap();
    let second = second.first().expect("an expired lease is free");
    assert_ne!(first.value, second.value, "a new epoch");

    let record = log.snapshot_key(partition, SnapshotKind::Record, integration, conversation);
    let session = log.snapshot_key(partition, SnapshotKind::UserSession, integration, "29:u");
    let stale = [
        put(&record, "stale record", Duration::from_secs(60)),
        put(&session, "stale session", Duration::from_secs(60)),
    ];
    assert!(!log.finish(first, &appended.id, &stale).await.unwrap());
    assert_eq!(log.snapshot(&record).await.unwrap(), None);
    assert_eq!(log.snapshot(&session).await.unwrap(), None);

    let (_, replayed) = log
        .read(second, "run-b", ReadFrom::Pending("0-0"), 10)
        .await
        .unwrap()
        .expect("held");
    assert_eq!(
        replayed[0].id, appended.id,
        "still pending for the new holder"
    );
    let current = [
        put(&record, "record", Duration::from_secs(60)),
        put(&session, "session", Duration::from_secs(60)),
    ];
    assert!(log.finish(second, &appended.id, &current).await.unwrap());
    assert_eq!(
        log.snapshot(&record).await.unwrap().as_deref(),
        Some(&b"record"[..])
    );
    assert_eq!(
        log.snapshot(&session).await.unwrap().as_deref(),
        Some(&b"session"[..])
    );
    let (_, left) = log
        .read(second, "run-b", ReadFrom::Pending("0-0"), 10)
        .await
        .unwrap()
        .expect("held");
    assert!(left.is_empty(), "finished entries leave the stream");
}
