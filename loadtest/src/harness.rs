//! One load run: open-loop traffic at the scenario's rate (each request's latency counts from the
//! moment it was scheduled, so a slow router cannot slow the load down and hide its own latency),
//! every reply observed at the mock Bot Connector and matched to its activity, and the checks that
//! make a run a test: nothing acknowledged lost, answered twice or answered out of order.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::keys::{SigningKey, connector_claims};
use crate::mock::{ConnectorFault, MockMicrosoft, RecordedActivity};
use crate::report::{Holding, InstanceReport, Report, Sample, Second, Step};
use crate::router::RouterProcess;
use crate::scenario::Scenario;
use crate::traffic::{Conversation, Kind, Mix, Templates, conversations};

/// Latencies are recorded in microseconds, up to an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// The router under load, as the harness sees it.
pub struct Target {
    /// `http://host:port` of the activity listener.
    pub base_url: String,
    /// (integration id, app id) pairs; conversations are spread over them.
    pub integrations: Vec<(String, String)>,
    /// A management API key and the bot to slow down (backend slowdown faults); `None` skips them.
    pub management: Option<(String, String)>,
    /// Any Bot Framework messaging endpoint (one bot): every activity goes there instead of the
    /// router's per-integration callback.
    pub messaging_url: Option<String>,
    /// The endpoint's process, when the harness started it (`--target-cmd`): sampled for CPU and
    /// memory like a spawned router.
    pub pid: Option<u32>,
}

/// A router process the harness started, which it samples and may kill and restart.
pub struct Spawned {
    pub process: RouterProcess,
    pub binary: std::path::PathBuf,
    pub config: String,
    pub env: Vec<(String, String)>,
    /// Its name in the report (and its `storage.instance_id` on Redis).
    pub label: String,
    /// The `[storage]` section it was started with.
    pub storage: String,
    /// The run's own `redis-server`, when it uses one: its command count is reported.
    pub redis_port: Option<u16>,
}

impl Spawned {
    /// Starts the router again with its config and environment (same store and ports).
    pub async fn restart(&mut self) -> Result<(), String> {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.process = RouterProcess::spawn_with_env(&self.binary, &self.config, &env).await?;
        Ok(())
    }
}

/// A router deliveries may go to.
#[derive(Clone)]
struct Endpoint {
    label: Arc<str>,
    base_url: String,
    /// Its ops listener (spawned routers): scraped for the partitions it holds.
    ops_url: Option<String>,
}

/// What one router instance acknowledged.
#[derive(Default)]
struct InstanceStats {
    acked: u64,
    first_ack: Option<f64>,
    last_ack: Option<f64>,
}

/// A message waiting for its reply.
struct Pending {
    conversation: u32,
    seq: u32,
    scheduled: Instant,
    /// When the latest delivery of it was sent: for an answered message, the one the router
    /// admitted (a refused delivery is never answered).
    last_attempt: Instant,
    step: u32,
    acked: bool,
    replies: u32,
}

/// Replies matched to the activities they answer.
#[derive(Default)]
struct Tracker {
    pending: HashMap<Box<str>, Pending>,
    /// Per conversation, the highest sequence number answered so far.
    last_answered: Vec<u32>,
    replies: u64,
    duplicate_replies: u64,
    order_violations: u64,
    unexpected_replies: u64,
    /// Acknowledged messages still without a reply.
    outstanding: u64,
}

#[derive(Default)]
struct Stats {
    ack: Option<Histogram<u64>>,
    e2e: Option<Histogram<u64>>,
    seconds: Vec<SecondStats>,
    steps: Vec<StepStats>,
    statuses: BTreeMap<String, u64>,
    kinds: BTreeMap<&'static str, u64>,
    offered: u64,
    acked: u64,
    refused: u64,
    duplicates_sent: u64,
    duplicates_acked: u64,
    bad_tokens_sent: u64,
    bad_tokens_rejected: u64,
    bad_tokens_accepted: u64,
    invokes_without_body: u64,
    invoke_answers_on_redelivery: u64,
    samples: Vec<Sample>,
    instances: BTreeMap<Arc<str>, InstanceStats>,
    /// Partitions each router held, when it changed (and once a second).
    holdings: Vec<Holding>,
    /// Seconds into the run when a router was killed, and when its replacement was up.
    killed_at: Option<f64>,
    replaced_at: Option<f64>,
}

struct SecondStats {
    sent: u64,
    acked: u64,
    replies: u64,
    errors: u64,
    /// Deliveries the router shed (429 or 503), by when it answered.
    shed: u64,
    ack: Histogram<u64>,
    e2e: Histogram<u64>,
}

struct StepStats {
    rate: f64,
    offered: u64,
    acked: u64,
    refused: u64,
    shed: u64,
    ack: Histogram<u64>,
    e2e: Histogram<u64>,
    admitted_e2e: Histogram<u64>,
    lost: u64,
}

fn histogram(significant: u8) -> Histogram<u64> {
    // Constant, valid bounds (1 ≤ low, 2·low ≤ high, 2 or 3 significant figures).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, significant).expect("valid histogram bounds")
}

impl Stats {
    fn second(&mut self, at: usize) -> &mut SecondStats {
        while self.seconds.len() <= at {
            self.seconds.push(SecondStats {
                sent: 0,
                acked: 0,
                replies: 0,
                errors: 0,
                shed: 0,
                ack: histogram(2),
                e2e: histogram(2),
            });
        }
        &mut self.seconds[at]
    }

    fn step(&mut self, at: usize, rate: f64) -> &mut StepStats {
        while self.steps.len() <= at {
            self.steps.push(StepStats {
                rate,
                offered: 0,
                acked: 0,
                refused: 0,
                shed: 0,
                ack: histogram(3),
                e2e: histogram(3),
                admitted_e2e: histogram(3),
                lost: 0,
            });
        }
        &mut self.steps[at]
    }
}

/// What one run shares between its tasks.
struct Run {
    scenario: Scenario,
    started: Instant,
    /// The wall clock at `started`: activities carry their scheduled time as Teams' `timestamp`.
    started_wall: std::time::SystemTime,
    run_id: String,
    client: reqwest::Client,
    target: Target,
    /// The routers deliveries go to (a killed one is taken out, its replacement put in).
    live: ArcSwap<Vec<Endpoint>>,
    /// The router processes sampled for CPU and memory.
    pids: Mutex<Vec<u64>>,
    templates: Templates,
    conversations: Vec<Conversation>,
    /// Per conversation: held while an activity of it is in flight (so acknowledgements, and
    /// with them replies, have a defined order); the value counts the activities sent in it.
    sequencers: Vec<tokio::sync::Mutex<u32>>,
    tokens: ArcSwap<Vec<String>>,
    forged: SigningKey,
    mock: MockMicrosoft,
    next_id: AtomicU64,
    tracker: Mutex<Tracker>,
    stats: Mutex<Stats>,
    /// Sending stops early (ramp past the knee).
    stop: AtomicBool,
    /// Requests give up redelivering after this instant.
    give_up_at: Instant,
}

/// A request's fate after its redeliveries.
enum Outcome {
    Acked { status: u16, body: Bytes },
    Refused,
}

impl Run {
    fn elapsed_secs(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.started).as_secs() as usize
    }

    fn token(&self, integration: usize) -> String {
        self.tokens
            .load()
            .get(integration)
            .cloned()
            .unwrap_or_default()
    }

    fn sign_tokens(&self) {
        let service_url = self.mock.service_url();
        let key = self.mock.signing_key();
        let tokens = self
            .target
            .integrations
            .iter()
            .map(|(_, app)| key.sign(&connector_claims(app, &service_url)))
            .collect();
        self.tokens.store(Arc::new(tokens));
    }

    /// A live router, at random (as a load balancer spreads deliveries), and the URL of
    /// `integration`'s callback on it; `None` while no router is up.
    fn url(&self, integration: usize) -> Option<(String, Arc<str>)> {
        let live = self.live.load();
        let endpoint = match live.len() {
            0 => return None,
            1 => &live[0],
            n => &live[rand::rng().random_range(0..n)],
        };
        if let Some(url) = &self.target.messaging_url {
            return Some((url.clone(), Arc::clone(&endpoint.label)));
        }
        let id = self
            .target
            .integrations
            .get(integration)
            .map(|(id, _)| id.as_str())
            .unwrap_or_default();
        Some((
            format!(
                "{}/api/v1/integration/teams/{id}/callback",
                endpoint.base_url
            ),
            Arc::clone(&endpoint.label),
        ))
    }

    fn count_status(&self, status: &str) {
        *self
            .stats
            .lock()
            .statuses
            .entry(status.to_owned())
            .or_default() += 1;
    }

    /// One POST; the status (or the transport error) is counted.
    async fn post(&self, url: &str, token: &str, body: &Bytes) -> Result<(u16, Bytes, u64), ()> {
        let response = self
            .client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let body = response.bytes().await.unwrap_or_default();
                self.count_status(&status.to_string());
                Ok((status, body, retry_after))
            }
            Err(e) => {
                self.count_status(if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect_error"
                } else {
                    "transport_error"
                });
                Err(())
            }
        }
    }

    /// POSTs activity `id` of `plan` until acknowledged, redelivering after transport errors,
    /// 429 and 5xx as the Bot Connector does; gives up after `max_attempts` or at the run's
    /// deadline.
    async fn deliver(&self, plan: &Plan, id: &str, body: &Bytes) -> Outcome {
        let integration = self.conversations[plan.conversation].integration;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=self.scenario.max_attempts {
            let token = self.token(integration);
            if let Some(pending) = self.tracker.lock().pending.get_mut(id) {
                pending.last_attempt = Instant::now();
            }
            // Each attempt picks a router anew: a redelivery after a router died goes elsewhere.
            let (answer, instance) = match self.url(integration) {
                Some((url, instance)) => (self.post(&url, &token, body).await, Some(instance)),
                None => (Err(()), None),
            };
            if let Ok((429 | 503, _, _)) = answer {
                let mut stats = self.stats.lock();
                let now = self.elapsed_secs(Instant::now());
                stats.second(now).shed += 1;
                stats.step(plan.step, plan.rate).shed += 1;
            }
            let wait = match answer {
                Ok((status, body, _)) if (200..300).contains(&status) => {
                    if let Some(instance) = instance {
                        let t = Instant::now().duration_since(self.started).as_secs_f64();
                        let mut stats = self.stats.lock();
                        let counted = stats.instances.entry(instance).or_default();
                        counted.acked += 1;
                        counted.first_ack.get_or_insert(t);
                        counted.last_ack = Some(t);
                    }
                    return Outcome::Acked { status, body };
                }
                Ok((429 | 503, _, retry_after)) if retry_after > 0 => {
                    Duration::from_secs(retry_after.min(2))
                }
                Ok((status, _, _)) if status == 429 || status >= 500 => backoff,
                Ok(_) => return Outcome::Refused,
                Err(()) => backoff,
            };
            if attempt == self.scenario.max_attempts || Instant::now() + wait > self.give_up_at {
                break;
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        Outcome::Refused
    }

    fn next_id(&self) -> String {
        format!(
            "lt{}-{}",
            self.run_id,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A request with a token no published key signed: it must be refused with 401.
    async fn send_forged(&self, conversation: usize) {
        let c = &self.conversations[conversation];
        let id = self.next_id();
        let activity = self.templates.build(Kind::Message, c, &id, "forged");
        let body = Bytes::from(activity.to_string());
        let app = self
            .target
            .integrations
            .get(c.integration)
            .map(|(_, app)| app.as_str())
            .unwrap_or_default();
        let token = self
            .forged
            .sign(&connector_claims(app, &self.mock.service_url()));
        let Some((url, _)) = self.url(c.integration) else {
            return;
        };
        let result = self.post(&url, &token, &body).await;
        let mut stats = self.stats.lock();
        stats.bad_tokens_sent += 1;
        match result {
            Ok((401, _, _)) => stats.bad_tokens_rejected += 1,
            Ok((status, _, _)) if (200..300).contains(&status) => stats.bad_tokens_accepted += 1,
            _ => {}
        }
    }

    /// One scheduled activity: waits for its conversation's previous one, sends, redelivers as
    /// needed, and sends its scheduled duplicate.
    async fn send(&self, plan: Plan) {
        let c = &self.conversations[plan.conversation];
        let mut sequencer = self.sequencers[plan.conversation].lock().await;
        *sequencer += 1;
        let seq = *sequencer;
        let id = self.next_id();
        let text = format!("c{} n{seq}", plan.conversation);
        let mut activity = self.templates.build(plan.kind, c, &id, &text);
        // When the user sent it, as Teams stamps it: a delivery held back in the sender (its
        // conversation's previous one not yet acknowledged) arrives that much older.
        let sent = self.started_wall + plan.scheduled.saturating_duration_since(self.started);
        activity["timestamp"] = humantime::format_rfc3339_micros(sent).to_string().into();
        let body = Bytes::from(activity.to_string());
        if plan.kind == Kind::Message {
            self.tracker.lock().pending.insert(
                id.clone().into_boxed_str(),
                Pending {
                    conversation: plan.conversation as u32,
                    seq,
                    scheduled: plan.scheduled,
                    last_attempt: plan.scheduled,
                    step: plan.step as u32,
                    acked: false,
                    replies: 0,
                },
            );
        }
        let concurrent = match plan.duplicate {
            Some(Duplicate::Concurrent) => Some(async {
                let outcome = self.deliver(&plan, &id, &body).await;
                self.count_duplicate(&outcome);
                outcome
            }),
            _ => None,
        };
        let original = self.deliver(&plan, &id, &body);
        let outcome = match concurrent {
            Some(duplicate) => {
                let (original, duplicate) = futures_util::future::join(original, duplicate).await;
                // Whichever of two concurrent deliveries the router took first carries the
                // invoke's answer; the other is acknowledged as a redelivery, without one.
                match (&original, &duplicate) {
                    (Outcome::Acked { body, .. }, Outcome::Acked { body: answer, .. })
                        if plan.kind == Kind::Invoke && body.is_empty() && !answer.is_empty() =>
                    {
                        self.stats.lock().invoke_answers_on_redelivery += 1;
                        duplicate
                    }
                    _ => original,
                }
            }
            None => original.await,
        };
        self.record(&plan, &id, &outcome);
        if matches!(plan.duplicate, Some(Duplicate::After)) {
            let duplicate = self.deliver(&plan, &id, &body).await;
            self.count_duplicate(&duplicate);
        }
        drop(sequencer);
    }

    fn count_duplicate(&self, outcome: &Outcome) {
        let mut stats = self.stats.lock();
        stats.duplicates_sent += 1;
        if matches!(outcome, Outcome::Acked { .. }) {
            stats.duplicates_acked += 1;
        }
    }

    fn record(&self, plan: &Plan, id: &str, outcome: &Outcome) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(plan.scheduled).as_micros() as u64;
        let acked = matches!(outcome, Outcome::Acked { .. });
        if plan.kind == Kind::Message {
            let mut tracker = self.tracker.lock();
            if acked {
                let answered = tracker.pending.get_mut(id).map(|p| {
                    p.acked = true;
                    p.replies > 0
                });
                if answered == Some(false) {
                    tracker.outstanding += 1;
                }
            } else {
                tracker.pending.remove(id);
            }
        }
        let mut stats = self.stats.lock();
        let at = self.elapsed_secs(plan.scheduled);
        *stats.kinds.entry(plan.kind.label()).or_default() += 1;
        if let Outcome::Acked { status, body } = outcome {
            stats.acked += 1;
            if plan.kind == Kind::Invoke && (*status != 200 || body.is_empty()) {
                stats.invokes_without_body += 1;
            }
            let ack = stats.ack.get_or_insert_with(|| histogram(3));
            ack.saturating_record(latency);
            let second = stats.second(at);
            second.ack.saturating_record(latency);
            stats.second(self.elapsed_secs(now)).acked += 1;
            let step = stats.step(plan.step, plan.rate);
            step.acked += 1;
            step.ack.saturating_record(latency);
        } else {
            stats.refused += 1;
            stats.second(self.elapsed_secs(now)).errors += 1;
            stats.step(plan.step, plan.rate).refused += 1;
        }
    }

    /// A reply at the mock connector: matched to its activity by the id it answers.
    fn observe(&self, activity: &RecordedActivity) {
        if activity.method != "POST" || activity.kind() != "message" {
            return;
        }
        let now = activity.received_at.into_std();
        let mut tracker = self.tracker.lock();
        tracker.replies += 1;
        let Some(pending) = activity
            .reply_to_id
            .as_deref()
            .and_then(|id| tracker.pending.get_mut(id))
        else {
            tracker.unexpected_replies += 1;
            return;
        };
        pending.replies += 1;
        if pending.replies > 1 {
            tracker.duplicate_replies += 1;
            return;
        }
        let (conversation, seq, scheduled, last_attempt, step, acked) = (
            pending.conversation as usize,
            pending.seq,
            pending.scheduled,
            pending.last_attempt,
            pending.step as usize,
            pending.acked,
        );
        if acked {
            tracker.outstanding = tracker.outstanding.saturating_sub(1);
        }
        let state = &mut *tracker;
        if let Some(last) = state.last_answered.get_mut(conversation) {
            if *last > seq {
                state.order_violations += 1;
            }
            *last = (*last).max(seq);
        }
        drop(tracker);
        let latency = now.saturating_duration_since(scheduled).as_micros() as u64;
        let mut stats = self.stats.lock();
        stats
            .e2e
            .get_or_insert_with(|| histogram(3))
            .saturating_record(latency);
        stats
            .second(self.elapsed_secs(scheduled))
            .e2e
            .saturating_record(latency);
        stats.second(self.elapsed_secs(now)).replies += 1;
        if let Some(step) = stats.steps.get_mut(step) {
            step.e2e.saturating_record(latency);
            step.admitted_e2e
                .saturating_record(now.saturating_duration_since(last_attempt).as_micros() as u64);
        }
    }
}

#[derive(Clone, Copy)]
enum Duplicate {
    Concurrent,
    After,
}

#[derive(Clone, Copy)]
struct Plan {
    conversation: usize,
    kind: Kind,
    duplicate: Option<Duplicate>,
    scheduled: Instant,
    step: usize,
    rate: f64,
}

/// Runs `scenario` against `target` (whose Microsoft side is `mock`); `spawned` is the router
/// process when the harness started it (sampled, and killed for failover).
pub async fn run(
    scenario: &Scenario,
    mock: &MockMicrosoft,
    target: Target,
    spawned: Vec<Spawned>,
    show_progress: bool,
) -> Result<Report, String> {
    let live: Vec<Endpoint> = if spawned.is_empty() {
        vec![Endpoint {
            label: "target".into(),
            base_url: target.base_url.clone(),
            ops_url: None,
        }]
    } else {
        spawned.iter().map(endpoint_of).collect()
    };
    let pids: Vec<u64> = if spawned.is_empty() {
        target.pid.map(u64::from).into_iter().collect()
    } else {
        spawned
            .iter()
            .filter_map(|s| s.process.pid())
            .map(u64::from)
            .collect()
    };
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let conversations = conversations(scenario, &run_id);
    let templates = Templates::new(&mock.service_url())?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(scenario.max_in_flight)
        // The router closes keep-alive connections idle for its header read timeout (10 s).
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let (started, started_wall) = (Instant::now(), std::time::SystemTime::now());
    let send_secs = scenario.send_secs();
    let forged_kid = mock.signing_key().kid.clone();
    let forged =
        tokio::task::spawn_blocking(move || SigningKey::generate(&forged_kid, &["msteams"]))
            .await
            .map_err(|e| format!("forged key: {e}"))?;
    let run = Arc::new(Run {
        scenario: scenario.clone(),
        started,
        started_wall,
        run_id,
        client,
        templates,
        sequencers: (0..conversations.len())
            .map(|_| tokio::sync::Mutex::new(0))
            .collect(),
        tracker: Mutex::new(Tracker {
            last_answered: vec![0; conversations.len()],
            ..Tracker::default()
        }),
        conversations,
        target,
        live: ArcSwap::from_pointee(live),
        pids: Mutex::new(pids),
        tokens: ArcSwap::from_pointee(Vec::new()),
        forged,
        mock: mock.clone(),
        next_id: AtomicU64::new(1),
        stats: Mutex::new(Stats::default()),
        stop: AtomicBool::new(false),
        give_up_at: started + Duration::from_secs_f64(send_secs + scenario.drain_secs),
    });
    run.sign_tokens();
    {
        let observer = Arc::clone(&run);
        mock.observe(Some(Arc::new(move |a| observer.observe(a))), false);
    }
    if scenario.connector.latency_ms > 0 {
        mock.set_connector_latency(Duration::from_millis(scenario.connector.latency_ms));
    }
    mock.enforce_teams_limits(scenario.connector.teams_limits);

    let redis_port = spawned.first().and_then(|s| s.redis_port);
    let commands_before = redis_port.map(crate::redis::commands_processed);
    let spawned = Arc::new(tokio::sync::Mutex::new(spawned));
    let mut background = Vec::new();
    background.push(tokio::spawn(sample_process(Arc::clone(&run))));
    background.push(tokio::spawn(refresh_tokens(Arc::clone(&run))));
    if scenario.router.storage == "redis" {
        background.push(tokio::spawn(watch_partitions(Arc::clone(&run))));
    }
    background.extend(schedule_faults(&run, &spawned));
    let progress = Progress::start(Arc::clone(&run), show_progress, send_secs);
    if let Some(ramp) = &scenario.ramp {
        background.push(tokio::spawn(watch_ramp(
            Arc::clone(&run),
            ramp.stop_backlog_secs,
            ramp.e2e_p99_ms,
        )));
    }

    let saturated = send_open_loop(&run).await;
    // Replies may still come: wait for every acknowledged message, up to the drain time.
    let drain_until = Instant::now() + Duration::from_secs_f64(scenario.drain_secs);
    loop {
        let waiting = {
            let tracker = run.tracker.lock();
            tracker.pending.values().any(|p| p.replies == 0)
        };
        if !waiting || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A late second answer would still show up: give it a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for task in &background {
        task.abort();
    }
    progress.finish();
    mock.observe(None, true);
    let router_logs = {
        let spawned = spawned.lock().await;
        match spawned.as_slice() {
            [one] => one.process.logs(),
            several => several
                .iter()
                .map(|s| format!("==> {} <==\n{}", s.label, s.process.logs()))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    };
    let mut report = build_report(&run, saturated, router_logs);
    if let (Some(port), Some(before)) = (redis_port, commands_before) {
        let commands = crate::redis::commands_processed(port).saturating_sub(before);
        report.redis_commands_per_activity = Some(commands as f64 / report.acked.max(1) as f64);
    }
    Ok(report)
}

/// Sends until the scenario's time is up (or the ramp stops); returns whether the harness itself
/// fell more than a second behind its schedule.
async fn send_open_loop(run: &Arc<Run>) -> bool {
    let scenario = &run.scenario;
    let send_secs = scenario.send_secs();
    let mix = Mix::new(scenario);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let in_flight = Arc::new(Semaphore::new(scenario.max_in_flight));
    let mut scheduled = run.started;
    let mut saturated = false;
    loop {
        let elapsed = scheduled.duration_since(run.started).as_secs_f64();
        if elapsed >= send_secs || run.stop.load(Ordering::Relaxed) {
            break;
        }
        let (rate, step) = scenario.rate_at(elapsed);
        if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled.into()).await;
        } else if Instant::now().duration_since(scheduled) > Duration::from_secs(1) {
            saturated = true;
        }
        let conversation = mix.conversation(&mut rng);
        let forged = rng.random::<f64>() < scenario.bad_tokens;
        let plan = Plan {
            conversation,
            kind: mix.kind(&mut rng),
            duplicate: (rng.random::<f64>() < scenario.duplicates).then(|| {
                if rng.random::<f64>() < scenario.concurrent_duplicates {
                    Duplicate::Concurrent
                } else {
                    Duplicate::After
                }
            }),
            scheduled,
            step,
            rate,
        };
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        {
            let mut stats = run.stats.lock();
            if !forged {
                stats.offered += 1;
                stats.step(step, rate).offered += 1;
            }
            let at = run.elapsed_secs(scheduled);
            stats.second(at).sent += 1;
        }
        let run = Arc::clone(run);
        tokio::spawn(async move {
            if forged {
                run.send_forged(plan.conversation).await;
            } else {
                run.send(plan).await;
            }
            drop(permit);
        });
        scheduled += Duration::from_secs_f64(1.0 / rate);
    }
    // Every request finishes (acknowledged or given up) before the drain starts.
    let _ = in_flight
        .acquire_many(scenario.max_in_flight as u32)
        .await
        .map(|p| p.forget());
    saturated
}

/// Re-signs the tokens on schedule, and rotates Microsoft's signing key when the scenario asks.
async fn refresh_tokens(run: Arc<Run>) {
    let refresh = Duration::from_secs_f64(run.scenario.token_refresh_secs);
    let rotation = (run.scenario.key_rotation_secs > 0.0)
        .then(|| Duration::from_secs_f64(run.scenario.key_rotation_secs));
    let mut last_rotation = Instant::now();
    let mut generation = 1;
    loop {
        tokio::time::sleep(refresh.min(rotation.unwrap_or(refresh))).await;
        if let Some(rotation) = rotation
            && last_rotation.elapsed() >= rotation
        {
            generation += 1;
            let kid = format!("loadtest-key-{generation}");
            if let Ok(key) =
                tokio::task::spawn_blocking(move || SigningKey::generate(&kid, &["msteams"])).await
            {
                run.mock.rotate_to(Arc::new(key));
            }
            last_rotation = Instant::now();
        }
        run.sign_tokens();
    }
}

/// Connector faults, backend slowdowns and the router kill, at their times in the run.
fn schedule_faults(
    run: &Arc<Run>,
    spawned: &Arc<tokio::sync::Mutex<Vec<Spawned>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let scenario = &run.scenario;
    let mut tasks = Vec::new();
    let at = |secs: f64| run.started + Duration::from_secs_f64(secs.clamp(0.0, 1e7));
    let connector = &scenario.connector;
    if connector.fault_every > 0 {
        let (start, end) = (
            at(connector.fault_from_secs),
            at(connector.fault_until_secs),
        );
        let fault = match connector.fault_status {
            429 => ConnectorFault::Throttle {
                retry_after_secs: 1,
            },
            status => ConnectorFault::Status(status),
        };
        let (mock, every) = (run.mock.clone(), connector.fault_every);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            mock.set_periodic_fault(Some((every, fault)));
            tokio::time::sleep_until(end.into()).await;
            mock.set_periodic_fault(None);
        }));
    }
    let backend = &scenario.backend;
    if backend.slow_word_delay_ms > 0
        && let Some((api_key, bot)) = run.target.management.clone()
    {
        let (start, end) = (at(backend.slow_from_secs), at(backend.slow_until_secs));
        let delay = backend.slow_word_delay_ms;
        let run = Arc::clone(run);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let slow = json!({"backend": {"kind": "echo", "wordDelayMs": delay}});
            update_bot(&run, &api_key, &bot, &slow).await;
            tokio::time::sleep_until(end.into()).await;
            update_bot(&run, &api_key, &bot, &json!({"backend": {"kind": "echo"}})).await;
        }));
    }
    if let Some(failover) = &scenario.failover {
        let kill_at = at(failover.kill_at_secs);
        let pause = Duration::from_millis(failover.restart_after_ms);
        let (spawned, run) = (Arc::clone(spawned), Arc::clone(run));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(kill_at.into()).await;
            let mut guard = spawned.lock().await;
            let Some(router) = guard.first_mut() else {
                return;
            };
            let label = router.label.clone();
            run.live.rcu(|live| {
                live.iter()
                    .filter(|e| *e.label != *label)
                    .cloned()
                    .collect::<Vec<_>>()
            });
            let pid = router.process.pid().map(u64::from);
            run.stats.lock().killed_at = Some(run.started.elapsed().as_secs_f64());
            if run
                .scenario
                .failover
                .as_ref()
                .is_some_and(|f| f.signal == "term")
            {
                // A drain: deliveries go elsewhere at once (as a balancer stops sending to a
                // terminating pod), and the router exits once it has handed over.
                match router.process.terminate(Duration::from_secs(60)).await {
                    Ok(status) => {
                        eprintln!("failover: router {label} drained and exited ({status})")
                    }
                    Err(e) => {
                        eprintln!(
                            "failover: router {label} did not exit after SIGTERM ({e}); killed"
                        );
                        router.process.kill().await;
                    }
                }
            } else {
                router.process.kill().await;
                eprintln!("failover: router {label} killed (SIGKILL)");
            }
            run.pids.lock().retain(|p| Some(*p) != pid);
            tokio::time::sleep(pause).await;
            let restarted = if run.scenario.router.instances == 1 {
                router.restart().await.map(|()| None)
            } else {
                router.replacement(&run.scenario, &run.mock).await.map(Some)
            };
            match restarted {
                Ok(replacement) => {
                    let router = match replacement {
                        Some(replacement) => {
                            guard.push(replacement);
                            guard.last().expect("just pushed")
                        }
                        None => &guard[0],
                    };
                    run.pids.lock().extend(router.process.pid().map(u64::from));
                    let endpoint = endpoint_of(router);
                    run.live.rcu(|live| {
                        let mut live = live.to_vec();
                        live.push(endpoint.clone());
                        live
                    });
                    run.stats.lock().replaced_at = Some(run.started.elapsed().as_secs_f64());
                    eprintln!("failover: router {} started", router.label);
                }
                Err(e) => eprintln!("failover: restart failed: {e}"),
            }
        }));
    }
    tasks
}

async fn update_bot(run: &Run, api_key: &str, bot: &str, body: &serde_json::Value) {
    let url = format!("{}/api/v1/bot/{bot}/update", run.target.base_url);
    match run
        .client
        .post(&url)
        .bearer_auth(api_key)
        .json(body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => eprintln!("backend: bot {bot} now {body}"),
        Ok(r) => eprintln!("backend: updating bot {bot} answered {}", r.status()),
        Err(e) => eprintln!("backend: updating bot {bot} failed: {e}"),
    }
}

/// Stops the ramp once the router is this many seconds of replies behind, or once a finished
/// step's end-to-end p99 is four times the sustainable limit (the knee is behind us; going on only
/// builds a backlog that takes minutes to drain).
async fn watch_ramp(run: Arc<Run>, backlog_secs: f64, e2e_limit_ms: f64) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let elapsed = run.started.elapsed().as_secs_f64();
        let (rate, step) = run.scenario.rate_at(elapsed);
        let previous = step.checked_sub(1).and_then(|k| {
            let stats = run.stats.lock();
            stats.steps.get(k).map(|s| (s.rate, ms(&s.e2e, 0.99)))
        });
        if let Some((previous_rate, p99)) = previous
            && p99 > 4.0 * e2e_limit_ms
        {
            eprintln!(
                "ramp: the {previous_rate}/s step had an end-to-end p99 of {p99:.0} ms (over 4 × {e2e_limit_ms} ms); stopping"
            );
            run.stop.store(true, Ordering::Relaxed);
            return;
        }
        let outstanding = run.tracker.lock().outstanding as f64;
        if outstanding > backlog_secs * rate {
            eprintln!(
                "ramp: {outstanding} replies outstanding at {rate}/s (over {backlog_secs} s of backlog); stopping"
            );
            run.stop.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// The router's CPU (percent of one core) and RSS, once a second, from /proc.
async fn sample_process(run: Arc<Run>) {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut last: HashMap<u64, (u64, Instant)> = HashMap::new();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        let pids = run.pids.lock().clone();
        if pids.is_empty() {
            continue;
        }
        let now = Instant::now();
        let (mut cpu, mut rss, mut measured) = (0.0, 0u64, false);
        let mut seen = HashMap::new();
        for pid in pids {
            let Some(ticks) = cpu_ticks(pid) else {
                continue;
            };
            rss += rss_bytes(pid).unwrap_or(0);
            if let Some((last_ticks, at)) = last.get(&pid) {
                let seconds = now.duration_since(*at).as_secs_f64().max(1e-3);
                cpu += ticks.saturating_sub(*last_ticks) as f64 / ticks_per_sec / seconds * 100.0;
                measured = true;
            }
            seen.insert(pid, (ticks, now));
        }
        if measured {
            run.stats.lock().samples.push(Sample {
                t: now.duration_since(run.started).as_secs_f64(),
                cpu_percent: cpu,
                rss_mib: rss as f64 / (1024.0 * 1024.0),
            });
        }
        last = seen;
    }
}

/// The partitions each live router holds (`teams_router_partitions_held`), four times a second;
/// recorded when they change, and at least once a second.
async fn watch_partitions(run: Arc<Run>) {
    let mut interval = tokio::time::interval(Duration::from_millis(250));
    let mut last: Option<(f64, BTreeMap<String, u64>)> = None;
    loop {
        interval.tick().await;
        let live = run.live.load_full();
        let mut held = BTreeMap::new();
        for endpoint in live.iter() {
            let Some(ops) = &endpoint.ops_url else {
                continue;
            };
            let scrape = match run.client.get(format!("{ops}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => continue,
            };
            if let Some(value) = scrape.lines().find_map(|line| {
                line.strip_prefix("teams_router_partitions_held ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            }) {
                held.insert(endpoint.label.to_string(), value as u64);
            }
        }
        let t = run.started.elapsed().as_secs_f64();
        let changed = last
            .as_ref()
            .is_none_or(|(at, before)| *before != held || t - at >= 1.0);
        if changed && !held.is_empty() {
            run.stats.lock().holdings.push(Holding {
                t,
                held: held.clone(),
            });
            last = Some((t, held));
        }
    }
}

fn endpoint_of(spawned: &Spawned) -> Endpoint {
    Endpoint {
        label: spawned.label.as_str().into(),
        base_url: spawned.process.base_url(),
        ops_url: Some(spawned.process.ops_url("")),
    }
}

pub fn cpu_ticks(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it are space-separated.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn rss_bytes(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The live progress line (indicatif on a terminal; a plain line every 5 s otherwise).
struct Progress {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(run: Arc<Run>, show: bool, send_secs: f64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (show && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(send_secs.ceil() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                tick += 1;
                let line = progress_line(&run);
                match &task_bar {
                    Some(bar) => {
                        bar.set_position(run.started.elapsed().as_secs().min(send_secs as u64));
                        bar.set_message(line);
                    }
                    None if show && tick.is_multiple_of(20) => eprintln!("{line}"),
                    None => {}
                }
            }
        });
        Self { task, bar }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn progress_line(run: &Run) -> String {
    let elapsed = run.started.elapsed().as_secs_f64();
    let (rate, _) = run.scenario.rate_at(elapsed);
    let (replies, outstanding) = {
        let t = run.tracker.lock();
        (t.replies, t.outstanding)
    };
    let stats = run.stats.lock();
    let quantile = |h: &Option<Histogram<u64>>, q: f64| {
        h.as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    format!(
        "t={elapsed:.0}s rate={rate:.0}/s offered={} acked={} refused={} replies={replies} outstanding={outstanding} ack_p99={:.1}ms e2e_p99={:.1}ms",
        stats.offered,
        stats.acked,
        stats.refused,
        quantile(&stats.ack, 0.99),
        quantile(&stats.e2e, 0.99),
    )
}

fn build_report(run: &Run, saturated: bool, router_logs: String) -> Report {
    let scenario = &run.scenario;
    let mut tracker = run.tracker.lock();
    let mut stats = run.stats.lock();
    let mut lost = 0u64;
    let mut lost_examples = Vec::new();
    for (id, pending) in &tracker.pending {
        if pending.acked && pending.replies == 0 {
            lost += 1;
            if lost_examples.len() < 10 {
                lost_examples.push(id.to_string());
            }
            if let Some(step) = stats.steps.get_mut(pending.step as usize) {
                step.lost += 1;
            }
        }
    }
    let answered = tracker.pending.values().filter(|p| p.replies > 0).count() as u64;
    let expected = tracker.pending.values().filter(|p| p.acked).count() as u64;
    tracker.pending.clear();
    let seconds = stats
        .seconds
        .iter()
        .enumerate()
        .map(|(t, s)| Second {
            t: t as u64,
            sent: s.sent,
            acked: s.acked,
            replies: s.replies,
            errors: s.errors,
            shed: s.shed,
            ack_p50_ms: ms(&s.ack, 0.5),
            ack_p99_ms: ms(&s.ack, 0.99),
            e2e_p50_ms: ms(&s.e2e, 0.5),
            e2e_p99_ms: ms(&s.e2e, 0.99),
        })
        .collect();
    let step_secs = |i: usize| match (&scenario.ramp, scenario.phases.get(i)) {
        (Some(ramp), _) => ramp.step_secs,
        (None, Some(phase)) => phase.secs,
        (None, None) => 1.0,
    };
    let steps: Vec<Step> = if scenario.ramp.is_some() || !scenario.phases.is_empty() {
        stats
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| Step {
                index: i as u64,
                offered_rate: s.rate,
                achieved_rate: s.acked as f64 / step_secs(i),
                offered: s.offered,
                acked: s.acked,
                refused: s.refused,
                shed: s.shed,
                admitted_e2e_p99_ms: ms(&s.admitted_e2e, 0.99),
                lost: s.lost,
                ack_p99_ms: ms(&s.ack, 0.99),
                e2e_p50_ms: ms(&s.e2e, 0.5),
                e2e_p99_ms: ms(&s.e2e, 0.99),
                e2e_max_ms: s.e2e.max() as f64 / 1000.0,
            })
            .collect()
    } else {
        Vec::new()
    };
    let empty = histogram(3);
    let ack = stats.ack.clone().unwrap_or_else(|| empty.clone());
    let e2e = stats.e2e.clone().unwrap_or(empty);
    let sent_secs = run
        .started
        .elapsed()
        .as_secs_f64()
        .min(scenario.send_secs())
        .max(1e-3);
    let mut report = Report::new(scenario.clone());
    report.run_id = run.run_id.clone();
    report.offered = stats.offered;
    report.acked = stats.acked;
    report.refused = stats.refused;
    report.achieved_rate = stats.acked as f64 / sent_secs;
    report.statuses = stats.statuses.clone();
    report.kinds = stats
        .kinds
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    report.replies_expected = expected;
    report.replies_received = tracker.replies;
    report.answered = answered;
    report.lost = lost;
    report.lost_examples = lost_examples;
    report.duplicate_replies = tracker.duplicate_replies;
    report.order_violations = tracker.order_violations;
    report.unexpected_replies = tracker.unexpected_replies;
    report.duplicates_sent = stats.duplicates_sent;
    report.duplicates_acked = stats.duplicates_acked;
    report.bad_tokens_sent = stats.bad_tokens_sent;
    report.bad_tokens_rejected = stats.bad_tokens_rejected;
    report.bad_tokens_accepted = stats.bad_tokens_accepted;
    report.invokes_without_body = stats.invokes_without_body;
    report.invoke_answers_on_redelivery = stats.invoke_answers_on_redelivery;
    report.harness_saturated = saturated;
    report.ack_latency = crate::report::Latency::from_histogram(&ack);
    report.e2e_latency = crate::report::Latency::from_histogram(&e2e);
    report.seconds = seconds;
    report.steps = steps;
    report.samples = std::mem::take(&mut stats.samples);
    let run_secs = run.started.elapsed().as_secs_f64();
    report.instances = stats
        .instances
        .iter()
        .map(|(label, counted)| {
            let (from, to) = (
                counted.first_ack.unwrap_or(0.0),
                counted.last_ack.unwrap_or(run_secs),
            );
            InstanceReport {
                label: label.to_string(),
                acked: counted.acked,
                first_ack_secs: from,
                last_ack_secs: to,
                acked_per_sec: counted.acked as f64 / (to - from).max(1.0),
            }
        })
        .collect();
    report.partitions_over_time = std::mem::take(&mut stats.holdings);
    report.killed_at_secs = stats.killed_at;
    report.replaced_at_secs = stats.replaced_at;
    report.measure_takeover();
    report.connector_throttled = run.mock.throttled() as u64;
    report.router_log_tail = router_logs
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_owned)
        .collect();
    report.evaluate();
    report
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    if histogram.is_empty() {
        0.0
    } else {
        histogram.value_at_quantile(quantile) as f64 / 1000.0
    }
}
