//! Criterion benches of the whole path in one process: activity bytes in → verified (cached token)
//! → parsed → routed to its conversation actor → echo turn → reply built and POSTed to the mock
//! Bot Connector on loopback. `one_message_round_trip` is the latency of a lone activity;
//! `burst_over_1000_conversations` the cost per activity when many turns run at once.
//! Figures and the command are in BENCHMARKS.md.

/// The router's own allocator: what the request path allocates is freed on the actors' threads,
/// and glibc's malloc (the default here) spends more on that than the request path itself.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use loadtest::mock::MockMicrosoft;
use serde_json::Value;
use teams_router::app::Router;
use teams_router::config::Config;
use tokio::sync::Notify;

const APP_ID: &str = "bench-app";
const APP_SECRET: &str = "bench-secret";
const CONVERSATIONS: usize = 1000;

fn personal_message() -> Value {
    let path = format!(
        "{}/fixtures/activities/personal-message.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Replies seen at the mock connector.
struct Replies {
    count: AtomicU64,
    arrived: Notify,
}

impl Replies {
    async fn wait_for(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let notified = self.arrived.notified();
            if self.count.load(Ordering::Acquire) >= count || Instant::now() > deadline {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

struct Fixture {
    mock: MockMicrosoft,
    router: Router,
    replies: Arc<Replies>,
    template: Value,
}

async fn setup() -> Fixture {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let replies = Arc::new(Replies {
        count: AtomicU64::new(0),
        arrived: Notify::new(),
    });
    let observer = Arc::clone(&replies);
    mock.observe(
        Some(Arc::new(move |_| {
            observer.count.fetch_add(1, Ordering::AcqRel);
            observer.arrived.notify_waiters();
        })),
        false,
    );
    let state_dir =
        std::env::temp_dir().join(format!("teams-router-bench-e2e-{}", std::process::id()));
    let config = format!(
        r#"
[storage]
path = {state_dir:?}
[microsoft]
openid_metadata_url = "{}"
login_url = "{}"
[connector]
conversation_limits = [[1000, 1000000]]
app_limits = [[1000, 10000000]]
[conversation]
mailbox_capacity = 1000000
idle_timeout_ms = 600000
[[bots]]
id = "echo"
backend = {{ kind = "echo" }}
[[integrations]]
id = "bench"
botId = "echo"
botFrameworkAppId = "{APP_ID}"
botFrameworkAppSecret = "{APP_SECRET}"
"#,
        mock.openid_metadata_url(),
        mock.login_url()
    );
    let config = Config::from_sources(&config, Vec::new()).unwrap();
    let router = Router::build(&config, &|_| None).await.unwrap();
    router.keys.refresh().await.unwrap();
    let mut template = personal_message();
    template["serviceUrl"] = mock.service_url().into();
    Fixture {
        mock,
        router,
        replies,
        template,
    }
}

fn message(template: &Value, conversation: usize, id: u64) -> Bytes {
    let mut a = template.clone();
    a["conversation"]["id"] = format!("a:bench-{conversation}").into();
    a["id"] = format!("{id}").into();
    a["text"] = format!("hello {id}").into();
    Bytes::from(serde_json::to_vec(&a).unwrap())
}

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fixture = runtime.block_on(setup());
    let front = Arc::clone(&fixture.router.front);
    let header = format!("Bearer {}", fixture.mock.token_for(APP_ID));
    let integration = front.integration("bench").unwrap();
    let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let next_id = Arc::new(AtomicU64::new(1));
    let expected = Arc::new(AtomicU64::new(0));

    // Sends `iters` messages from a runtime worker (as request handlers run, so waking an actor
    // costs what it does there) and returns the time until their replies arrived; one at a time
    // waits for each reply before the next activity.
    let time_messages = |iters: u64, one_at_a_time: bool| -> Duration {
        let bodies: Vec<Bytes> = (0..iters)
            .map(|i| {
                message(
                    &fixture.template,
                    i as usize % CONVERSATIONS,
                    next_id.fetch_add(1, Ordering::Relaxed),
                )
            })
            .collect();
        let (front, integration, header, replies, expected) = (
            Arc::clone(&front),
            Arc::clone(&integration),
            header.clone(),
            Arc::clone(&fixture.replies),
            Arc::clone(&expected),
        );
        let task = runtime.spawn(async move {
            let start = Instant::now();
            for body in bodies {
                let verified = front
                    .authenticate(&integration, Some(header.as_bytes()), peer)
                    .await
                    .unwrap();
                front
                    .admit(None, &integration, verified.as_deref(), body)
                    .await
                    .unwrap();
                let want = expected.fetch_add(1, Ordering::Relaxed) + 1;
                if one_at_a_time {
                    replies.wait_for(want).await;
                }
            }
            replies.wait_for(expected.load(Ordering::Relaxed)).await;
            start.elapsed()
        });
        runtime.block_on(task).unwrap()
    };

    // Warm up: token cache, outbound token, connections, and every conversation's actor.
    time_messages(CONVERSATIONS as u64, false);

    let mut group = c.benchmark_group("end_to_end");
    group.bench_function("one_message_round_trip", |b| {
        b.iter_custom(|iters| time_messages(iters, true))
    });
    group.bench_function("burst_over_1000_conversations", |b| {
        b.iter_custom(|iters| time_messages(iters, false))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1)).sample_size(20);
    targets = end_to_end
}
criterion_main!(benches);
