//! Durable accept throughput on each store (group commit on), and the snapshot write rate.
//! A plain measurement binary (`cargo bench --bench durable_accept`); figures in BENCHMARKS.md.
//!
//! Activities go through the router's own durable path (`Front::admit` with a journal: parse, checks,
//! journal append batched with every concurrent request, enqueue) from many concurrent tasks,
//! as concurrent HTTP requests would; the Redis run uses a real `redis-server` on loopback.

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

async fn measure(label: &str, storage: &str) {
    let config = format!(
        "{storage}\n[conversation]\nmailbox_capacity = 100000\n[[bots]]\nid = \"echo\"\nbackend = {{ kind = \"echo\" }}\n\
         [[integrations]]\nid = \"dev\"\nbotId = \"echo\"\ndevelopment = true\n"
    );
    let config = Config::from_sources(&config, Vec::new()).expect("config");
    let router = Router::build(&config, &|_| None).await.expect("router");
    let front = Arc::clone(&router.front);
    let journal = front.journal.clone().expect("durable accept is on");
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
                Arc::clone(&journal),
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
                        .admit(Some(&journal), &integration, None, body)
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
            )
            .await,
            Err(e) => println!("redis: skipped ({e})"),
        }
    });
}
