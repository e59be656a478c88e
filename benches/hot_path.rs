//! Criterion benches of the hot path: parsing a Teams activity (the request path's one parse,
//! borrowed and copied once, vs a full `serde_json::Value` tree), token verification (verified-token cache hit vs full RS256), routing one activity
//! to a live conversation actor, and the whole verify + parse + route step with a cached token.
//! Figures and the command are in BENCHMARKS.md.

/// The router's own allocator: what the request path allocates is freed on the actors' threads,
/// and glibc's malloc (the default here) spends more on that than the request path itself.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use loadtest::mock::MockMicrosoft;
use serde_json::Value;
use teams_router::activity::{admissible, parse_turn};
use teams_router::app::Router;
use teams_router::config::Config;

const APP_ID: &str = "bench-app";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/activities/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The channel message (mention entity, HTML attachment, escaped strings), compact.
fn teams_message() -> Vec<u8> {
    let value: Value = serde_json::from_slice(&fixture("channel-message-mention.json")).unwrap();
    serde_json::to_vec(&value).unwrap()
}

fn parse(c: &mut Criterion) {
    let body = teams_message();
    let mut group = c.benchmark_group("parse_teams_message");
    // The request path's one parse (borrowed, then the body copied once) and its envelope.
    group.bench_function("turn_activity_and_envelope", |b| {
        b.iter(|| {
            parse_turn(std::hint::black_box(&body))
                .and_then(|a| a.envelope().map(|e| e.conversation_id.len()))
        })
    });
    // The same for the message reaction the routing benches below send.
    let reaction_body = fixture("messagereaction-added.json");
    group.bench_function("reaction_and_envelope", |b| {
        b.iter(|| {
            parse_turn(std::hint::black_box(&reaction_body))
                .and_then(|a| a.envelope().map(|e| e.conversation_id.len()))
        })
    });
    // The nesting bound checked before the parse (one pass over the bytes).
    group.bench_function("nesting_check", |b| {
        b.iter(|| admissible(std::hint::black_box(&body)).is_ok())
    });
    // A whole tree of the same activity, for comparison (what the parse used to build).
    group.bench_function("serde_json_value", |b| {
        b.iter(|| {
            serde_json::from_slice::<Value>(std::hint::black_box(&body)).map(|v| v.is_object())
        })
    });
    group.finish();
}

struct Fixture {
    mock: MockMicrosoft,
    router: Router,
}

async fn setup() -> Fixture {
    let mock = MockMicrosoft::start().await;
    let state_dir = std::env::temp_dir().join(format!("teams-router-bench-{}", std::process::id()));
    let config = format!(
        r#"
[storage]
path = {state_dir:?}
[microsoft]
openid_metadata_url = "{}"
login_url = "{}"
[conversation]
mailbox_capacity = 1000000
idle_timeout_ms = 600000
rest_after_ms = 0
[[bots]]
id = "echo"
backend = {{ kind = "echo" }}
[[integrations]]
id = "bench"
botId = "echo"
botFrameworkAppId = "{APP_ID}"
botFrameworkAppSecret = "unused"
"#,
        mock.openid_metadata_url(),
        mock.login_url()
    );
    let config = Config::from_sources(&config, Vec::new()).unwrap();
    let router = Router::build(&config, &|_| None).await.unwrap();
    router.keys.refresh().await.unwrap();
    Fixture { mock, router }
}

/// Message reactions: routed and run as turns, but answered with nothing, so the bench measures
/// the router and not the mock connector.
fn reaction(mock: &MockMicrosoft, conversation: usize, id: u64) -> Bytes {
    let mut a: Value = serde_json::from_slice(&fixture("messagereaction-added.json")).unwrap();
    a["serviceUrl"] = mock.service_url().into();
    a["conversation"]["id"] = format!("19:bench-{conversation}@thread.tacv2").into();
    a["id"] = format!("{id}").into();
    Bytes::from(serde_json::to_vec(&a).unwrap())
}

fn verify_and_route(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fixture = runtime.block_on(setup());
    let front = std::sync::Arc::clone(&fixture.router.front);
    let token = fixture.mock.token_for(APP_ID);
    let header = format!("Bearer {token}");
    let verifier = std::sync::Arc::clone(front.verifiers.default_verifier());
    runtime
        .block_on(verifier.verify(Some(header.as_bytes()), APP_ID))
        .unwrap();

    let mut group = c.benchmark_group("verify_token");
    group.bench_function("cached", |b| {
        b.to_async(&runtime).iter(|| async {
            verifier
                .verify(Some(header.as_bytes()), APP_ID)
                .await
                .is_ok()
        })
    });
    group.bench_function("full_rs256", |b| {
        b.to_async(&runtime)
            .iter(|| async { verifier.verify_uncached(&token, APP_ID).await.is_ok() })
    });
    group.finish();

    let integration = front.integration("bench").unwrap();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let verified = runtime
        .block_on(front.authenticate(&integration, Some(header.as_bytes()), peer))
        .unwrap();
    let next_id = std::sync::atomic::AtomicU64::new(1);
    const CONVERSATIONS: usize = 1000;
    // Bodies are made before the clock starts; the actors drain between batches, off the clock.
    let batch = |iters: u64| -> Vec<Bytes> {
        (0..iters)
            .map(|i| {
                let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reaction(&fixture.mock, i as usize % CONVERSATIONS, id)
            })
            .collect()
    };
    let drain = |directory: &teams_router::conversation::Directory| {
        let until = Instant::now() + Duration::from_secs(60);
        while directory.pending() > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Warm the conversations so that the bench routes to live actors.
    for body in batch(CONVERSATIONS as u64) {
        runtime
            .block_on(front.admit(None, &integration, verified.as_deref(), body))
            .unwrap();
    }
    drain(&front.directory);

    // The loops run in a task on the runtime, as request handlers do, so that waking an actor
    // costs what it costs in the server (no thread unpark from outside the runtime).
    let mut group = c.benchmark_group("hot_path");
    group.bench_function("parse_and_route_to_live_actor", |b| {
        b.iter_custom(|iters| {
            let bodies = batch(iters);
            let task_front = std::sync::Arc::clone(&front);
            let integration = std::sync::Arc::clone(&integration);
            let verified = verified.clone();
            let task = runtime.spawn(async move {
                let front = task_front;
                let start = Instant::now();
                for body in bodies {
                    let _ = std::hint::black_box(
                        front
                            .admit(None, &integration, verified.as_deref(), body)
                            .await,
                    );
                }
                start.elapsed()
            });
            let elapsed = runtime.block_on(task).unwrap();
            drain(&front.directory);
            elapsed
        })
    });
    group.bench_function("verify_cached_parse_route", |b| {
        b.iter_custom(|iters| {
            let bodies = batch(iters);
            let task_front = std::sync::Arc::clone(&front);
            let integration = std::sync::Arc::clone(&integration);
            let header = header.clone();
            let task = runtime.spawn(async move {
                let front = task_front;
                let start = Instant::now();
                for body in bodies {
                    let verified = front
                        .authenticate(&integration, Some(header.as_bytes()), peer)
                        .await
                        .unwrap();
                    let _ = std::hint::black_box(
                        front
                            .admit(None, &integration, verified.as_deref(), body)
                            .await,
                    );
                }
                start.elapsed()
            });
            let elapsed = runtime.block_on(task).unwrap();
            drain(&front.directory);
            elapsed
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = parse, verify_and_route
}
criterion_main!(benches);
