//! A load scenario: the traffic shape, the simulated Microsoft side and the faults of one run, read
//! from TOML. The bundled profiles (`loadtest/scenarios/*.toml`) are compiled in, so
//! `loadtest smoke` works from any directory; a path to another TOML file works too.

use serde::{Deserialize, Serialize};

/// The profiles shipped in `loadtest/scenarios/`.
pub const BUNDLED: &[(&str, &str)] = &[
    ("smoke", include_str!("../scenarios/smoke.toml")),
    ("steady", include_str!("../scenarios/steady.toml")),
    ("ramp", include_str!("../scenarios/ramp.toml")),
    ("storm", include_str!("../scenarios/storm.toml")),
    ("failover", include_str!("../scenarios/failover.toml")),
    ("capacity", include_str!("../scenarios/capacity.toml")),
    ("overload", include_str!("../scenarios/overload.toml")),
    ("cpu", include_str!("../scenarios/cpu.toml")),
    ("peak", include_str!("../scenarios/peak.toml")),
    ("broadcast", include_str!("../scenarios/broadcast.toml")),
    (
        "broadcast-kill",
        include_str!("../scenarios/broadcast-kill.toml"),
    ),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// Activities per second, sent open-loop (ignored with `[ramp]`).
    pub rate: f64,
    pub duration_secs: f64,
    /// After the last send, how long replies are waited for before the missing ones count as lost.
    pub drain_secs: f64,
    /// Integrations (bots), each with its own app id and token.
    pub integrations: usize,
    /// Tenants the conversations are spread over.
    pub tenants: usize,
    pub conversations: usize,
    /// The first `hot_conversations` conversations get `hot_share` of the traffic; the rest is
    /// spread over the long tail with a Zipf-like skew.
    pub hot_conversations: usize,
    pub hot_share: f64,
    pub conversation_mix: ConversationMix,
    pub activity_mix: ActivityMix,
    /// Share of activities delivered a second time (same id), as the Bot Connector redelivers.
    pub duplicates: f64,
    /// Share of those redeliveries sent at the same moment as the original.
    pub concurrent_duplicates: f64,
    /// Share of requests sent with a token signed by a key Microsoft never published.
    pub bad_tokens: f64,
    /// Tokens are re-signed this often (the Bot Connector reuses one for a while).
    pub token_refresh_secs: f64,
    /// Microsoft starts signing with a new key this often (0: never).
    pub key_rotation_secs: f64,
    /// Requests in flight at most; beyond it sends wait (and their latency counts the wait).
    pub max_in_flight: usize,
    /// Redeliveries of a request that failed (connection error, 429, 5xx), as the Bot Connector does.
    pub max_attempts: u32,
    pub connector: ConnectorSim,
    pub backend: BackendSim,
    pub router: RouterSetup,
    pub ramp: Option<Ramp>,
    /// Rate phases one after another, instead of `rate` and `duration_secs` (an overload run: the
    /// sustainable rate, three times it, and back).
    pub phases: Vec<Phase>,
    pub failover: Option<Failover>,
    /// A broadcast run instead of conversation traffic (`loadtest broadcast`).
    pub broadcast: Option<BroadcastSim>,
    pub checks: Checks,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "custom".into(),
            description: String::new(),
            rate: 100.0,
            duration_secs: 10.0,
            drain_secs: 30.0,
            integrations: 4,
            tenants: 2,
            conversations: 200,
            hot_conversations: 5,
            hot_share: 0.2,
            conversation_mix: ConversationMix::default(),
            activity_mix: ActivityMix::default(),
            duplicates: 0.0,
            concurrent_duplicates: 0.5,
            bad_tokens: 0.0,
            token_refresh_secs: 60.0,
            key_rotation_secs: 0.0,
            max_in_flight: 4096,
            max_attempts: 20,
            connector: ConnectorSim::default(),
            backend: BackendSim::default(),
            router: RouterSetup::default(),
            ramp: None,
            phases: Vec::new(),
            failover: None,
            broadcast: None,
            checks: Checks::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationMix {
    pub personal: f64,
    pub group: f64,
    pub channel: f64,
}

impl Default for ConversationMix {
    fn default() -> Self {
        Self {
            personal: 0.6,
            group: 0.2,
            channel: 0.2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "camelCase")]
pub struct ActivityMix {
    pub message: f64,
    pub conversation_update: f64,
    pub message_reaction: f64,
    pub invoke: f64,
}

impl Default for ActivityMix {
    fn default() -> Self {
        Self {
            message: 0.85,
            conversation_update: 0.05,
            message_reaction: 0.05,
            invoke: 0.05,
        }
    }
}

/// The simulated Bot Connector.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorSim {
    /// Added to every connector request.
    pub latency_ms: u64,
    /// Enforce Teams' documented rate limits (and give the router Teams' limits); otherwise both
    /// are lifted so the run measures the router, not Teams' quotas.
    pub teams_limits: bool,
    /// Every `fault_every`th request answers `fault_status` (429 comes with Retry-After: 1)
    /// between `fault_from_secs` and `fault_until_secs` of the run.
    pub fault_every: u64,
    pub fault_status: u16,
    pub fault_from_secs: f64,
    pub fault_until_secs: f64,
}

impl Default for ConnectorSim {
    fn default() -> Self {
        Self {
            latency_ms: 2,
            teams_limits: false,
            fault_every: 0,
            fault_status: 429,
            fault_from_secs: 0.0,
            fault_until_secs: f64::MAX,
        }
    }
}

/// A backend slowdown: the bot's echo backend is switched (through the management API) to answer
/// word by word with `word_delay_ms` between words, between the two instants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendSim {
    pub slow_word_delay_ms: u64,
    pub slow_from_secs: f64,
    pub slow_until_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSetup {
    /// `embedded` or `redis` (a `redis-server` from PATH, started for the run).
    pub storage: String,
    /// Appended to the generated router config (spawn mode).
    pub extra_config: String,
    /// The echo bot answers after this many milliseconds a word (0: at once), from the start:
    /// a deployment whose capacity is set by its bots, not by the router's CPU.
    pub word_delay_ms: u64,
    /// `conversation.mailbox_capacity`: activities one conversation may have waiting (past it,
    /// 429 `mailbox_full`). Lifted by default so that runs measure the router, not this bound.
    pub mailbox_capacity: usize,
    /// Routers started on one Redis (spawn mode; more than one needs `storage = "redis"`):
    /// deliveries go to a live one at random, as a load balancer would send them.
    pub instances: usize,
}

impl Default for RouterSetup {
    fn default() -> Self {
        Self {
            storage: "embedded".into(),
            extra_config: String::new(),
            word_delay_ms: 0,
            mailbox_capacity: 100_000,
            instances: 1,
        }
    }
}

/// `rate` activities a second for `secs` seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub rate: f64,
    pub secs: f64,
}

/// Rate steps: `start_rate`, `start_rate + step_rate`, ... up to `max_rate`, each for `step_secs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ramp {
    pub start_rate: f64,
    pub step_rate: f64,
    pub max_rate: f64,
    pub step_secs: f64,
    /// A step is sustainable when its end-to-end p99 stays under this, nothing is lost, and the
    /// harness achieved at least 95 % of the offered rate.
    pub e2e_p99_ms: f64,
    /// The ramp stops once this many seconds of replies are outstanding (past the knee).
    pub stop_backlog_secs: f64,
}

impl Default for Ramp {
    fn default() -> Self {
        Self {
            start_rate: 100.0,
            step_rate: 100.0,
            max_rate: 5000.0,
            step_secs: 10.0,
            e2e_p99_ms: 250.0,
            stop_backlog_secs: 5.0,
        }
    }
}

/// Kill the router with SIGKILL `kill_at_secs` into the run and start it again after
/// `restart_after_ms` on the same store and ports; with several instances, the first is killed
/// and a replacement starts under a new instance id and new ports (a replaced pod).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    pub kill_at_secs: f64,
    pub restart_after_ms: u64,
    /// `kill` (SIGKILL: a crash) or `term` (SIGTERM: a drain, as in a rolling restart; the
    /// router finishes its turns and hands its partitions over before it exits).
    pub signal: String,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            kill_at_secs: 10.0,
            restart_after_ms: 500,
            signal: "kill".into(),
        }
    }
}

/// One broadcast to `recipients` users spread over `tenants` tenants (given tenant by tenant,
/// none of them with a chat the router knows: each needs one created), through the management
/// API, against the mock connector with Teams' limits (`connector.teams_limits`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BroadcastSim {
    pub recipients: usize,
    pub tenants: usize,
    /// `broadcast.max_share` of the router: percent of each tenant's budget broadcasts may use.
    pub max_share: u32,
    /// Recipients per create or append call (the API takes at most 10,000).
    pub page: usize,
    /// Kill the router with SIGKILL once this share of recipients is done, and start it again
    /// on the same store.
    pub kill_at_share: Option<f64>,
    /// The run fails when it takes longer than this many times the minimum Teams' limits allow.
    pub max_time_ratio: f64,
    /// How long the job may take at most before the run gives up.
    pub timeout_secs: f64,
}

impl Default for BroadcastSim {
    fn default() -> Self {
        Self {
            recipients: 1_000,
            tenants: 4,
            max_share: 80,
            page: 10_000,
            kill_at_share: None,
            max_time_ratio: 1.05,
            timeout_secs: 1_800.0,
        }
    }
}

/// Checks beyond the ones every run makes (nothing lost, duplicated or out of order).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checks {
    /// Fail when the end-to-end p99 is over this many milliseconds.
    pub e2e_p99_ms: Option<f64>,
    /// Fail when fewer than this share of the offered activities were acknowledged.
    pub min_ack_share: Option<f64>,
    /// Fail when, in any phase, the end-to-end p99 of what the router admitted (from the
    /// delivery it acknowledged to the reply) is over this many milliseconds.
    pub admitted_e2e_p99_ms: Option<f64>,
    /// Fail when the router still sheds more than this many seconds after the rate dropped.
    pub recovery_secs: Option<f64>,
}

impl Scenario {
    /// A bundled profile by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, String> {
        let (text, origin) = match BUNDLED.iter().find(|(name, _)| *name == name_or_path) {
            Some((_, text)) => (text.to_string(), format!("bundled scenario {name_or_path}")),
            None => (
                std::fs::read_to_string(name_or_path).map_err(|e| {
                    let names: Vec<&str> = BUNDLED.iter().map(|(n, _)| *n).collect();
                    format!(
                        "{name_or_path}: not a bundled scenario ({}) nor a readable file: {e}",
                        names.join(", ")
                    )
                })?,
                name_or_path.to_owned(),
            ),
        };
        let scenario: Self = toml::from_str(&text).map_err(|e| format!("{origin}: {e}"))?;
        scenario.validate().map_err(|e| format!("{origin}: {e}"))?;
        Ok(scenario)
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a positive number"))
            }
        };
        let share = |what: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} must be between 0 and 1"))
            }
        };
        if !self.phases.is_empty() {
            if self.ramp.is_some() {
                return Err("phases and ramp cannot be combined".into());
            }
            for phase in &self.phases {
                positive("phases.rate", phase.rate)?;
                positive("phases.secs", phase.secs)?;
            }
        }
        match &self.ramp {
            Some(ramp) => {
                positive("ramp.start_rate", ramp.start_rate)?;
                positive("ramp.step_secs", ramp.step_secs)?;
                positive("ramp.e2e_p99_ms", ramp.e2e_p99_ms)?;
                if ramp.step_rate < 0.0 || ramp.max_rate < ramp.start_rate {
                    return Err("ramp: step_rate >= 0 and max_rate >= start_rate".into());
                }
            }
            None => {
                positive("rate", self.rate)?;
                positive("duration_secs", self.duration_secs)?;
            }
        }
        if self.integrations == 0 || self.conversations == 0 || self.tenants == 0 {
            return Err("integrations, tenants and conversations must be at least 1".into());
        }
        if self.hot_conversations > self.conversations {
            return Err("hot_conversations cannot exceed conversations".into());
        }
        share("hot_share", self.hot_share)?;
        share("duplicates", self.duplicates)?;
        share("concurrent_duplicates", self.concurrent_duplicates)?;
        share("bad_tokens", self.bad_tokens)?;
        let m = &self.conversation_mix;
        if m.personal + m.group + m.channel <= 0.0 {
            return Err("conversation_mix needs a positive weight".into());
        }
        let a = &self.activity_mix;
        if a.message + a.conversation_update + a.message_reaction + a.invoke <= 0.0 {
            return Err("activity_mix needs a positive weight".into());
        }
        positive("token_refresh_secs", self.token_refresh_secs)?;
        if self.max_in_flight == 0 || self.max_attempts == 0 {
            return Err("max_in_flight and max_attempts must be at least 1".into());
        }
        if !matches!(self.router.storage.as_str(), "embedded" | "redis") {
            return Err("router.storage is embedded or redis".into());
        }
        if self.failover.is_some() && self.router.storage != "redis" {
            return Err("failover needs router.storage = \"redis\"".into());
        }
        if let Some(failover) = &self.failover
            && !matches!(failover.signal.as_str(), "kill" | "term")
        {
            return Err("failover.signal is kill or term".into());
        }
        if let Some(broadcast) = &self.broadcast {
            if broadcast.recipients == 0 || broadcast.tenants == 0 {
                return Err("broadcast.recipients and broadcast.tenants must be at least 1".into());
            }
            if !(1..=100).contains(&broadcast.max_share) {
                return Err("broadcast.max_share is a percent, 1 to 100".into());
            }
            if !(1..=10_000).contains(&broadcast.page) {
                return Err("broadcast.page is 1 to 10000".into());
            }
            if let Some(kill_at) = broadcast.kill_at_share {
                share("broadcast.kill_at_share", kill_at)?;
            }
            positive("broadcast.max_time_ratio", broadcast.max_time_ratio)?;
            positive("broadcast.timeout_secs", broadcast.timeout_secs)?;
            if self.router.instances != 1 {
                return Err("a broadcast run uses one router".into());
            }
        }
        if !(1..=8).contains(&self.router.instances) {
            return Err("router.instances is 1 to 8".into());
        }
        if self.router.instances > 1 && self.router.storage != "redis" {
            return Err("several router instances need router.storage = \"redis\"".into());
        }
        Ok(())
    }

    /// The offered rate at `elapsed` seconds into the run, and the ramp step it belongs to.
    pub fn rate_at(&self, elapsed: f64) -> (f64, usize) {
        if let Some(last) = self.phases.last() {
            let mut end = 0.0;
            for (index, phase) in self.phases.iter().enumerate() {
                end += phase.secs;
                if elapsed < end {
                    return (phase.rate, index);
                }
            }
            return (last.rate, self.phases.len() - 1);
        }
        match &self.ramp {
            Some(ramp) => {
                let step = (elapsed / ramp.step_secs).floor().max(0.0) as usize;
                (
                    (ramp.start_rate + ramp.step_rate * step as f64).min(ramp.max_rate),
                    step,
                )
            }
            None => (self.rate, 0),
        }
    }

    /// How long traffic is sent for.
    pub fn send_secs(&self) -> f64 {
        if !self.phases.is_empty() {
            return self.phases.iter().map(|p| p.secs).sum();
        }
        match &self.ramp {
            Some(ramp) => {
                let steps = if ramp.step_rate > 0.0 {
                    ((ramp.max_rate - ramp.start_rate) / ramp.step_rate).floor() + 1.0
                } else {
                    1.0
                };
                steps * ramp.step_secs
            }
            None => self.duration_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_scenario_parses_and_validates() {
        for (name, _) in BUNDLED {
            let scenario = Scenario::load(name).unwrap();
            assert_eq!(&scenario.name, name);
        }
    }

    #[test]
    fn ramp_rates_step_up_to_the_maximum() {
        let scenario = Scenario {
            ramp: Some(Ramp {
                start_rate: 100.0,
                step_rate: 50.0,
                max_rate: 200.0,
                step_secs: 2.0,
                ..Ramp::default()
            }),
            ..Scenario::default()
        };
        assert_eq!(scenario.send_secs(), 6.0);
        assert_eq!(scenario.rate_at(0.5), (100.0, 0));
        assert_eq!(scenario.rate_at(2.1), (150.0, 1));
        assert_eq!(scenario.rate_at(5.9), (200.0, 2));
    }

    #[test]
    fn phases_follow_each_other() {
        let scenario = Scenario {
            phases: vec![
                Phase {
                    rate: 100.0,
                    secs: 2.0,
                },
                Phase {
                    rate: 300.0,
                    secs: 3.0,
                },
            ],
            ..Scenario::default()
        };
        assert!(scenario.validate().is_ok());
        assert_eq!(scenario.send_secs(), 5.0);
        assert_eq!(scenario.rate_at(1.9), (100.0, 0));
        assert_eq!(scenario.rate_at(2.0), (300.0, 1));
        assert_eq!(scenario.rate_at(4.9), (300.0, 1));
    }

    #[test]
    fn unknown_keys_and_bad_shares_are_refused() {
        assert!(toml::from_str::<Scenario>("rat = 5").is_err());
        let scenario = Scenario {
            duplicates: 1.5,
            ..Scenario::default()
        };
        assert!(scenario.validate().is_err());
    }
}
