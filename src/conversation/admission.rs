//! Admission limits: how much work the router takes before it sheds load, over all integrations
//! and per integration, so that one noisy bot cannot starve the others.
//!
//! - *Pending* activities (acknowledged and not finished: queued in a mailbox or in their turn)
//!   are bounded on the request path. Over an integration's own bound the activity gets 429
//!   (`integration_overloaded`), over the global one 503 (`overloaded`), both with Retry-After,
//!   so the Bot Connector redelivers later. A [`Ticket`] counts one pending activity and gives
//!   its place back when dropped, whatever ends the activity.
//! - *Turns in flight* (backend and connector work running at once) are bounded where a
//!   conversation starts a turn: past the bound, turns wait for a place and their activities
//!   stay pending, which is what the request path then sheds on.
//!
//! - *Runtime lag and load*: past the machine's capacity, the bounds above are reached only once
//!   seconds of work are queued (in mailboxes, and in the runtime's own queues before a request
//!   is even read). A probe task measures how late the runtime wakes it and how busy its worker
//!   threads are. Once it runs later than `admission.max_runtime_lag_ms` three times in a row
//!   with work pending (one late wake-up is a stall, not overload), or the workers are busy for
//!   `admission.max_runtime_busy_percent` of every 100 ms interval for a second with more
//!   pending than a second's worth of finished activities (a runtime that never parks has more
//!   work than CPU), new activities get 503 (`overloaded`) with Retry-After until that ends: a
//!   refusal costs a fraction of a turn, so the backlog drains instead of growing.
//!
//! - *Requests waiting to run*: past the machine's capacity with many clients at once, requests
//!   wait in front of the router before anything queues inside it: its request-serving tasks
//!   wait longer and longer to run once woken (a [`WaitMeter`] wraps them). A controller (PIE,
//!   RFC 8033) turns that wait, every 10 ms, into the share of new activities to refuse (503
//!   `overloaded` + Retry-After): the share grows while the mean wait stays above
//!   `admission.target_request_wait_ms` and falls back when it is under. Workers that are merely
//!   saturated do not count: a client that sends as fast as it is answered keeps them busy with a
//!   short queue and loses nothing by it.
//!
//! - *Activities arriving late*: a sender that delivers a conversation's activities one at a
//!   time (as the Bot Connector does) holds the excess in its own queues, in front of the
//!   router, which then never sees more than one request per conversation and no wait of its own.
//!   What it sees is their age: each activity carries the `timestamp` the channel stamped when
//!   the user sent it (only those that came with a verified token are measured). Its excess over the least age of the last two minutes (the clocks' offset
//!   and the network's own delay: LEDBAT's base delay, RFC 6817) is the time it queued before it
//!   reached the router; the mean excess over each 10 ms is the arrival delay. While the workers
//!   are busy (a third of the time or more, over about a second), a second PIE controller turns
//!   that delay into a share of new activities to refuse, with `admission.target_arrival_delay_ms`
//!   as its target (the larger of the two shares is refused), and activities more than twice the
//!   target late are refused outright while the delay is over the target or such stale ones are
//!   many: the end-to-end tail sits in the few conversations whose queues hold them, which a share
//!   spread over all conversations drains only slowly (CoDel drops by sojourn time for the same
//!   reason). A router with little to do never sheds on it: then the delay is not its doing (a
//!   slow upstream, a stepped clock).
//!
//! The request path touches one atomic per bound and one sharded map lookup; no lock is shared by
//! all requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdmissionConfig;

/// Why an activity was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The router as a whole has as much pending work as it takes.
    Global,
    /// This integration has as much pending work as it may have.
    Integration,
    /// The activity arrived too late to be answered in time while arrivals are late.
    Stale,
}

pub struct Gate {
    config: AdmissionConfig,
    /// The runtime lag probe found the runtime late: new activities are shed.
    lagging: AtomicBool,
    /// The share of new activities refused for the wait of requests to run, out of
    /// `u32::MAX` (0: none).
    shed_share: AtomicU32,
    waits: Arc<WaitMeter>,
    arrivals: ArrivalMeter,
    /// Stale activities are refused: the workers are busy and activities arrive later than the
    /// target, or many are stale.
    refusing_stale: AtomicBool,
    pending: Arc<AtomicUsize>,
    /// Activities finished since the start (read by the probe for the rate the backlog drains).
    finished: Arc<AtomicU64>,
    turns: Arc<Semaphore>,
    integrations: DashMap<Arc<str>, Arc<IntegrationLoad>>,
}

struct IntegrationLoad {
    pending: AtomicUsize,
    turns: Arc<Semaphore>,
}

/// One admitted activity's place; given back when dropped.
pub struct Ticket {
    global: Arc<AtomicUsize>,
    finished: Arc<AtomicU64>,
    load: Arc<IntegrationLoad>,
    turns: Arc<Semaphore>,
}

/// A running turn's places among the turns in flight; given back when dropped.
pub struct TurnPermit {
    _integration: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Gate {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            lagging: AtomicBool::new(false),
            shed_share: AtomicU32::new(0),
            waits: Arc::new(WaitMeter::default()),
            arrivals: ArrivalMeter::new(
                Duration::from_millis(config.target_arrival_delay_ms) * ARRIVAL_CAP_TARGETS,
                Duration::from_millis(config.target_arrival_delay_ms) * STALE_TARGETS,
            ),
            refusing_stale: AtomicBool::new(false),
            pending: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicU64::new(0)),
            turns: Arc::new(Semaphore::new(config.max_turns_in_flight.max(1))),
            integrations: DashMap::new(),
            config,
        }
    }

    /// Takes a place for one activity of `integration`, or says which bound is reached.
    pub fn admit(&self, integration: &Arc<str>) -> Result<Ticket, Refusal> {
        if self.lagging.load(Ordering::Relaxed) {
            return Err(Refusal::Global);
        }
        let share = self.shed_share.load(Ordering::Relaxed);
        if share != 0 && rand::random::<u32>() < share {
            return Err(Refusal::Global);
        }
        let load = self.load(integration);
        if load.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending_per_integration {
            load.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Integration);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.config.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            load.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Global);
        }
        Ok(Ticket {
            global: Arc::clone(&self.pending),
            finished: Arc::clone(&self.finished),
            load,
            turns: Arc::clone(&self.turns),
        })
    }

    /// Notes an activity that arrived stamped `timestamp` (its `timestamp` field), admitted or
    /// not: how late activities arrive is what the arrival delay is read from.
    ///
    /// `true`: the activity is stale, to be refused. While activities arrive later than the
    /// target with the workers busy, one later than twice the target over the usual is past the
    /// time it could be answered in; the
    /// backlog that makes the end-to-end tail sits in the few conversations with such activities
    /// queued on the sender's side, which a share of refusals spread over all conversations
    /// drains only slowly (CoDel drops by sojourn time for the same reason).
    pub fn note_arrival(&self, timestamp: Option<&str>) -> bool {
        if self.config.target_arrival_delay_ms == 0 {
            return false;
        }
        self.arrivals.note(timestamp, crate::clock::system_now())
            && self.refusing_stale.load(Ordering::Relaxed)
    }

    /// What the request-serving tasks wait to run: the listener wraps them with it.
    pub fn waits(&self) -> Arc<WaitMeter> {
        Arc::clone(&self.waits)
    }

    /// Measures, until `stop` is set, how late the runtime runs a task that asks to be woken
    /// every few milliseconds, how busy its workers are and how long requests wait to run, and
    /// sheds new activities while the first two are past their bound
    /// (`admission.max_runtime_lag_ms`, `admission.max_runtime_busy_percent`), and a share of
    /// them by the third (`admission.target_request_wait_ms`) and by how late activities arrive
    /// while the workers are saturated (`admission.target_arrival_delay_ms`); 0 turns a bound
    /// off.
    pub async fn watch_runtime(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let lag_bound = Duration::from_millis(self.config.max_runtime_lag_ms);
        let busy_bound = self.config.max_runtime_busy_percent as f64 / 100.0;
        let wait_target = Duration::from_millis(self.config.target_request_wait_ms);
        let arrival_target = Duration::from_millis(self.config.target_arrival_delay_ms);
        if lag_bound.is_zero()
            && busy_bound == 0.0
            && wait_target.is_zero()
            && arrival_target.is_zero()
        {
            return;
        }
        let mut waits = WaitReading::default();
        let mut shed = ShedController::new(wait_target);
        let mut arrivals = (!arrival_target.is_zero()).then(|| ArrivalWatch::new(arrival_target));
        let mut lag = LagWatch::default();
        let mut load = LoadWatch::default();
        let mut busy = BusyMeter::new(tokio::runtime::Handle::current().metrics());
        let mut ticks: u32 = 0;
        let mut finished_before = self.finished.load(Ordering::Relaxed);
        loop {
            let asked = crate::clock::now();
            tokio::select! {
                _ = tokio::time::sleep(PROBE_PERIOD) => {}
                _ = stop.changed() => return,
            }
            let pending = self.pending();
            let late_by = asked.elapsed().saturating_sub(PROBE_PERIOD);
            if !lag_bound.is_zero() {
                lag.observe(late_by > lag_bound, pending);
            }
            // The probe is a task woken too: with no request served in the interval (a runtime
            // starved of CPU), its own lateness is the wait.
            let wait = waits.mean_since_last(&self.waits).max(late_by);
            let (by_arrivals, refusing_stale) = match &mut arrivals {
                Some(watch) => watch.period(&self.arrivals, busy.smoothed_ratio),
                None => (0.0, false),
            };
            self.refusing_stale.store(refusing_stale, Ordering::Relaxed);
            if !wait_target.is_zero() || arrivals.is_some() {
                let by_wait = if wait_target.is_zero() {
                    0.0
                } else {
                    shed.update(wait)
                };
                let share = (by_wait.max(by_arrivals) * f64::from(u32::MAX)) as u32;
                if self.shed_share.swap(share, Ordering::Relaxed) != share {
                    metrics::gauge!(crate::telemetry::SHED_SHARE)
                        .set(f64::from(share) / f64::from(u32::MAX));
                }
            }
            ticks += 1;
            if ticks.is_multiple_of(TICKS_PER_INTERVAL) {
                metrics::gauge!(crate::telemetry::REQUEST_WAIT).set(waits.interval_mean());
                if let Some(watch) = &mut arrivals {
                    watch.end_interval();
                    metrics::gauge!(crate::telemetry::ARRIVAL_DELAY).set(watch.delay.as_secs_f64());
                }
                let ratio = busy.ratio_since_last();
                metrics::gauge!(crate::telemetry::RUNTIME_BUSY).set(ratio);
                let finished = self.finished.load(Ordering::Relaxed);
                let finished_in_interval = finished.saturating_sub(finished_before);
                finished_before = finished;
                if busy_bound > 0.0 {
                    load.observe(ratio >= busy_bound, pending, finished_in_interval);
                }
            }
            let shedding = lag.shedding || load.shedding;
            if self.lagging.swap(shedding, Ordering::Relaxed) != shedding {
                metrics::gauge!(crate::telemetry::RUNTIME_SHEDDING).set(if shedding {
                    1.0
                } else {
                    0.0
                });
                if shedding {
                    tracing::warn!(
                        lag_ms = late_by.as_millis() as u64,
                        busy_percent = (busy.last_ratio * 100.0).round() as u64,
                        pending,
                        "the runtime has more work than it can run: new activities are shed"
                    );
                }
            }
        }
    }

    #[cfg(test)]
    fn set_lagging(&self, lagging: bool) {
        self.lagging.store(lagging, Ordering::Relaxed);
    }

    /// Activities admitted and not finished, over all integrations.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Forgets integrations with nothing admitted (deleted ones among them), so the map holds
    /// only integrations with work. A load some ticket still holds is kept; the next activity
    /// of a forgotten integration starts a fresh one, at zero as the forgotten one was.
    pub fn forget_idle(&self) {
        self.integrations
            .retain(|_, load| Arc::strong_count(load) > 1);
    }

    /// Integrations with an admission entry (for tests).
    pub fn tracked_integrations(&self) -> usize {
        self.integrations.len()
    }

    fn load(&self, integration: &Arc<str>) -> Arc<IntegrationLoad> {
        if let Some(load) = self.integrations.get(integration) {
            return Arc::clone(load.value());
        }
        let per_integration = self.config.max_turns_in_flight_per_integration.max(1);
        Arc::clone(
            self.integrations
                .entry(Arc::clone(integration))
                .or_insert_with(|| {
                    Arc::new(IntegrationLoad {
                        pending: AtomicUsize::new(0),
                        turns: Arc::new(Semaphore::new(per_integration)),
                    })
                })
                .value(),
        )
    }
}

/// An activity this many targets over the usual age is stale: refused while the workers are busy
/// and activities arrive later than the target, or many are stale.
const STALE_TARGETS: u32 = 2;

/// An activity's age counts at most this many targets over the base: a redelivery long after
/// its first delivery (Teams' own, or one this router refused) is not a queue that long.
const ARRIVAL_CAP_TARGETS: u32 = 4;

/// Workers busy for at least this share of the time (averaged over about a second) are doing the
/// work that falls behind: late arrivals are then read as the router's backlog; with less, they
/// are not its doing (a slow upstream, a stepped clock). Not higher: a router starved of CPU
/// (other processes on its cores) reads a third to a half busy while requests queue, since a
/// worker waiting for the CPU with events to handle counts as parked.
const BUSY_ENOUGH: f64 = 0.3;

/// How late activities arrive, read by the probe every period: the least age (the router's
/// wall clock minus the activity's `timestamp`), from which the base is kept, and the mean of
/// each age's excess over that base, capped so that one redelivery long after its first
/// delivery does not weigh as a queue. Shared atomics, added to by every stamped activity.
pub struct ArrivalMeter {
    least_age_ms: AtomicI64,
    /// The base the probe last found (`i64::MAX`: none yet).
    base_ms: AtomicI64,
    cap_ms: i64,
    /// Ages over the base past this are stale.
    stale_ms: i64,
    excess_sum_ms: AtomicU64,
    excess_count: AtomicU64,
    stale_count: AtomicU64,
}

/// One period's arrivals.
#[derive(Debug, PartialEq)]
struct ArrivalReading {
    least_age_ms: Option<i64>,
    mean_excess: Option<Duration>,
    /// Activities measured against the base, and the stale among them.
    measured: u64,
    stale: u64,
}

impl ArrivalMeter {
    /// Ages further from now than this either way are not a queue's (a stamp from a test
    /// fixture, a clock far off); Teams' own redeliveries come within a minute.
    const PLAUSIBLE_AGE_MS: u64 = 5 * 60 * 1000;

    /// A meter counting no age more than `cap` over the base, and those over `stale` as stale.
    fn new(cap: Duration, stale: Duration) -> Self {
        Self {
            stale_ms: i64::try_from(stale.as_millis()).unwrap_or(i64::MAX),
            stale_count: AtomicU64::new(0),
            least_age_ms: AtomicI64::new(i64::MAX),
            base_ms: AtomicI64::new(i64::MAX),
            cap_ms: i64::try_from(cap.as_millis()).unwrap_or(i64::MAX),
            excess_sum_ms: AtomicU64::new(0),
            excess_count: AtomicU64::new(0),
        }
    }

    /// Notes an activity stamped `timestamp`, arrived at `now`, and says whether it is stale; an
    /// absent stamp, or one that is not RFC 3339 in UTC (as Teams writes it), says nothing.
    fn note(&self, timestamp: Option<&str>, now: std::time::SystemTime) -> bool {
        let Some(sent) = timestamp.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
            return false;
        };
        let age_ms = match now.duration_since(sent) {
            Ok(age) => i64::try_from(age.as_millis()).unwrap_or(i64::MAX),
            Err(ahead) => -i64::try_from(ahead.duration().as_millis()).unwrap_or(i64::MAX),
        };
        if age_ms.unsigned_abs() > Self::PLAUSIBLE_AGE_MS {
            return false;
        }
        if age_ms < self.least_age_ms.load(Ordering::Relaxed) {
            self.least_age_ms.fetch_min(age_ms, Ordering::Relaxed);
        }
        let base = self.base_ms.load(Ordering::Relaxed);
        if base == i64::MAX {
            return false;
        }
        let excess = age_ms.saturating_sub(base).max(0);
        self.excess_sum_ms
            .fetch_add(excess.min(self.cap_ms).unsigned_abs(), Ordering::Relaxed);
        self.excess_count.fetch_add(1, Ordering::Relaxed);
        let stale = excess > self.stale_ms;
        if stale {
            self.stale_count.fetch_add(1, Ordering::Relaxed);
        }
        stale
    }

    /// What arrived since the last call.
    fn take(&self) -> ArrivalReading {
        let least = self.least_age_ms.swap(i64::MAX, Ordering::Relaxed);
        let sum = self.excess_sum_ms.swap(0, Ordering::Relaxed);
        let count = self.excess_count.swap(0, Ordering::Relaxed);
        ArrivalReading {
            least_age_ms: (least != i64::MAX).then_some(least),
            mean_excess: sum.checked_div(count).map(Duration::from_millis),
            measured: count,
            stale: self.stale_count.swap(0, Ordering::Relaxed),
        }
    }

    fn set_base(&self, base_ms: i64) {
        self.base_ms.store(base_ms, Ordering::Relaxed);
    }
}

/// What the probe makes of how late activities arrive, period after period: the base every age
/// is measured from (handed back to the meter), the arrival delay, the share of activities to
/// refuse for it and whether stale ones are refused.
struct ArrivalWatch {
    target: Duration,
    base: BaseAge,
    /// The mean excess of the last period with arrivals.
    delay: Duration,
    stale: StaleCount,
    controller: ShedController,
}

impl ArrivalWatch {
    fn new(target: Duration) -> Self {
        Self {
            target,
            base: BaseAge::default(),
            delay: Duration::ZERO,
            stale: StaleCount::default(),
            controller: ShedController::new(target),
        }
    }

    /// One probe period, with the workers `busy` (smoothed) for that share of the time: the
    /// share of new activities to refuse, and whether stale ones are refused.
    fn period(&mut self, meter: &ArrivalMeter, busy: f64) -> (f64, bool) {
        self.base.advance();
        let arrived = meter.take();
        self.stale.add(&arrived);
        if let Some(least_age) = arrived.least_age_ms {
            meter.set_base(self.base.observe(least_age));
        }
        if let Some(mean_excess) = arrived.mean_excess {
            self.delay = mean_excess;
        }
        // Late arrivals with workers to spare are not the router's doing.
        let busy = busy >= BUSY_ENOUGH;
        let late = if busy { self.delay } else { Duration::ZERO };
        // Stale activities are refused at once, they are past their time already, once late
        // arrivals are general or stale ones many: not a lone redelivery.
        let refusing_stale = busy && (late > self.target || self.stale.backlogged());
        (self.controller.update(late), refusing_stale)
    }

    /// A 100 ms interval ended.
    fn end_interval(&mut self) {
        self.stale.end_interval();
    }
}

/// Stale arrivals per 100 ms interval: many of them (not a lone redelivery, nor a stall's
/// moment) interval after interval are a backlog on the sender's side even when most arrivals
/// are on time.
#[derive(Default)]
struct StaleCount {
    measured: u64,
    stale: u64,
    /// Complete intervals in a row with many stale arrivals.
    stale_intervals: u32,
}

impl StaleCount {
    /// Stale arrivals in an interval that make a backlog: at least this many, and at least one
    /// in [`Self::MIN_SHARE`].
    const MIN_STALE: u64 = 10;
    const MIN_SHARE: u64 = 100;
    /// Intervals in a row that make a backlog.
    const INTERVALS: u32 = 3;

    fn add(&mut self, reading: &ArrivalReading) {
        self.measured += reading.measured;
        self.stale += reading.stale;
    }

    fn end_interval(&mut self) {
        let many = self.stale >= Self::MIN_STALE && self.stale * Self::MIN_SHARE >= self.measured;
        self.stale_intervals = if many {
            self.stale_intervals.saturating_add(1)
        } else {
            0
        };
        (self.measured, self.stale) = (0, 0);
    }

    fn backlogged(&self) -> bool {
        self.stale_intervals >= Self::INTERVALS
    }
}

/// The least arrival age of the last two minutes, in buckets of 10 s so that it follows a clock
/// that drifts: the part of every age no queue adds.
struct BaseAge {
    buckets: [i64; Self::BUCKETS],
    current: usize,
    periods_in_bucket: u32,
}

impl Default for BaseAge {
    fn default() -> Self {
        Self {
            buckets: [i64::MAX; Self::BUCKETS],
            current: 0,
            periods_in_bucket: 0,
        }
    }
}

impl BaseAge {
    const BUCKETS: usize = 12;
    /// Probe periods per bucket (10 s).
    const PERIODS_PER_BUCKET: u32 = 1_000;

    /// One probe period passed: past a bucket's span, the oldest bucket is forgotten.
    fn advance(&mut self) {
        self.periods_in_bucket += 1;
        if self.periods_in_bucket >= Self::PERIODS_PER_BUCKET {
            self.current = (self.current + 1) % Self::BUCKETS;
            self.buckets[self.current] = i64::MAX;
            self.periods_in_bucket = 0;
        }
    }

    /// Takes in one probe period's least age; the base after it.
    fn observe(&mut self, least_age_ms: i64) -> i64 {
        let bucket = &mut self.buckets[self.current];
        *bucket = (*bucket).min(least_age_ms);
        self.buckets.iter().copied().min().unwrap_or(least_age_ms)
    }
}

/// The probe asks to be woken this often.
const PROBE_PERIOD: Duration = Duration::from_millis(10);
/// Busy shares are measured over this many probe periods (100 ms).
const TICKS_PER_INTERVAL: u32 = 10;

/// Late wake-ups of the probe: one is a stall (a blocking call, a pause of the machine), not
/// overload, so shedding starts after several in a row, with work pending.
#[derive(Default)]
struct LagWatch {
    late_in_a_row: u32,
    shedding: bool,
}

impl LagWatch {
    const LATE_IN_A_ROW: u32 = 3;

    fn observe(&mut self, late: bool, pending: usize) {
        self.late_in_a_row = if late { self.late_in_a_row + 1 } else { 0 };
        self.shedding = self.late_in_a_row >= Self::LATE_IN_A_ROW && pending > 0;
    }
}

/// Busy intervals of the workers: a burst keeps them busy for a moment and drains; overload
/// keeps them busy second after second with more pending than they finish in a second.
#[derive(Default)]
struct LoadWatch {
    busy_in_a_row: u32,
    /// Activities finished over the busy run so far.
    finished_in_run: u64,
    shedding: bool,
}

impl LoadWatch {
    /// A second of busy intervals in a row.
    const BUSY_IN_A_ROW: u32 = 10;
    /// Shedding starts when what is pending would take longer than this to finish at the rate
    /// the busy run finished activities (the latency a newcomer would wait, end to end).
    const MAX_BACKLOG: Duration = Duration::from_secs(1);

    fn observe(&mut self, busy: bool, pending: usize, finished_in_interval: u64) {
        if !busy || pending == 0 {
            *self = Self::default();
            return;
        }
        if self.shedding {
            // Refusals are cheap: workers that stay busy while shedding still have more work
            // than CPU; once they park, admission resumes.
            return;
        }
        self.busy_in_a_row += 1;
        self.finished_in_run += finished_in_interval;
        let run = PROBE_PERIOD * TICKS_PER_INTERVAL * self.busy_in_a_row;
        let per_second = self.finished_in_run as f64 / run.as_secs_f64();
        let backlog_secs = pending as f64 / per_second.max(1.0);
        self.shedding = self.busy_in_a_row >= Self::BUSY_IN_A_ROW
            && backlog_secs >= Self::MAX_BACKLOG.as_secs_f64();
    }
}

/// How long tasks wrapped by [`WaitMeter::measure`] waited to run once woken: their total and
/// how many waits, since the start.
#[derive(Default)]
pub struct WaitMeter {
    total_nanos: AtomicU64,
    waits: AtomicU64,
}

impl WaitMeter {
    /// `future`, measured each time it is woken until it is polled. tokio-metrics'
    /// `TaskMonitor` measures this among a dozen other figures, each a shared atomic written on
    /// every poll; the request path needs this one.
    pub fn measure<F: Future + Unpin>(self: &Arc<Self>, future: F) -> Measured<F> {
        let stamp = Arc::new(WakeStamp {
            // The first poll waits too: a new connection's task queues behind the others.
            woken_at: AtomicU64::new(stamp_now()),
            task: futures_util::task::AtomicWaker::new(),
        });
        Measured {
            future,
            waker: Waker::from(Arc::clone(&stamp)),
            stamp,
            meter: Arc::clone(self),
        }
    }

    fn record(&self, waited_nanos: u64) {
        self.total_nanos.fetch_add(waited_nanos, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }
}

/// A future whose waits to run are added to a [`WaitMeter`].
pub struct Measured<F> {
    future: F,
    stamp: Arc<WakeStamp>,
    /// Wakes `stamp`: handed to `future` in place of the task's own.
    waker: Waker,
    meter: Arc<WaitMeter>,
}

struct WakeStamp {
    /// When the task was first woken since it last ran (nanoseconds from [`stamp_now`]'s
    /// origin; 0: not woken).
    woken_at: AtomicU64,
    task: futures_util::task::AtomicWaker,
}

impl Wake for WakeStamp {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let _ =
            self.woken_at
                .compare_exchange(0, stamp_now(), Ordering::Relaxed, Ordering::Relaxed);
        self.task.wake();
    }
}

impl<F: Future + Unpin> Future for Measured<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let woken_at = this.stamp.woken_at.swap(0, Ordering::Relaxed);
        if woken_at != 0 {
            this.meter.record(stamp_now().saturating_sub(woken_at));
        }
        this.stamp.task.register(cx.waker());
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&this.waker))
    }
}

/// Nanoseconds of the router's clock since the first call, never 0.
fn stamp_now() -> u64 {
    static ORIGIN: std::sync::OnceLock<crate::clock::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(crate::clock::now);
    u64::try_from(
        crate::clock::now()
            .saturating_duration_since(origin)
            .as_nanos(),
    )
    .unwrap_or(u64::MAX)
    .max(1)
}

/// The mean wait of a [`WaitMeter`] between two readings.
#[derive(Default)]
struct WaitReading {
    total_nanos: u64,
    waits: u64,
    /// Over the current 100 ms interval, for the gauge.
    interval_nanos: u64,
    interval_waits: u64,
}

impl WaitReading {
    fn mean_since_last(&mut self, meter: &WaitMeter) -> Duration {
        let total = meter.total_nanos.load(Ordering::Relaxed);
        let waits = meter.waits.load(Ordering::Relaxed);
        let (nanos, count) = (
            total.saturating_sub(self.total_nanos),
            waits.saturating_sub(self.waits),
        );
        (self.total_nanos, self.waits) = (total, waits);
        self.interval_nanos += nanos;
        self.interval_waits += count;
        Duration::from_nanos(nanos.checked_div(count).unwrap_or(0))
    }

    /// The mean wait in seconds since the last call, which starts a new interval.
    fn interval_mean(&mut self) -> f64 {
        let mean = self
            .interval_nanos
            .checked_div(self.interval_waits)
            .unwrap_or(0);
        (self.interval_nanos, self.interval_waits) = (0, 0);
        Duration::from_nanos(mean).as_secs_f64()
    }
}

/// PIE (RFC 8033) on the wait of requests to run: every update moves the share of activities to
/// refuse by how far the wait is from the target and how fast it grows. Small shares move in
/// smaller steps (a burst adds little; a standing queue compounds), large ones at most 2 % an
/// update; nothing is refused in the first 150 ms above the target, nor while the wait is under
/// half the target and the share under 20 %.
struct ShedController {
    target: f64,
    share: f64,
    last_wait: f64,
    /// Updates with the wait above the target since it was last calm (at the target or under,
    /// with nothing refused): in a row until shedding starts, which then goes on until calm.
    congested: u32,
}

impl ShedController {
    /// RFC 8033's gains, per second of wait: α on the distance from the target, β on its change.
    const ALPHA: f64 = 0.125;
    const BETA: f64 = 1.25;

    fn new(target: Duration) -> Self {
        Self {
            target: target.as_secs_f64(),
            share: 0.0,
            last_wait: 0.0,
            congested: 0,
        }
    }

    /// Updates of a wait above the target before anything is refused (RFC 8033's burst
    /// allowance: 150 ms at one update every 10 ms).
    const BURST_ALLOWANCE: u32 = 15;

    /// The share of new activities to refuse after a wait of `wait` over the last period.
    fn update(&mut self, wait: Duration) -> f64 {
        let wait = wait.as_secs_f64();
        let mut step = Self::ALPHA * (wait - self.target) + Self::BETA * (wait - self.last_wait);
        step /= match self.share {
            s if s < 0.001 => 32.0,
            s if s < 0.01 => 8.0,
            s if s < 0.1 => 2.0,
            _ => 1.0,
        };
        if self.share >= 0.1 {
            step = step.min(0.02);
        }
        self.share += step;
        let calm = self.target / 2.0;
        if wait < calm && self.last_wait < calm {
            self.share *= 0.98;
        }
        self.share = self.share.clamp(0.0, 1.0);
        self.last_wait = wait;
        self.congested = if wait > self.target {
            self.congested.saturating_add(1)
        } else if self.share == 0.0 {
            0
        } else {
            self.congested
        };
        if (wait < calm && self.share < 0.2) || self.congested < Self::BURST_ALLOWANCE {
            0.0
        } else {
            self.share
        }
    }
}

/// The share of wall time the runtime's workers spent running tasks (not parked, not waiting
/// for I/O events) since the last reading.
struct BusyMeter {
    metrics: tokio::runtime::RuntimeMetrics,
    at: crate::clock::Instant,
    busy: Duration,
    last_ratio: f64,
    /// The ratio averaged over about a second (exponentially, a fifth per reading).
    smoothed_ratio: f64,
}

impl BusyMeter {
    fn new(metrics: tokio::runtime::RuntimeMetrics) -> Self {
        let busy = Self::total_busy(&metrics);
        Self {
            metrics,
            at: crate::clock::now(),
            busy,
            last_ratio: 0.0,
            smoothed_ratio: 0.0,
        }
    }

    fn total_busy(metrics: &tokio::runtime::RuntimeMetrics) -> Duration {
        (0..metrics.num_workers())
            .map(|worker| metrics.worker_total_busy_duration(worker))
            .sum()
    }

    fn ratio_since_last(&mut self) -> f64 {
        let now = crate::clock::now();
        let busy = Self::total_busy(&self.metrics);
        let capacity = now.saturating_duration_since(self.at).as_secs_f64()
            * self.metrics.num_workers().max(1) as f64;
        self.last_ratio = if capacity > 0.0 {
            (busy.saturating_sub(self.busy).as_secs_f64() / capacity).min(1.0)
        } else {
            0.0
        };
        self.at = now;
        self.busy = busy;
        self.smoothed_ratio += (self.last_ratio - self.smoothed_ratio) / 5.0;
        self.last_ratio
    }
}

impl Ticket {
    /// Waits for a place among the turns in flight: the integration's own first, so that an
    /// integration at its bound does not hold places of the global one while it waits.
    pub async fn turn_permit(&self) -> Option<TurnPermit> {
        let integration = Arc::clone(&self.load.turns).acquire_owned().await.ok()?;
        let global = Arc::clone(&self.turns).acquire_owned().await.ok()?;
        Some(TurnPermit {
            _integration: integration,
            _global: global,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::AcqRel);
        self.global.fetch_sub(1, Ordering::AcqRel);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max_pending: usize, per_integration: usize, turns: usize) -> Gate {
        Gate::new(AdmissionConfig {
            max_pending,
            max_pending_per_integration: per_integration,
            max_turns_in_flight: turns,
            max_turns_in_flight_per_integration: turns,
            max_runtime_lag_ms: 500,
            max_runtime_busy_percent: 95,
            target_request_wait_ms: 20,
            target_arrival_delay_ms: 20,
        })
    }

    #[test]
    fn arrival_ages_are_read_from_teams_timestamps() {
        let meter = ArrivalMeter::new(Duration::from_millis(2_000), Duration::from_millis(1_000));
        let at = |t: &str| humantime::parse_rfc3339(t).expect("time");
        let now = at("2026-11-30T04:15:10Z");
        let nothing = ArrivalReading {
            least_age_ms: None,
            mean_excess: None,
            measured: 0,
            stale: 0,
        };
        assert_eq!(meter.take(), nothing);
        for stamp in [
            Some("2026-11-30T04:15:07.1234567Z"),
            Some("2026-11-30T04:15:09.5Z"),
            Some("2026-11-30T04:15:08Z"),
            // Not a queue's: no stamp, another shape, a fixture's, a clock far ahead.
            None,
            Some("yesterday"),
            Some("2026-11-30T05:15:09.9+01:00"),
            Some("2017-03-30T18:59:12.9150474Z"),
            Some("2026-11-30T05:15:10Z"),
        ] {
            meter.note(stamp, now);
        }
        // No base yet: only the least age is read.
        let first = ArrivalReading {
            least_age_ms: Some(500),
            mean_excess: None,
            measured: 0,
            stale: 0,
        };
        assert_eq!(meter.take(), first);
        assert_eq!(meter.take(), nothing, "each reading starts anew");

        meter.set_base(500);
        let stale: Vec<bool> = [
            "2026-11-30T04:15:09.5Z",
            "2026-11-30T04:15:09.3Z",
            "2026-11-30T04:15:09.6Z",
            // A redelivery a minute later counts as the cap (2 s) over the base; it is stale.
            "2026-11-30T04:14:10Z",
        ]
        .iter()
        .map(|stamp| meter.note(Some(stamp), now))
        .collect();
        assert_eq!(stale, [false, false, false, true]);
        let late = ArrivalReading {
            least_age_ms: Some(400),
            mean_excess: Some(Duration::from_millis(2_200 / 4)),
            measured: 4,
            stale: 1,
        };
        assert_eq!(meter.take(), late);
        // A clock behind the sender's reads a negative age, which the base takes in.
        meter.note(Some("2026-11-30T04:15:10.25Z"), now);
        assert_eq!(meter.take().least_age_ms, Some(-250));
    }

    #[test]
    fn the_base_is_the_least_age_of_the_last_two_minutes() {
        let mut base = BaseAge::default();
        // A sender whose clock is 3 s ahead: ages read -3,000 ms and up.
        assert_eq!(base.observe(-2_990), -2_990);
        assert_eq!(base.observe(-3_000), -3_000);
        assert_eq!(base.observe(-2_600), -3_000);
        // The least age is forgotten two minutes (12 buckets of 10 s) later, when a new one
        // (the clock drifted by 100 ms) takes its place.
        for _ in 0..BaseAge::PERIODS_PER_BUCKET * (BaseAge::BUCKETS as u32 - 1) {
            base.advance();
        }
        assert_eq!(base.observe(-2_900), -3_000, "still there after 110 s");
        for _ in 0..BaseAge::PERIODS_PER_BUCKET {
            base.advance();
        }
        assert_eq!(
            base.observe(-2_800),
            -2_900,
            "the 110 s old least is the base"
        );
        for _ in 0..BaseAge::PERIODS_PER_BUCKET * BaseAge::BUCKETS as u32 {
            base.advance();
        }
        assert_eq!(base.observe(-2_700), -2_700);
    }

    #[test]
    fn many_stale_arrivals_interval_after_interval_are_a_backlog() {
        let reading = |measured, stale| ArrivalReading {
            least_age_ms: Some(0),
            mean_excess: Some(Duration::ZERO),
            measured,
            stale,
        };
        let mut count = StaleCount::default();
        // A lone redelivery, then a stall's moment: no backlog.
        for (measured, stale) in [(10, 1), (1_000, 400), (1_000, 0)] {
            count.add(&reading(measured, stale));
            count.end_interval();
            assert!(!count.backlogged());
        }
        // Too few, or too small a share, interval after interval: none either.
        for (measured, stale) in [(100, 9), (5_000, 40), (100, 9)] {
            count.add(&reading(measured, stale));
            count.end_interval();
            assert!(!count.backlogged());
        }
        // Three intervals in a row with at least 10 and 1 %: a backlog, until one has few.
        for interval in 0..3 {
            assert!(!count.backlogged(), "{interval}");
            count.add(&reading(500, 6));
            count.add(&reading(500, 6));
            count.end_interval();
        }
        assert!(count.backlogged());
        count.add(&reading(1_000, 2));
        count.end_interval();
        assert!(!count.backlogged());
    }

    #[test]
    fn stale_activities_are_refused_only_while_arrivals_are_late() {
        let gate = Arc::new(gate(100, 100, 10));
        let stamp =
            humantime::format_rfc3339_millis(crate::clock::system_now() - Duration::from_secs(30))
                .to_string();
        gate.arrivals.set_base(0);
        assert!(!gate.note_arrival(Some(&stamp)), "nothing is late: taken");
        gate.refusing_stale.store(true, Ordering::Relaxed);
        assert!(
            gate.note_arrival(Some(&stamp)),
            "30 s late while arrivals are: refused"
        );
        let fresh = humantime::format_rfc3339_millis(crate::clock::system_now()).to_string();
        assert!(!gate.note_arrival(Some(&fresh)));
        assert!(!gate.note_arrival(None));
    }

    /// Stamps `count` activities `age` old at `now`.
    fn arrive(meter: &ArrivalMeter, now: std::time::SystemTime, age: Duration, count: usize) {
        let stamp = humantime::format_rfc3339_millis(now - age).to_string();
        for _ in 0..count {
            meter.note(Some(&stamp), now);
        }
    }

    /// `periods` probe periods of `count` arrivals `age` old each, with the workers `busy`; the
    /// last period's share and whether stale activities were refused then.
    fn run_periods(
        watch: &mut ArrivalWatch,
        meter: &ArrivalMeter,
        (age, count, busy): (Duration, usize, f64),
        periods: u32,
    ) -> (f64, bool) {
        let now = std::time::SystemTime::now();
        let mut last = (0.0, false);
        for period in 1..=periods {
            arrive(meter, now, age, count);
            last = watch.period(meter, busy);
            if period.is_multiple_of(TICKS_PER_INTERVAL) {
                watch.end_interval();
            }
        }
        last
    }

    #[test]
    fn a_busy_router_sheds_late_arrivals_and_refuses_stale_ones_an_idle_one_does_not() {
        let target = Duration::from_millis(500);
        let meter = ArrivalMeter::new(target * ARRIVAL_CAP_TARGETS, target * STALE_TARGETS);
        let mut watch = ArrivalWatch::new(target);
        let ms = Duration::from_millis;
        // On time: the base (20 ms of network and clocks) is learned; nothing refused.
        assert_eq!(
            run_periods(&mut watch, &meter, (ms(20), 50, 0.9), 100),
            (0.0, false)
        );
        assert_eq!(watch.delay, ms(0));
        // Two seconds late at an idle router: not its doing.
        assert_eq!(
            run_periods(&mut watch, &meter, (ms(2_020), 50, 0.1), 100),
            (0.0, false)
        );
        assert_eq!(watch.delay, ms(2_000));
        // The same at a busy one: stale ones are refused at once, and a share once it stands.
        assert!(run_periods(&mut watch, &meter, (ms(2_020), 50, 0.9), 1).1);
        let (share, refusing_stale) = run_periods(&mut watch, &meter, (ms(2_020), 50, 0.9), 50);
        assert!(share > 0.1 && refusing_stale, "{share}");
        // On time again: stale ones are taken once the interval ends, the share falls back.
        run_periods(&mut watch, &meter, (ms(20), 50, 0.9), TICKS_PER_INTERVAL);
        assert!(!run_periods(&mut watch, &meter, (ms(20), 50, 0.9), 1).1);
        let (share, _) = run_periods(&mut watch, &meter, (ms(20), 50, 0.9), 300);
        assert_eq!(share, 0.0);
        // A few stale among many on time (redeliveries, a stall's moment): taken; many of them
        // interval after interval: a backlog, refused.
        let now = std::time::SystemTime::now();
        for period in 1..=TICKS_PER_INTERVAL * 3 {
            arrive(&meter, now, ms(20), 99);
            arrive(&meter, now, ms(5_020), usize::from(period % 10 == 0));
            assert!(!watch.period(&meter, 0.9).1);
            if period.is_multiple_of(TICKS_PER_INTERVAL) {
                watch.end_interval();
            }
        }
        for period in 1..=TICKS_PER_INTERVAL * 3 {
            arrive(&meter, now, ms(20), 50);
            arrive(&meter, now, ms(5_020), 2);
            assert!(!watch.period(&meter, 0.9).1, "{period}");
            if period.is_multiple_of(TICKS_PER_INTERVAL) {
                watch.end_interval();
            }
        }
        arrive(&meter, now, ms(20), 50);
        assert!(
            watch.period(&meter, 0.9).1,
            "20 stale of 520 in each of three intervals: a backlog"
        );
    }

    #[test]
    fn late_arrivals_shed_a_share_only_once_they_stand() {
        let ms = Duration::from_millis;
        let mut controller = ShedController::new(ms(250));
        // A second of arrivals 400 ms late, then on time again.
        let late: Vec<f64> = (0..100).map(|_| controller.update(ms(400))).collect();
        assert!(late[..14].iter().all(|s| *s == 0.0), "{late:?}");
        assert!(late[99] > 0.05, "{late:?}");
        let calm: Vec<f64> = (0..300).map(|_| controller.update(ms(0))).collect();
        assert_eq!(calm[299], 0.0, "{calm:?}");
    }

    #[test]
    fn the_shed_share_follows_a_standing_wait_not_a_burst() {
        let target = Duration::from_millis(20);
        let ms = Duration::from_millis;

        let mut burst = ShedController::new(target);
        let during: Vec<f64> = (0..5).map(|_| burst.update(ms(100))).collect();
        let after: Vec<f64> = (0..20).map(|_| burst.update(ms(1))).collect();
        assert!(
            during.iter().all(|share| *share < 0.01),
            "50 ms of a deep queue sheds almost nothing: {during:?}"
        );
        assert!(
            after.iter().all(|share| *share == 0.0),
            "and nothing once the wait is short again: {after:?}"
        );

        let mut overload = ShedController::new(target);
        let shares: Vec<f64> = (0..30).map(|_| overload.update(ms(200))).collect();
        assert!(shares.windows(2).all(|w| w[1] >= w[0]), "{shares:?}");
        assert!(
            shares[29] > 0.3,
            "300 ms of a 200 ms wait sheds a third and more: {shares:?}"
        );
        // Shedding brings the wait under the target: the share falls back to nothing.
        let calm: Vec<f64> = (0..300).map(|_| overload.update(ms(2))).collect();
        assert!(calm.windows(2).all(|w| w[1] <= w[0]), "{calm:?}");
        assert_eq!(calm[299], 0.0, "{calm:?}");

        let mut at_target = ShedController::new(target);
        let share = (0..500)
            .map(|_| at_target.update(ms(20)))
            .fold(0.0, f64::max);
        assert!(share < 0.001, "a wait at the target is kept: {share}");
    }

    #[test]
    fn a_share_of_activities_is_refused() {
        let gate = gate(100_000, 100_000, 10);
        gate.shed_share.store(u32::MAX / 4, Ordering::Relaxed);
        let refused = (0..4_000)
            .filter(|_| gate.admit(&Arc::from("a")).map(drop).is_err())
            .count();
        assert!((700..1_300).contains(&refused), "{refused} of 4,000");
        gate.shed_share.store(0, Ordering::Relaxed);
        assert!((0..1_000).all(|_| gate.admit(&Arc::from("a")).map(drop).is_ok()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_measured_task_counts_how_long_it_waited_to_run() {
        let meter = Arc::new(WaitMeter::default());
        let (wake, woken) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(meter.measure(Box::pin(woken)));
        tokio::task::yield_now().await;
        let first_polls = meter.waits.load(Ordering::Relaxed);
        let _ = wake.send(());
        // Woken, but the one thread is busy here: the task waits.
        std::thread::sleep(Duration::from_millis(30));
        let _ = task.await;
        let waits = meter.waits.load(Ordering::Relaxed);
        let total = Duration::from_nanos(meter.total_nanos.load(Ordering::Relaxed));
        assert_eq!(first_polls, 1, "the first poll is a wait too");
        assert_eq!(waits, 2, "one wake, one wait");
        assert!(total >= Duration::from_millis(30), "{total:?}");
        assert!(total < Duration::from_secs(5), "{total:?}");
    }

    #[test]
    fn a_late_runtime_sheds_everyone_until_it_catches_up() {
        let gate = gate(10, 10, 10);
        gate.set_lagging(true);
        assert_eq!(gate.admit(&Arc::from("a")).err(), Some(Refusal::Global));
        assert_eq!(gate.pending(), 0);
        gate.set_lagging(false);
        assert!(gate.admit(&Arc::from("a")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_sheds_while_the_runtime_is_late() {
        let gate = Arc::new(gate(10, 10, 10));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let probe = tokio::spawn(Arc::clone(&gate).watch_runtime(stopped));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pending = gate.admit(&Arc::from("a")).expect("on time: admitted");
        // The clock jumps past the probe's wake-up by more than the bound, as it does for a
        // runtime too busy to run it on time.
        let late = || async {
            tokio::task::yield_now().await;
            tokio::time::advance(Duration::from_millis(600)).await;
            tokio::task::yield_now().await;
        };
        late().await;
        let after_one_stall = gate.admit(&Arc::from("a")).map(drop).err();
        late().await;
        late().await;
        let overloaded = gate.admit(&Arc::from("a")).map(drop).err();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let caught_up = gate.admit(&Arc::from("a")).is_ok();
        drop(pending);
        for _ in 0..3 {
            late().await;
        }
        let idle_but_late = gate.admit(&Arc::from("a")).map(drop).err();
        let _ = stop.send(true);
        let _ = probe.await;
        assert_eq!(after_one_stall, None, "one stall: still admitted");
        assert_eq!(
            overloaded,
            Some(Refusal::Global),
            "late again and again: shed"
        );
        assert!(caught_up, "caught up: admitted again");
        assert_eq!(idle_but_late, None, "nothing pending: nothing to shed for");
    }

    #[test]
    fn busy_workers_shed_only_past_a_second_of_backlog() {
        // 100 ms intervals; 1,000 activities a second finish (100 an interval).
        let mut burst = LoadWatch::default();
        for pending in [500, 800, 900, 600, 400, 300, 200, 100, 50] {
            burst.observe(true, pending, 100);
        }
        burst.observe(false, 10, 100);
        assert!(
            !burst.shedding,
            "a burst shorter than a second is not overload"
        );

        let mut keeping_up = LoadWatch::default();
        for _ in 0..30 {
            keeping_up.observe(true, 400, 100);
        }
        assert!(
            !keeping_up.shedding,
            "busy, but what is pending finishes in under a second"
        );

        let mut overloaded = LoadWatch::default();
        for i in 0..9 {
            overloaded.observe(true, 600 + 100 * i, 100);
        }
        assert!(!overloaded.shedding, "not a full second yet");
        overloaded.observe(true, 1_500, 100);
        assert!(
            overloaded.shedding,
            "a second busy, 1.5 s of work pending: shed"
        );
        overloaded.observe(true, 700, 100);
        assert!(
            overloaded.shedding,
            "still busy: still shedding while it drains"
        );
        overloaded.observe(false, 600, 100);
        assert!(!overloaded.shedding, "the workers parked: admitting again");

        let mut idle = LoadWatch::default();
        for _ in 0..20 {
            idle.observe(true, 0, 0);
        }
        assert!(
            !idle.shedding,
            "busy with nothing pending is not ours to shed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_busy_meter_reads_a_worker_that_does_not_park() {
        let mut meter = BusyMeter::new(tokio::runtime::Handle::current().metrics());
        tokio::spawn(async {
            let until = std::time::Instant::now() + Duration::from_millis(200);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        })
        .await
        .expect("spinning task");
        // The worker submits its figures when it parks.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let busy = meter.ratio_since_last();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = meter.ratio_since_last();
        assert!(busy > 0.7, "spinning for 200 ms read as {busy:.2} busy");
        assert!(idle < 0.3, "sleeping for 200 ms read as {idle:.2} busy");
    }

    #[test]
    fn an_integration_at_its_bound_leaves_room_for_the_others() {
        let gate = gate(5, 2, 10);
        let hot: Arc<str> = "hot".into();
        let calm: Arc<str> = "calm".into();
        let a = gate.admit(&hot).unwrap();
        let _b = gate.admit(&hot).unwrap();
        assert_eq!(gate.admit(&hot).err(), Some(Refusal::Integration));
        let _c = gate.admit(&calm).unwrap();
        assert_eq!(gate.pending(), 3);
        drop(a);
        let _d = gate
            .admit(&hot)
            .expect("a finished activity gives its place back");
        assert_eq!(
            gate.pending(),
            3,
            "the refused and the dropped ticket hold no place"
        );
    }

    #[test]
    fn the_global_bound_refuses_everyone_until_work_finishes() {
        let gate = gate(2, 2, 10);
        let tickets: Vec<_> = ["a", "b"]
            .iter()
            .map(|id| gate.admit(&Arc::from(*id)).unwrap())
            .collect();
        assert_eq!(gate.admit(&Arc::from("c")).err(), Some(Refusal::Global));
        drop(tickets);
        assert_eq!(gate.pending(), 0);
        assert_eq!(
            gate.finished.load(Ordering::Relaxed),
            2,
            "finished activities are counted for the busy gate's backlog estimate; refusals are not"
        );
        assert!(gate.admit(&Arc::from("c")).is_ok());
    }

    #[test]
    fn idle_integrations_are_forgotten_and_busy_ones_kept() {
        let gate = gate(10, 10, 10);
        let busy = gate.admit(&Arc::from("busy")).unwrap();
        drop(gate.admit(&Arc::from("deleted")).unwrap());
        assert_eq!(gate.tracked_integrations(), 2);
        gate.forget_idle();
        assert_eq!(gate.tracked_integrations(), 1);
        drop(busy);
        assert_eq!(gate.pending(), 0);
        gate.forget_idle();
        assert_eq!(gate.tracked_integrations(), 0);
        assert!(gate.admit(&Arc::from("busy")).is_ok());
    }

    #[tokio::test]
    async fn turns_in_flight_wait_for_a_place() {
        let gate = gate(10, 10, 1);
        let id: Arc<str> = "x".into();
        let first = gate.admit(&id).unwrap();
        let second = gate.admit(&id).unwrap();
        let running = first.turn_permit().await.unwrap();
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), second.turn_permit()).await;
        assert!(
            waiting.is_err(),
            "the second turn waits while the first runs"
        );
        drop(running);
        assert!(second.turn_permit().await.is_some());
    }
}
