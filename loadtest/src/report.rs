//! The figures of a run and their verdict: a summary table for the terminal, a JSON file with every
//! figure, and an HTML page with latency-over-time, throughput and (for a ramp) knee plots as SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::scenario::Scenario;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: h.max() as f64 / 1000.0,
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// One second of the run: counts by when they happened, latencies by when the activity was due.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    pub t: u64,
    pub sent: u64,
    pub acked: u64,
    pub replies: u64,
    pub errors: u64,
    /// Deliveries the router shed with 429 or 503 in this second.
    pub shed: u64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
}

/// One rate step of a ramp, or one phase; activities belong to the step they were scheduled in.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub index: u64,
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub offered: u64,
    pub acked: u64,
    pub refused: u64,
    /// Deliveries of its activities the router shed (429 or 503).
    pub shed: u64,
    /// End-to-end p99 from the delivery the router admitted, not from the first one.
    pub admitted_e2e_p99_ms: f64,
    pub lost: u64,
    pub ack_p99_ms: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
}

/// The router process, sampled once a second (spawned runs only).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: f64,
    pub cpu_percent: f64,
    pub rss_mib: f64,
}

/// The partitions each live router held at `t` seconds (Redis runs).
#[derive(Debug, Clone, Serialize)]
pub struct Holding {
    pub t: f64,
    pub held: BTreeMap<String, u64>,
}

/// What one router instance acknowledged, and at what rate while it did.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceReport {
    pub label: String,
    pub acked: u64,
    pub first_ack_secs: f64,
    pub last_ack_secs: f64,
    pub acked_per_sec: f64,
}

/// One line of a printed summary: a name and its figures.
pub fn row(out: &mut String, name: &str, value: String) {
    let _ = writeln!(out, "  {name:<28} {value}");
}

/// One check of a run, for the report and the exit status.
impl Check {
    pub fn new(name: &str, passed: bool, detail: String) -> Self {
        Self {
            name: name.into(),
            passed,
            detail,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub run_id: String,
    pub offered: u64,
    pub acked: u64,
    pub refused: u64,
    pub achieved_rate: f64,
    pub statuses: BTreeMap<String, u64>,
    pub kinds: BTreeMap<String, u64>,
    pub replies_expected: u64,
    pub replies_received: u64,
    pub answered: u64,
    pub lost: u64,
    pub lost_examples: Vec<String>,
    pub duplicate_replies: u64,
    pub order_violations: u64,
    pub unexpected_replies: u64,
    pub duplicates_sent: u64,
    pub duplicates_acked: u64,
    pub bad_tokens_sent: u64,
    pub bad_tokens_rejected: u64,
    pub bad_tokens_accepted: u64,
    pub invokes_without_body: u64,
    /// Invokes whose concurrent redelivery, not the original request, got the answer.
    pub invoke_answers_on_redelivery: u64,
    pub connector_throttled: u64,
    pub harness_saturated: bool,
    pub ack_latency: Latency,
    pub e2e_latency: Latency,
    /// The highest ramp step that was sustainable (see `Ramp`), if any.
    pub max_sustainable_rate: Option<f64>,
    /// With phases: how long after the rate dropped the router still shed (0: not at all).
    pub recovery_secs: Option<f64>,
    pub router_cpu_mean_percent: Option<f64>,
    /// Commands the run's Redis ran per acknowledged activity (those inside scripts included),
    /// leases, polls and heartbeats included.
    pub redis_commands_per_activity: Option<f64>,
    pub router_rss_max_mib: Option<f64>,
    pub seconds: Vec<Second>,
    pub steps: Vec<Step>,
    pub samples: Vec<Sample>,
    /// Per router instance (several on one Redis, or a replacement after a failover).
    pub instances: Vec<InstanceReport>,
    pub partitions_over_time: Vec<Holding>,
    /// Failover: when the router was killed and its replacement (or restart) was up.
    pub killed_at_secs: Option<f64>,
    pub replaced_at_secs: Option<f64>,
    /// From the kill until every partition was held again by a live router.
    pub takeover_secs: Option<f64>,
    /// From the kill until the partitions were spread evenly again, the replacement included.
    pub rebalanced_secs: Option<f64>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub router_log_tail: Vec<String>,
}

impl Report {
    /// Takeover and rebalance times, from the partitions held over time around the kill.
    pub fn measure_takeover(&mut self) {
        let Some(killed) = self.killed_at_secs else {
            return;
        };
        let total = self
            .partitions_over_time
            .iter()
            .filter(|h| h.t < killed)
            .map(|h| h.held.values().sum::<u64>())
            .max()
            .unwrap_or(0);
        if total == 0 {
            return;
        }
        let after: Vec<&Holding> = self
            .partitions_over_time
            .iter()
            .filter(|h| h.t >= killed)
            .collect();
        self.takeover_secs = after
            .iter()
            .find(|h| h.held.values().sum::<u64>() == total)
            .map(|h| h.t - killed);
        let replaced = self.replaced_at_secs.unwrap_or(f64::INFINITY);
        let instances = self.scenario.router.instances as u64;
        self.rebalanced_secs = after
            .iter()
            .find(|h| {
                let fair = total / instances;
                h.t >= replaced
                    && h.held.len() as u64 == instances
                    && h.held.values().sum::<u64>() == total
                    && h.held.values().all(|&n| n == fair || n == fair + 1)
            })
            .map(|h| h.t - killed);
    }

    /// The target's own CPU per answered activity (µs), over the sampled span.
    pub fn cpu_per_answered_us(&self) -> Option<f64> {
        let (first, last) = (self.samples.first()?, self.samples.last()?);
        let span = last.t - first.t + 1.0;
        let busy = self.router_cpu_mean_percent? / 100.0 * span;
        (self.answered > 0).then(|| busy / self.answered as f64 * 1e6)
    }

    pub fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            ..Self::default()
        }
    }

    /// Runs the checks and sets `passed`.
    pub fn evaluate(&mut self) {
        let mut checks = Vec::new();
        let mut check = |name: &str, passed: bool, detail: String| {
            checks.push(Check::new(name, passed, detail))
        };
        check(
            "no acknowledged activity lost",
            self.lost == 0,
            format!(
                "{} of {} acknowledged messages never answered",
                self.lost, self.replies_expected
            ),
        );
        // A router killed between sending a reply and recording it answers that turn again after
        // the restart: at most one per conversation.
        let allowed_duplicates = if self.scenario.failover.is_some() {
            self.scenario.conversations as u64
        } else {
            0
        };
        check(
            "no duplicate replies",
            self.duplicate_replies <= allowed_duplicates,
            format!(
                "{} second answers (allowed: {allowed_duplicates}); {} redeliveries sent, {} acknowledged",
                self.duplicate_replies, self.duplicates_sent, self.duplicates_acked
            ),
        );
        check(
            "replies in order per conversation",
            self.order_violations == 0,
            format!(
                "{} replies overtook a later activity's",
                self.order_violations
            ),
        );
        check(
            "every reply answers a sent activity",
            self.unexpected_replies == 0,
            format!("{} replies to unknown activities", self.unexpected_replies),
        );
        check(
            "forged tokens refused",
            self.bad_tokens_accepted == 0 && self.bad_tokens_rejected == self.bad_tokens_sent,
            format!(
                "{} sent, {} answered 401, {} accepted",
                self.bad_tokens_sent, self.bad_tokens_rejected, self.bad_tokens_accepted
            ),
        );
        check(
            "invokes answered with a body",
            self.invokes_without_body == 0,
            format!(
                "{} invokes without an InvokeResponse body ({} answered on the concurrent redelivery)",
                self.invokes_without_body, self.invoke_answers_on_redelivery
            ),
        );
        if let Some(limit) = self.scenario.checks.e2e_p99_ms {
            check(
                "end-to-end p99",
                self.e2e_latency.p99_ms <= limit,
                format!("{:.1} ms (limit {limit} ms)", self.e2e_latency.p99_ms),
            );
        }
        if let Some(share) = self.scenario.checks.min_ack_share {
            let achieved = self.acked as f64 / self.offered.max(1) as f64;
            check(
                "acknowledged share",
                achieved >= share,
                format!("{:.4} of offered (minimum {share})", achieved),
            );
        }
        if let Some(ramp) = &self.scenario.ramp {
            let sustainable = |s: &Step| {
                s.lost == 0
                    && s.refused == 0
                    && s.shed == 0
                    && s.e2e_p99_ms > 0.0
                    && s.e2e_p99_ms < ramp.e2e_p99_ms
                    && s.achieved_rate >= 0.95 * s.offered_rate
            };
            // The knee: the last step of the unbroken run of sustainable steps from the start.
            self.max_sustainable_rate = self
                .steps
                .iter()
                .take_while(|s| sustainable(s))
                .last()
                .map(|s| s.offered_rate);
        }
        self.recovery_secs = self.recovery_after_drop();
        if let Some(limit) = self.scenario.checks.admitted_e2e_p99_ms {
            let worst = self
                .steps
                .iter()
                .map(|s| s.admitted_e2e_p99_ms)
                .fold(0.0, f64::max);
            check(
                "admitted end-to-end p99 in every phase",
                worst > 0.0 && worst <= limit,
                format!("worst phase {worst:.1} ms (limit {limit} ms)"),
            );
        }
        if let Some(limit) = self.scenario.checks.recovery_secs {
            check(
                "recovery after the rate dropped",
                self.recovery_secs.is_some_and(|r| r <= limit),
                format!(
                    "{} (limit {limit} s)",
                    self.recovery_secs
                        .map(|r| format!("last shed {r:.0} s after the drop"))
                        .unwrap_or_else(|| "the rate never dropped".into())
                ),
            );
        }
        if !self.samples.is_empty() {
            self.router_cpu_mean_percent = Some(
                self.samples.iter().map(|s| s.cpu_percent).sum::<f64>() / self.samples.len() as f64,
            );
            self.router_rss_max_mib = self.samples.iter().map(|s| s.rss_mib).reduce(f64::max);
        }
        self.passed = checks.iter().all(|c| c.passed);
        self.checks = checks;
    }

    /// The table printed at the end of a run.
    /// Seconds from the first drop in the phases' rate to the end of the last second in which
    /// the router shed a delivery (0 when it shed nothing after the drop).
    fn recovery_after_drop(&self) -> Option<f64> {
        let phases = &self.scenario.phases;
        let drop = (1..phases.len()).find(|&i| phases[i].rate < phases[i - 1].rate)?;
        let drop_at: f64 = phases[..drop].iter().map(|p| p.secs).sum();
        let last_shed = self
            .seconds
            .iter()
            .filter(|s| s.shed > 0 && (s.t + 1) as f64 > drop_at)
            .map(|s| (s.t + 1) as f64)
            .reduce(f64::max);
        Some(last_shed.map_or(0.0, |end| (end - drop_at).max(0.0)))
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        let s = &self.scenario;
        let _ = writeln!(out, "scenario {}: {}", s.name, s.description);
        row(
            &mut out,
            "activities offered",
            format!(
                "{} (acked {}, refused {}), {:.1}/s achieved",
                self.offered, self.acked, self.refused, self.achieved_rate
            ),
        );
        row(&mut out, "by type", format!("{:?}", self.kinds));
        row(&mut out, "HTTP statuses", format!("{:?}", self.statuses));
        row(
            &mut out,
            "replies",
            format!(
                "expected {}, answered {}, received {}",
                self.replies_expected, self.answered, self.replies_received
            ),
        );
        let latency = |l: &Latency| {
            format!(
                "p50 {:.2} ms  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
            )
        };
        row(&mut out, "ack latency", latency(&self.ack_latency));
        row(&mut out, "end-to-end latency", latency(&self.e2e_latency));
        if let (Some(cpu), Some(rss)) = (self.router_cpu_mean_percent, self.router_rss_max_mib) {
            row(
                &mut out,
                "router",
                format!("CPU {cpu:.0} % of a core (mean), RSS max {rss:.0} MiB"),
            );
        }
        if let Some(commands) = self.redis_commands_per_activity {
            row(
                &mut out,
                "Redis commands",
                format!("{commands:.2} per acknowledged activity (those inside scripts included)"),
            );
        }
        if self.instances.len() > 1 {
            let per: Vec<String> = self
                .instances
                .iter()
                .map(|i| {
                    format!(
                        "{} {} ({:.0}/s, {:.0}-{:.0} s)",
                        i.label, i.acked, i.acked_per_sec, i.first_ack_secs, i.last_ack_secs
                    )
                })
                .collect();
            row(&mut out, "acked per instance", per.join(", "));
        }
        if let Some(killed) = self.killed_at_secs {
            let secs = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.1} s"));
            row(
                &mut out,
                "failover",
                format!(
                    "{} at {killed:.1} s; all partitions held again after {}, spread evenly \
                     after {} (replacement up {})",
                    match self.scenario.failover.as_ref().map(|f| f.signal.as_str()) {
                        Some("term") => "SIGTERM",
                        _ => "SIGKILL",
                    },
                    secs(self.takeover_secs),
                    secs(self.rebalanced_secs),
                    secs(self.replaced_at_secs.map(|r| r - killed)),
                ),
            );
        }
        if !self.partitions_over_time.is_empty() && self.scenario.router.instances > 1 {
            // About a dozen rows: the first, every change around the failover, the last.
            let rows = &self.partitions_over_time;
            let every = (rows.len() / 12).max(1);
            let mut shown = String::new();
            for (n, h) in rows.iter().enumerate() {
                let around_kill = self
                    .killed_at_secs
                    .is_some_and(|k| h.t >= k - 0.5 && h.t <= k + 15.0);
                let changed = n == 0 || rows[n - 1].held != h.held;
                if n % every == 0 || n + 1 == rows.len() || (around_kill && changed) {
                    let held: Vec<String> =
                        h.held.iter().map(|(l, v)| format!("{l}={v}")).collect();
                    let _ = write!(shown, "\n      t={:>5.1}s {}", h.t, held.join(" "));
                }
            }
            row(&mut out, "partitions held", shown);
        }
        if self.connector_throttled > 0 {
            row(
                &mut out,
                "connector 429 (limits)",
                self.connector_throttled.to_string(),
            );
        }
        if !self.steps.is_empty() {
            let _ = writeln!(
                out,
                "  steps: offered/s achieved/s  ack p99   e2e p50   e2e p99 admitted p99   lost refused   shed"
            );
            for step in &self.steps {
                let _ = writeln!(
                    out,
                    "  {:>16.0} {:>10.1} {:>8.1} {:>9.1} {:>9.1} {:>12.1} {:>6} {:>7} {:>6}",
                    step.offered_rate,
                    step.achieved_rate,
                    step.ack_p99_ms,
                    step.e2e_p50_ms,
                    step.e2e_p99_ms,
                    step.admitted_e2e_p99_ms,
                    step.lost,
                    step.refused,
                    step.shed
                );
            }
            if let Some(recovery) = self.recovery_secs {
                row(
                    &mut out,
                    "recovery",
                    format!("last shed {recovery:.0} s after the rate dropped"),
                );
            }
            if s.ramp.is_some() {
                row(
                    &mut out,
                    "max sustainable rate",
                    match self.max_sustainable_rate {
                        Some(rate) => format!(
                            "{rate:.0}/s (e2e p99 < {} ms, nothing lost)",
                            s.ramp.as_ref().map(|r| r.e2e_p99_ms).unwrap_or_default()
                        ),
                        None => "none of the steps".into(),
                    },
                );
            }
        }
        if self.harness_saturated {
            row(
                &mut out,
                "warning",
                "the harness fell over 1 s behind its schedule (it shares the machine)".into(),
            );
        }
        for check in &self.checks {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if check.passed { "pass" } else { "FAIL" },
                check.name,
                check.detail
            );
        }
        if !self.lost_examples.is_empty() {
            let _ = writeln!(out, "  lost, for example: {:?}", self.lost_examples);
        }
        let _ = writeln!(
            out,
            "  verdict: {}",
            if self.passed { "PASS" } else { "FAIL" }
        );
        out
    }

    /// Writes `report.json` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("report.json"), json).map_err(|e| format!("report.json: {e}"))?;
        std::fs::write(dir.join("report.html"), self.html()?)
            .map_err(|e| format!("report.html: {e}"))?;
        Ok(())
    }

    pub fn html(&self) -> Result<String, String> {
        let mut plots = vec![self.latency_plot()?, self.throughput_plot()?];
        if !self.samples.is_empty() {
            plots.push(self.process_plot()?);
        }
        if !self.steps.is_empty() {
            plots.push(self.knee_plot()?);
        }
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>teams-router load test: {name}</title>\
             <style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}\
             .pass{{color:#060}}.fail{{color:#a00}}</style></head><body><h1>Load test: {name}</h1><p>{desc}</p>\
             <h2 class=\"{class}\">{verdict}</h2><pre>{summary}</pre>",
            name = escape(&self.scenario.name),
            desc = escape(&self.scenario.description),
            class = if self.passed { "pass" } else { "fail" },
            verdict = if self.passed { "PASS" } else { "FAIL" },
            summary = escape(&self.summary()),
        );
        for plot in plots {
            html.push_str(&plot);
        }
        html.push_str("<p>Every figure is in report.json beside this page.</p></body></html>");
        Ok(html)
    }

    fn latency_plot(&self) -> Result<String, String> {
        let series: Series<'_> = vec![
            (
                "ack p50",
                RGBColor(120, 160, 220),
                pick(&self.seconds, |s| s.ack_p50_ms),
            ),
            (
                "ack p99",
                RGBColor(30, 80, 200),
                pick(&self.seconds, |s| s.ack_p99_ms),
            ),
            (
                "e2e p50",
                RGBColor(240, 150, 100),
                pick(&self.seconds, |s| s.e2e_p50_ms),
            ),
            (
                "e2e p99",
                RGBColor(200, 40, 30),
                pick(&self.seconds, |s| s.e2e_p99_ms),
            ),
        ];
        line_chart(
            "Latency by second the activity was due (ms, log scale)",
            "seconds into the run",
            "ms",
            series,
            true,
        )
    }

    fn throughput_plot(&self) -> Result<String, String> {
        let series = vec![
            (
                "sent/s",
                RGBColor(120, 120, 120),
                pick(&self.seconds, |s| s.sent as f64),
            ),
            (
                "acked/s",
                RGBColor(30, 80, 200),
                pick(&self.seconds, |s| s.acked as f64),
            ),
            (
                "replies/s",
                RGBColor(40, 150, 60),
                pick(&self.seconds, |s| s.replies as f64),
            ),
            (
                "refused/s",
                RGBColor(200, 40, 30),
                pick(&self.seconds, |s| s.errors as f64),
            ),
        ];
        line_chart(
            "Throughput",
            "seconds into the run",
            "per second",
            series,
            false,
        )
    }

    fn process_plot(&self) -> Result<String, String> {
        let series = vec![
            (
                "router CPU %",
                RGBColor(200, 40, 30),
                self.samples.iter().map(|s| (s.t, s.cpu_percent)).collect(),
            ),
            (
                "router RSS MiB",
                RGBColor(30, 80, 200),
                self.samples.iter().map(|s| (s.t, s.rss_mib)).collect(),
            ),
        ];
        line_chart("Router process", "seconds into the run", "", series, false)
    }

    fn knee_plot(&self) -> Result<String, String> {
        let series = vec![
            (
                "e2e p99 ms",
                RGBColor(200, 40, 30),
                self.steps
                    .iter()
                    .map(|s| (s.offered_rate, s.e2e_p99_ms))
                    .collect(),
            ),
            (
                "e2e p50 ms",
                RGBColor(240, 150, 100),
                self.steps
                    .iter()
                    .map(|s| (s.offered_rate, s.e2e_p50_ms))
                    .collect(),
            ),
            (
                "ack p99 ms",
                RGBColor(30, 80, 200),
                self.steps
                    .iter()
                    .map(|s| (s.offered_rate, s.ack_p99_ms))
                    .collect(),
            ),
        ];
        line_chart(
            "The knee: latency by offered rate (ms, log scale)",
            "offered activities/s",
            "ms",
            series,
            true,
        )
    }
}

/// One page with the router's and the reference's ramps on the same axes: end-to-end latency
/// and achieved rate by offered rate, and the ratios printed beside them.
pub fn comparison_html(
    router: &Report,
    reference: &Report,
    ratios: &str,
) -> Result<String, String> {
    // One figure of a step, by offered rate, for each of the two runs.
    let both =
        |title: &str, y_label: &str, series: [&'static str; 2], f: fn(&Step) -> f64, log_y| {
            let by_offered = |report: &Report| -> Vec<(f64, f64)> {
                report
                    .steps
                    .iter()
                    .map(|s| (s.offered_rate, f(s)))
                    .collect()
            };
            line_chart(
                title,
                "offered activities/s",
                y_label,
                vec![
                    (series[0], RGBColor(200, 40, 30), by_offered(router)),
                    (series[1], RGBColor(30, 80, 200), by_offered(reference)),
                ],
                log_y,
            )
        };
    let latency = both(
        "End-to-end p99 by offered rate (ms, log scale)",
        "ms",
        ["router e2e p99", "reference e2e p99"],
        |s| s.e2e_p99_ms,
        true,
    )?;
    let throughput = both(
        "Achieved rate by offered rate (activities/s)",
        "activities/s",
        ["router", "reference"],
        |s| s.achieved_rate,
        false,
    )?;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>teams-router beside the reference: {name}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>\
         </head><body><h1>{name}: the router beside the bare reference endpoint</h1><p>{desc}</p><pre>{ratios}</pre>\
         {latency}{throughput}<p>Each run's own page: <a href=\"report.html\">router</a>, \
         <a href=\"reference/report.html\">reference</a>.</p></body></html>",
        name = escape(&router.scenario.name),
        desc = escape(&router.scenario.description),
        ratios = escape(ratios),
    );
    Ok(html)
}

fn pick(seconds: &[Second], f: impl Fn(&Second) -> f64) -> Vec<(f64, f64)> {
    seconds.iter().map(|s| (s.t as f64, f(s))).collect()
}

type Series<'a> = Vec<(&'a str, RGBColor, Vec<(f64, f64)>)>;

/// One SVG line chart.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: Series<'_>,
    log_y: bool,
) -> Result<String, String> {
    let points = || series.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let x_min = points().map(|p| p.0).fold(x_max, f64::min).min(0.0);
    let y_max = points().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60);
        macro_rules! draw {
            ($chart:expr, $clip:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (name, color, data) in &series {
                    let color = *color;
                    chart
                        .draw_series(LineSeries::new(
                            data.iter().map(|(x, y)| (*x, $clip(*y))),
                            color.stroke_width(2),
                        ))
                        .map_err(|e| e.to_string())?
                        .label(*name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }};
        }
        if log_y {
            let chart = builder
                .build_cartesian_2d(x_min..x_max, (0.01f64..y_max.max(0.1)).log_scale())
                .map_err(|e| e.to_string())?;
            draw!(chart, |y: f64| y.max(0.01));
        } else {
            let chart = builder
                .build_cartesian_2d(x_min..x_max, 0f64..y_max)
                .map_err(|e| e.to_string())?;
            draw!(chart, |y: f64| y);
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(format!("<figure>{svg}</figure>"))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let mut report = Report::new(Scenario::default());
        report.offered = 100;
        report.acked = 100;
        report.replies_expected = 80;
        report.answered = 80;
        report.seconds = (0..5)
            .map(|t| Second {
                t,
                sent: 20,
                acked: 20,
                replies: 16,
                errors: 0,
                shed: 0,
                ack_p50_ms: 1.0,
                ack_p99_ms: 3.0,
                e2e_p50_ms: 4.0,
                e2e_p99_ms: 9.0,
            })
            .collect();
        report
    }

    #[test]
    fn a_clean_run_passes_and_renders() {
        let mut report = sample_report();
        report.evaluate();
        assert!(report.passed, "{}", report.summary());
        let html = report.html().unwrap();
        assert!(html.contains("<svg") && html.contains("e2e p99"));
    }

    #[test]
    fn lost_duplicated_or_reordered_replies_fail_the_run() {
        for spoil in [
            |r: &mut Report| r.lost = 1,
            |r: &mut Report| r.duplicate_replies = 1,
            |r: &mut Report| r.order_violations = 1,
            |r: &mut Report| r.bad_tokens_accepted = 1,
        ] {
            let mut report = sample_report();
            spoil(&mut report);
            report.evaluate();
            assert!(!report.passed);
        }
    }

    #[test]
    fn recovery_counts_from_the_drop_to_the_last_shed_second() {
        use crate::scenario::Phase;
        let mut report = sample_report();
        report.scenario.phases = vec![
            Phase {
                rate: 100.0,
                secs: 2.0,
            },
            Phase {
                rate: 300.0,
                secs: 2.0,
            },
            Phase {
                rate: 100.0,
                secs: 4.0,
            },
        ];
        report.scenario.checks.recovery_secs = Some(0.5);
        for second in &mut report.seconds {
            second.shed = u64::from((2..=3).contains(&second.t));
        }
        report.evaluate();
        assert_eq!(
            report.recovery_secs,
            Some(0.0),
            "no shedding after the drop at 4 s"
        );
        assert!(report.passed, "{}", report.summary());
        report.seconds[4].shed = 1;
        report.evaluate();
        assert_eq!(
            report.recovery_secs,
            Some(1.0),
            "shed until the end of second 4"
        );
        assert!(!report.passed);
    }

    #[test]
    fn the_knee_is_the_last_sustainable_step() {
        let mut report = Report::new(Scenario {
            ramp: Some(crate::scenario::Ramp::default()),
            ..Scenario::default()
        });
        let step = |rate: f64, p99: f64| Step {
            index: 0,
            offered_rate: rate,
            achieved_rate: rate,
            offered: 10,
            acked: 10,
            refused: 0,
            shed: 0,
            admitted_e2e_p99_ms: p99,
            lost: 0,
            ack_p99_ms: 1.0,
            e2e_p50_ms: 1.0,
            e2e_p99_ms: p99,
            e2e_max_ms: p99,
        };
        report.steps = vec![step(100.0, 5.0), step(200.0, 30.0), step(300.0, 900.0)];
        report.evaluate();
        assert_eq!(report.max_sustainable_rate, Some(200.0));
        assert!(report.knee_plot().unwrap().contains("<svg"));
        let mut reference = report.clone();
        reference.steps.push(step(400.0, 20.0));
        let page = comparison_html(&report, &reference, "ratio <0.5>").unwrap();
        assert_eq!(
            page.matches("<svg").count(),
            2,
            "latency and rate, both runs each"
        );
        assert!(page.contains("router e2e p99") && page.contains("reference e2e p99"));
        assert!(page.contains("ratio &lt;0.5&gt;"), "the ratios are escaped");
    }
}
