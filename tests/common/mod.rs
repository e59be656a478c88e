//! Shared by the integration tests: the mock Microsoft side, a router with a config pointing at
//! it (in this process by default, or the binary for what only a process shows), and activities
//! built from the real fixtures.
//!
//! The metrics recorder is process-wide, so a test that asserts a metric's value runs the binary
//! ([`start_process`]): routers of other tests in this process would count into its figures.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use loadtest::mock::MockMicrosoft;
use loadtest::router::RouterProcess;
use serde_json::Value;
use teams_router::testkit::TestRouter;

pub const APP_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const APP_SECRET: &str = "multi-tenant-secret";
pub const SINGLE_APP_ID: &str = "22222222-2222-2222-2222-222222222222";
pub const SINGLE_APP_SECRET: &str = "single-tenant-secret";
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

/// The router binary under test; `TEAMS_ROUTER_BIN` runs the suite against another build (or a
/// wrapper such as a profiler).
pub fn binary() -> PathBuf {
    std::env::var_os("TEAMS_ROUTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_teams-router")))
}

/// A config with three integrations: `teams_prod` (multi-tenant), `teams_single` (single-tenant,
/// tenant [`TENANT`]) and `teams_dev` (development mode); `extra` is appended verbatim.
pub fn config(mock: &MockMicrosoft, extra: &str) -> String {
    config_with_storage(
        mock,
        &format!("[storage]\npath = {:?}\n", scratch_dir("state")),
        extra,
    )
}

/// A directory of its own for each caller (embedded store files never collide between tests).
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "teams-router-test-{}-{what}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    // The master key the router keeps beside its store: one left by an earlier process with
    // the same id must not be taken for this test's.
    let mut key_file = dir.clone().into_os_string();
    key_file.push(".master.key");
    let _ = std::fs::remove_file(key_file);
    dir
}

/// Like [`config`], with the `[storage]` table given.
pub fn config_with_storage(mock: &MockMicrosoft, storage: &str, extra: &str) -> String {
    format!(
        r#"
{storage}

[server]
listen = "127.0.0.1:0"
ops_listen = "127.0.0.1:0"
body_limit_bytes = 65536

[microsoft]
openid_metadata_url = "{metadata}"
login_url = "{login}"

[security]
# The mock webhooks and model servers listen on loopback.
backend_allow = ["127.0.0.0/8"]

[connector]
backoff_base_ms = 20
backoff_max_ms = 200
# Teams' limits (the default) make a 10,000-reply test take minutes; tests/streaming.rs checks them.
conversation_limits = [[1000, 100000]]
app_limits = [[1000, 1000000]]

[[bots]]
id = "echo"
backend = {{ kind = "echo" }}

[[integrations]]
id = "teams_prod"
botId = "echo"
botFrameworkAppId = "{APP_ID}"
botFrameworkAppSecret = "{APP_SECRET}"

[[integrations]]
id = "teams_single"
botId = "echo"
botFrameworkAppId = "{SINGLE_APP_ID}"
botFrameworkAppSecret = "{SINGLE_APP_SECRET}"
tenantId = "{TENANT}"

[[integrations]]
id = "teams_dev"
botId = "echo"
development = true

{extra}
"#,
        metadata = mock.openid_metadata_url(),
        login = mock.login_url(),
    )
}

/// What a test talks to: the router in this process or the binary.
pub trait Endpoint {
    fn addr(&self) -> std::net::SocketAddr;
    fn base_url(&self) -> String;
    fn callback_url(&self, integration: &str) -> String;
    fn ops_url(&self, path: &str) -> String;
}

impl Endpoint for RouterProcess {
    fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
    fn base_url(&self) -> String {
        RouterProcess::base_url(self)
    }
    fn callback_url(&self, integration: &str) -> String {
        RouterProcess::callback_url(self, integration)
    }
    fn ops_url(&self, path: &str) -> String {
        RouterProcess::ops_url(self, path)
    }
}

impl Endpoint for TestRouter {
    fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
    fn base_url(&self) -> String {
        TestRouter::base_url(self)
    }
    fn callback_url(&self, integration: &str) -> String {
        TestRouter::callback_url(self, integration)
    }
    fn ops_url(&self, path: &str) -> String {
        TestRouter::ops_url(self, path)
    }
}

/// A mock with both apps registered.
pub async fn mock() -> MockMicrosoft {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    mock.register_app(SINGLE_APP_ID, SINGLE_APP_SECRET, Some(TENANT));
    mock
}

/// A mock with both apps registered, and a router in this process configured against it.
pub async fn start(extra: &str) -> (MockMicrosoft, TestRouter) {
    let mock = mock().await;
    let router = TestRouter::start(&config(&mock, extra))
        .await
        .expect("router starts");
    (mock, router)
}

/// Like [`start`], with settings given as `TEAMS_ROUTER__SECTION__KEY` overrides (the config's
/// own tables cannot be repeated in `extra`).
pub async fn start_with_env(env: &[(&str, &str)]) -> (MockMicrosoft, TestRouter) {
    let mock = mock().await;
    let router = TestRouter::start_with_env(&config(&mock, ""), env)
        .await
        .expect("router starts");
    (mock, router)
}

/// Like [`start`], with metrics of the router's own (`TestRouter::start_counting`): for a test
/// that asserts metric values, on a current-thread runtime (`#[tokio::test]`).
pub async fn start_counting(extra: &str) -> (MockMicrosoft, TestRouter) {
    let mock = mock().await;
    let router = TestRouter::start_counting(&config(&mock, extra), &[])
        .await
        .expect("router starts");
    (mock, router)
}

/// [`start_counting`] with `TEAMS_ROUTER__SECTION__KEY` overrides.
pub async fn start_counting_with_env(env: &[(&str, &str)]) -> (MockMicrosoft, TestRouter) {
    let mock = mock().await;
    let router = TestRouter::start_counting(&config(&mock, ""), env)
        .await
        .expect("router starts");
    (mock, router)
}

/// Like [`start`], with the router binary in a process of its own: for tests of what only a
/// process shows (signals, exit codes, logs), and for metric values on a multi-thread runtime.
pub async fn start_process(extra: &str) -> (MockMicrosoft, RouterProcess) {
    let mock = mock().await;
    let router = RouterProcess::spawn(&binary(), &config(&mock, extra))
        .await
        .expect("router starts");
    (mock, router)
}

/// [`start_with_env`] with the binary.
pub async fn start_process_with_env(env: &[(&str, &str)]) -> (MockMicrosoft, RouterProcess) {
    let mock = mock().await;
    let router = RouterProcess::spawn_with_env(&binary(), &config(&mock, ""), env)
        .await
        .expect("router starts");
    (mock, router)
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/activities/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The personal-chat message fixture, pointed at the mock's service URL, with the given ids.
pub fn personal_message(mock: &MockMicrosoft, conversation: &str, id: &str, text: &str) -> Value {
    let mut a = fixture("personal-message.json");
    a["serviceUrl"] = mock.service_url().into();
    a["conversation"]["id"] = conversation.into();
    a["id"] = id.into();
    a["text"] = text.into();
    a
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        // The router closes keep-alive connections idle for its header read timeout (10 s);
        // a client must not reuse one that old, or a request can race the close.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, String) {
    let mut request = client.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

pub async fn metrics(router: &(impl Endpoint + ?Sized)) -> String {
    http()
        .get(router.ops_url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body")
}

/// The value of one series (`name{labels}` exactly as rendered, or a bare name).
pub fn metric_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Sum of every series of `name` whose labels contain all of `labels` (`k="v"` pieces).
pub fn metric_sum(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|l| rest.contains(l)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `activities_rejected_total` for one reason.
pub fn rejected(scrape: &str, reason: &str) -> f64 {
    metric_sum(
        scrape,
        "teams_router_activities_rejected_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// The newest events (at most 500) of `integration`'s log, read with the API key `key`.
pub async fn event_list(
    router: &(impl Endpoint + ?Sized),
    integration: &str,
    key: &str,
) -> Vec<Value> {
    let body: Value = http()
        .get(format!(
            "{}/api/v1/integration/teams/{integration}/event/list?take=500",
            router.base_url()
        ))
        .bearer_auth(key)
        .send()
        .await
        .expect("event list")
        .json()
        .await
        .expect("event list is JSON");
    body["items"].as_array().cloned().unwrap_or_default()
}

/// How many replies the mock connector recorded per activity id they answer.
pub fn replies_by_id(mock: &MockMicrosoft) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for reply in mock.activities() {
        if let Some(id) = reply.reply_to_id {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until every one of `ids` has a reply (or `timeout`); returns the counts per id.
pub async fn wait_for_replies(
    mock: &MockMicrosoft,
    ids: &[String],
    timeout: Duration,
) -> std::collections::HashMap<String, usize> {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let counts = replies_by_id(mock);
        if ids.iter().all(|id| counts.contains_key(id)) || tokio::time::Instant::now() > until {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bot `slow` whose echo answer arrives a word every `word_delay_ms`, behind the streaming
/// integration `teams_stream`.
pub fn streaming_bot(word_delay_ms: u64) -> String {
    format!(
        r#"
[[bots]]
id = "slow"
backend = {{ kind = "echo", wordDelayMs = {word_delay_ms} }}

[[integrations]]
id = "teams_stream"
botId = "slow"
botFrameworkAppId = "{APP_ID}"
botFrameworkAppSecret = "{APP_SECRET}"
stream = true
"#
    )
}

/// `TEAMS_ROUTER_LONG=1` (`scripts/test.sh --long`, `.ci/run --long`): the full-size version of
/// a test whose default version is shortened to keep the default suite fast.
pub fn long_mode() -> bool {
    std::env::var_os("TEAMS_ROUTER_LONG").is_some_and(|v| v != "0")
}

/// `short` in the default suite, `long` in long mode.
pub fn sized(short: usize, long: usize) -> usize {
    if long_mode() { long } else { short }
}
