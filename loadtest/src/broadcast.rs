//! A broadcast run (`loadtest broadcast`): one job to many users in many tenants, created,
//! filled and started through the management API, watched until it is done, with the mock
//! connector enforcing Teams' limits. The harness computes the least time those limits allow
//! the broadcast's share of each tenant's budget, and reports how close the router came, the
//! 429s its own pacing caused, each recipient's copies (exactly one each; after a kill, the
//! duplicates and the sends that were in flight), its CPU per recipient and its RSS over the job.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use crate::harness::{Spawned, cpu_ticks, rss_bytes};
use crate::mock::{MockMicrosoft, RecordedActivity, TEAMS_APP_TENANT_LIMITS};
use crate::report::{Check, row};
use crate::scenario::{BroadcastSim, Scenario};
use crate::spawn::API_KEY;

const TEXT: &str = "loadtest broadcast: the office is closed on Friday";
/// USER_HZ on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// One look at the job and the router.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    /// Recipients done (sent or failed).
    pub done: u64,
    pub rss_mib: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BroadcastReport {
    pub scenario: Scenario,
    pub recipients: usize,
    pub tenants: usize,
    /// Connector requests the broadcast needs at least in its busiest tenant (a chat created
    /// and a message sent per user).
    pub requests_per_tenant: u64,
    /// Requests per second per tenant the broadcast may use: `max_share` of Teams' limit.
    pub budget_per_tenant: f64,
    /// The least time the budget allows (seconds).
    pub minimum_secs: f64,
    /// From the start call to the job's last outcome (seconds).
    pub took_secs: f64,
    pub time_ratio: f64,
    pub sent: u64,
    pub failed: u64,
    pub failures: Value,
    pub chats_created: usize,
    pub copies: usize,
    /// Copies beyond the first of a recipient.
    pub duplicates: usize,
    /// Recipients the job had in flight when its router stopped (the most duplicates allowed).
    pub resumed_in_flight: u64,
    /// 429s the router's own pacing caused.
    pub throttled: usize,
    pub killed_at_secs: Option<f64>,
    /// From the kill to the first copy sent by the restarted router.
    pub resumed_after_secs: Option<f64>,
    pub router_cpu_secs: f64,
    pub cpu_us_per_recipient: f64,
    /// RSS before the job was created, once a tenth of it was done, and the most after.
    pub rss_before_mib: f64,
    pub rss_at_tenth_mib: f64,
    pub rss_max_mib: f64,
    pub samples: Vec<Sample>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub router_log_tail: Vec<String>,
}

/// Copies each user's chat got, when the last one came, and the first from a restarted router.
#[derive(Default)]
struct Copies {
    per_conversation: HashMap<String, usize>,
    last_at: Option<Instant>,
    killed_at: Option<Instant>,
    first_after_kill: Option<Instant>,
}

/// Copies a killed router had in flight may still land this long after the kill.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(200);

fn tenant_id(n: usize) -> String {
    format!("{n:08x}-bc00-4000-8000-000000000000")
}

/// Recipients tenant by tenant: a runner that went through them in the order given would send
/// to one tenant at a time.
fn users(sim: &BroadcastSim) -> Vec<Value> {
    (0..sim.recipients)
        .map(|n| {
            let tenant = n * sim.tenants / sim.recipients;
            json!({"userId": format!("29:bc-{n}"), "tenantId": tenant_id(tenant)})
        })
        .collect()
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut request = client.request(method, url).bearer_auth(API_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| format!("{url}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{url}: {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{url}: {e}: {text}"))
}

/// Runs the scenario's broadcast on the spawned router.
pub async fn run(
    scenario: &Scenario,
    mock: &MockMicrosoft,
    mut router: Spawned,
    integration: &str,
    show_progress: bool,
) -> Result<BroadcastReport, String> {
    let sim = scenario
        .broadcast
        .clone()
        .ok_or("the scenario has no [broadcast]")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    mock.enforce_teams_limits(scenario.connector.teams_limits);
    if scenario.connector.latency_ms > 0 {
        mock.set_connector_latency(Duration::from_millis(scenario.connector.latency_ms));
    }
    let copies = Arc::new(Mutex::new(Copies::default()));
    {
        let copies = Arc::clone(&copies);
        mock.observe(
            Some(Arc::new(move |activity: &RecordedActivity| {
                if activity.method == "POST" && activity.text() == TEXT {
                    let mut copies = copies.lock();
                    *copies
                        .per_conversation
                        .entry(activity.conversation_id.clone())
                        .or_default() += 1;
                    let now = Instant::now();
                    copies.last_at = Some(now);
                    if copies.first_after_kill.is_none()
                        && copies
                            .killed_at
                            .is_some_and(|killed| now.duration_since(killed) > IN_FLIGHT_GRACE)
                    {
                        copies.first_after_kill = Some(now);
                    }
                }
            })),
            false,
        );
    }
    let throttled_before = mock.throttled();
    let rss_before = router
        .process
        .pid()
        .and_then(|pid| rss_bytes(u64::from(pid)))
        .unwrap_or(0) as f64
        / (1024.0 * 1024.0);
    let created_before = mock.created_conversations().len();

    // A restart keeps the ports.
    let base = router.process.base_url();
    let api = |path: String| format!("{base}/api/v1/integration/teams/{integration}/{path}");
    let recipients = users(&sim);
    let mut job = String::new();
    for (n, page) in recipients.chunks(sim.page).enumerate() {
        let answer = if n == 0 {
            call(
                &client,
                reqwest::Method::POST,
                &api("broadcast/create".into()),
                Some(json!({
                    "message": {"text": TEXT, "summary": "Office closed", "alert": true},
                    "recipients": {"users": page},
                    "start": false,
                })),
            )
            .await?
        } else {
            call(
                &client,
                reqwest::Method::POST,
                &api(format!("broadcast/{job}/recipients")),
                Some(json!({"recipients": {"users": page}})),
            )
            .await?
        };
        if n == 0 {
            job = answer["id"].as_str().ok_or("no job id")?.to_owned();
        }
    }
    // Teams' windows start empty.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut pid = router.process.pid().map(u64::from).ok_or("no router pid")?;
    let mut cpu_before = cpu_ticks(pid).unwrap_or(0);
    let mut cpu_ticks_total = 0u64;
    let started = Instant::now();
    call(
        &client,
        reqwest::Method::POST,
        &api(format!("broadcast/{job}/start")),
        None,
    )
    .await?;

    let total = sim.recipients as u64;
    let kill_at = sim.kill_at_share.map(|share| (share * total as f64) as u64);
    let mut killed_at: Option<Instant> = None;
    let mut samples = Vec::new();
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs_f64(sim.timeout_secs);
    let state = loop {
        let state = call(
            &client,
            reqwest::Method::GET,
            &api(format!("broadcast/{job}/fetch")),
            None,
        )
        .await;
        let state = match state {
            Ok(state) => state,
            // The restarted router is not up yet.
            Err(_) if killed_at.is_some() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        let done = state["counts"]["sent"].as_u64().unwrap_or(0)
            + state["counts"]["failed"].as_u64().unwrap_or(0);
        samples.push(Sample {
            t: started.elapsed().as_secs_f64(),
            done,
            rss_mib: rss_bytes(pid).unwrap_or(0) as f64 / (1024.0 * 1024.0),
        });
        if show_progress && last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!(
                "  {:>6.1} s  {done}/{total} done  {} /s  RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                state["rate"],
                samples.last().map_or(0.0, |s| s.rss_mib)
            );
        }
        if state["status"] == "done" || state["status"] == "cancelled" {
            break state;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the broadcast did not finish in {} s: {state}",
                sim.timeout_secs
            ));
        }
        if killed_at.is_none() && kill_at.is_some_and(|at| done >= at) {
            cpu_ticks_total += cpu_ticks(pid)
                .unwrap_or(cpu_before)
                .saturating_sub(cpu_before);
            router.process.kill().await;
            killed_at = Some(Instant::now());
            copies.lock().killed_at = killed_at;
            router.restart().await?;
            pid = router.process.pid().map(u64::from).ok_or("no router pid")?;
            cpu_before = cpu_ticks(pid).unwrap_or(0);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    cpu_ticks_total += cpu_ticks(pid)
        .unwrap_or(cpu_before)
        .saturating_sub(cpu_before);
    let (per_conversation, last_at, first_after_kill) = {
        let copies = copies.lock();
        (
            copies.per_conversation.clone(),
            copies.last_at,
            copies.first_after_kill,
        )
    };
    mock.observe(None, true);
    let took = last_at.map_or(started.elapsed(), |at| at.duration_since(started));

    // Each user needs a chat created and a message sent: two requests in its tenant.
    let per_tenant = (0..sim.recipients).fold(HashMap::<usize, u64>::new(), |mut counts, n| {
        *counts.entry(n * sim.tenants / sim.recipients).or_default() += 2;
        counts
    });
    let requests_per_tenant = per_tenant.values().copied().max().unwrap_or(0);
    // Teams' windows slide: the first window's requests go at once, each later window's a
    // window after, so the last window starts (windows - 1) windows in.
    let minimum_secs = TEAMS_APP_TENANT_LIMITS
        .iter()
        .map(|(window, count)| {
            let per_window = (*count as u64 * u64::from(sim.max_share) / 100).max(1);
            (requests_per_tenant.div_ceil(per_window).saturating_sub(1)) as f64
                * window.as_secs_f64()
        })
        .fold(0.0, f64::max);
    let budget_per_tenant = TEAMS_APP_TENANT_LIMITS
        .iter()
        .map(|(window, count)| *count as f64 / window.as_secs_f64())
        .fold(f64::INFINITY, f64::min)
        * f64::from(sim.max_share)
        / 100.0;
    let copies_total: usize = per_conversation.values().sum();
    let duplicates: usize = per_conversation.values().map(|n| n - 1).sum();
    let router_cpu_secs = cpu_ticks_total as f64 / TICKS_PER_SEC;
    let tenth = samples
        .iter()
        .find(|s| s.done >= total / 10)
        .map_or(0.0, |s| s.rss_mib);
    let rss_max = samples
        .iter()
        .filter(|s| s.done >= total / 10)
        .map(|s| s.rss_mib)
        .fold(0.0, f64::max);
    let mut report = BroadcastReport {
        scenario: scenario.clone(),
        recipients: sim.recipients,
        tenants: sim.tenants,
        requests_per_tenant,
        budget_per_tenant,
        minimum_secs,
        took_secs: took.as_secs_f64(),
        time_ratio: took.as_secs_f64() / minimum_secs,
        sent: state["counts"]["sent"].as_u64().unwrap_or(0),
        failed: state["counts"]["failed"].as_u64().unwrap_or(0),
        failures: state["failures"].clone(),
        chats_created: mock.created_conversations().len() - created_before,
        copies: copies_total,
        duplicates,
        resumed_in_flight: state["resumedInFlight"].as_u64().unwrap_or(0),
        throttled: mock.throttled() - throttled_before,
        killed_at_secs: killed_at.map(|at| at.duration_since(started).as_secs_f64()),
        resumed_after_secs: killed_at
            .zip(first_after_kill)
            .map(|(killed, first)| first.duration_since(killed).as_secs_f64()),
        router_cpu_secs,
        cpu_us_per_recipient: router_cpu_secs / total as f64 * 1e6,
        rss_before_mib: rss_before,
        rss_at_tenth_mib: tenth,
        rss_max_mib: rss_max,
        samples,
        checks: Vec::new(),
        passed: false,
        router_log_tail: router
            .process
            .logs()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(str::to_owned)
            .collect(),
    };
    report.evaluate(sim.max_time_ratio);
    Ok(report)
}

impl BroadcastReport {
    fn evaluate(&mut self, max_ratio: f64) {
        let mut checks = Vec::new();
        let mut check = |name: &str, passed: bool, detail: String| {
            checks.push(Check::new(name, passed, detail))
        };
        let total = self.recipients as u64;
        check(
            "every recipient sent",
            self.sent == total && self.failed == 0,
            format!(
                "{} sent, {} failed {}",
                self.sent, self.failed, self.failures
            ),
        );
        check(
            "one copy each",
            self.copies - self.duplicates == self.recipients
                && self.duplicates as u64 <= self.resumed_in_flight,
            format!(
                "{} recipients got a copy, {} duplicates ({} in flight at a kill)",
                self.copies - self.duplicates,
                self.duplicates,
                self.resumed_in_flight
            ),
        );
        check(
            "no 429 caused by the router's pacing",
            self.throttled == 0,
            format!("{} requests over Teams' limits", self.throttled),
        );
        if self.killed_at_secs.is_none() {
            check(
                "time within the share's minimum",
                self.time_ratio <= max_ratio,
                format!(
                    "{:.1} s, {:.3} × the minimum {:.1} s (limit {max_ratio} ×)",
                    self.took_secs, self.time_ratio, self.minimum_secs
                ),
            );
        }
        self.passed = checks.iter().all(|c| c.passed);
        self.checks = checks;
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        let s = &self.scenario;
        let _ = writeln!(out, "scenario {}: {}", s.name, s.description);
        row(
            &mut out,
            "recipients",
            format!(
                "{} in {} tenants: {} sent, {} failed, {} chats created",
                self.recipients, self.tenants, self.sent, self.failed, self.chats_created
            ),
        );
        row(
            &mut out,
            "time",
            format!(
                "{:.1} s; minimum {:.1} s ({} requests in the busiest tenant at {:.0}/s): {:.3} ×",
                self.took_secs,
                self.minimum_secs,
                self.requests_per_tenant,
                self.budget_per_tenant,
                self.time_ratio
            ),
        );
        row(
            &mut out,
            "copies",
            format!(
                "{} ({} duplicates, {} in flight at a kill), {} 429s from the router's pacing",
                self.copies, self.duplicates, self.resumed_in_flight, self.throttled
            ),
        );
        if let Some(killed) = self.killed_at_secs {
            row(
                &mut out,
                "kill",
                format!(
                    "SIGKILL at {killed:.1} s; sending again {}",
                    self.resumed_after_secs
                        .map_or("(not seen)".into(), |r| format!("{r:.1} s after"))
                ),
            );
        }
        row(
            &mut out,
            "router",
            format!(
                "CPU {:.1} s ({:.0} µs per recipient); RSS {:.0} MiB before, {:.0} MiB at a tenth, {:.0} MiB max after",
                self.router_cpu_secs,
                self.cpu_us_per_recipient,
                self.rss_before_mib,
                self.rss_at_tenth_mib,
                self.rss_max_mib
            ),
        );
        for check in &self.checks {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if check.passed { "ok" } else { "FAILED" },
                check.name,
                check.detail
            );
        }
        out
    }

    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let path = dir.join("report.json");
        std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))
    }
}
