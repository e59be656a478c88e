//! Durable accept throughput on each store (group commit on), and the snapshot write rate.
//! A plain measurement binary (`cargo bench --bench durable_accept`); figures in BENCHMARKS.md.
//!
//! Activities go through the router's own durable path (`Front::admit`: parse, checks, then on the
//! embedded store the journal append batched with every concurrent request; on Redis the append
//! to the conversation's partition stream, which this instance holds) from many concurrent tasks,
//! as concurrent HTTP requests would; the Redis run uses a real `redis-server` on loopback and
//! counts the commands Redis processed per activity, accept to finished turn.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use loadtest::redis::RedisServer;
use serde_json::Value;
use teams_router::app::Router;
use teams_router::config::Config;
use teams_router::store::Put;

const ACTIVITIES: usize = 40_000;
const CONCURRENCY: usize = 256;
const CONVERSATIONS: usize = 1_000;
const SNAPSHOTS: usize = 20_000;

fn reaction(conversation: usize, id: usize) -> Bytes {
    let path = format!(
        "{}/fixtures/activities/messagereaction-added.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut a: Value =
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("JSON");
    a["conversation"]["id"] = format!("19:durable-{conversation}@thread.tacv2").into();
    a["id"] = format!("{id}").into();
    Bytes::from(serde_json::to_vec(&a).expect("JSON"))
}

async fn measure(label: &str, storage: &str, redis: Option<&RedisServer>) {
    let config = format!(
        "{storage}\n[conversation]\nmailbox_capacity = 100000\n[[bots]]\nid = \"echo\"\nbackend = {{ kind = \"echo\" }}\n\
         [[integrations]]\nid = \"dev\"\nbotId = \"echo\"\ndevelopment = true\n"
    );
    let config = Config::from_sources(&config, Vec::new()).expect("config");
    let router = Router::build(&config, &|_| None).await.expect("router");
    let front = Arc::clone(&router.front);
    // The embedded store journals; with Redis the partitions' streams are the journal.
    let journal = front.journal.clone();
    let commands_before = redis.map(|r| (r.commands_processed(), r.command_calls()));
    let integration = front.integration("dev").expect("integration");
    let bodies: Vec<Bytes> = (0..ACTIVITIES)
        .map(|i| reaction(i % CONVERSATIONS, i))
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(bodies));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (front, journal, integration, queue) = (
                Arc::clone(&front),
                journal.clone(),
                Arc::clone(&integration),
                Arc::clone(&queue),
            );
            tokio::spawn(async move {
                let mut accepted = 0usize;
                loop {
                    let Some(body) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    if front
                        .admit(journal.as_deref(), &integration, None, body)
                        .await
                        .is_ok()
                    {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for worker in workers {
        accepted += worker.await.expect("worker");
    }
    let elapsed = started.elapsed();
    println!(
        "{label}: durable accept of {accepted} activities in {elapsed:.2?} = {:.0} accepted/s ({CONCURRENCY} concurrent)",
        accepted as f64 / elapsed.as_secs_f64()
    );
    if let (Some(redis), Some((before, calls_before))) = (redis, commands_before) {
        // Every turn finished: its entry is acknowledged and deleted from the stream.
        let until = Instant::now() + Duration::from_secs(60);
        while redis.stream_entries(1024) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let turns_done = started.elapsed();
        let commands = redis.commands_processed() - before;
        let calls_after = redis.command_calls();
        let mut calls: Vec<(String, f64)> = calls_after
            .iter()
            .map(|(name, n)| {
                let delta = n - calls_before.get(name).copied().unwrap_or(0);
                (name.clone(), delta as f64 / accepted as f64)
            })
            .filter(|(_, per)| *per >= 0.01)
            .collect();
        calls.sort_by(|a, b| b.1.total_cmp(&a.1));
        let calls: Vec<String> = calls
            .iter()
            .map(|(name, per)| format!("{name} {per:.2}"))
            .collect();
        println!(
            "{label}: every turn finished {turns_done:.2?} after the first accept; Redis ran \
             {:.2} commands per activity, those inside scripts included (accept, turn, finish, \
             with the background of leases and polls); calls per activity: {}",
            commands as f64 / accepted as f64,
            calls.join(", ")
        );
    }

    // Snapshot write rate: distinct keys, written behind in batches.
    let snapshots = Arc::clone(&router.snapshots);
    let value: Arc<[u8]> = Arc::from(vec![b'x'; 600]);
    while snapshots.pending() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    for i in 0..SNAPSHOTS {
        snapshots.save(Put {
            key: format!("bench-snapshot-{i}"),
            value: Arc::clone(&value),
            ttl: Duration::from_secs(600),
        });
    }
    while snapshots.pending() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "{label}: {SNAPSHOTS} snapshots of 600 bytes written in {elapsed:.2?} = {:.0} snapshots/s",
        SNAPSHOTS as f64 / elapsed.as_secs_f64()
    );
    router.drain(Duration::from_secs(30)).await;
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("teams-router-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        measure(
            "embedded (redb, fsync per group commit)",
            &format!("[storage]\npath = {dir:?}\ndurable_accept = true\n"),
            None,
        )
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        match RedisServer::start() {
            Ok(server) => measure(
                "redis (loopback redis-server)",
                &format!(
                    "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\ninstance_id = \"bench\"\n",
                    server.url()
                ),
                Some(&server),
            )
            .await,
            Err(e) => println!("redis: skipped ({e})"),
        }
    });
}
