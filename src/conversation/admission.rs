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
//! - *Runtime lag*: past the machine's capacity, the bounds above are reached only once seconds of
//!   work are queued (in mailboxes, and in the runtime's own queues before a request is even
//!   read). A probe task measures how late the runtime wakes it; once it runs later than
//!   `admission.max_runtime_lag_ms` three times in a row with work pending (one late wake-up is
//!   a stall, not overload), and until it is on time again, new activities get 503 (`overloaded`) with Retry-After: a
//!   refusal costs a fraction of a turn, so the backlog drains instead of growing.
//!
//! The request path touches one atomic per bound and one sharded map lookup; no lock is shared by
//! all requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
}

pub struct Gate {
    config: AdmissionConfig,
    /// The runtime lag probe found the runtime late: new activities are shed.
    lagging: AtomicBool,
    pending: Arc<AtomicUsize>,
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
            pending: Arc::new(AtomicUsize::new(0)),
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
            load,
            turns: Arc::clone(&self.turns),
        })
    }

    /// Measures, until `stop` is set, how late the runtime runs a task that asks to be woken
    /// every few milliseconds, and sheds new activities while it is later than the bound
    /// (`admission.max_runtime_lag_ms`; 0 never sheds on lag).
    pub async fn watch_runtime_lag(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        const PERIOD: Duration = Duration::from_millis(10);
        let bound = Duration::from_millis(self.config.max_runtime_lag_ms);
        if bound.is_zero() {
            return;
        }
        // One late wake-up is a stall (a blocking call, a pause of the machine), not overload:
        // shedding starts after several in a row, with work pending.
        const LATE_IN_A_ROW: u32 = 3;
        let mut late_in_a_row = 0;
        loop {
            let asked = crate::clock::now();
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = stop.changed() => return,
            }
            let lag = asked.elapsed().saturating_sub(PERIOD);
            late_in_a_row = if lag > bound { late_in_a_row + 1 } else { 0 };
            let lagging = late_in_a_row >= LATE_IN_A_ROW && self.pending() > 0;
            if self.lagging.swap(lagging, Ordering::Relaxed) != lagging {
                metrics::gauge!(crate::telemetry::RUNTIME_SHEDDING).set(if lagging {
                    1.0
                } else {
                    0.0
                });
                if lagging {
                    tracing::warn!(
                        lag_ms = lag.as_millis() as u64,
                        "the runtime is running late: new activities are shed"
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
        })
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
        let probe = tokio::spawn(Arc::clone(&gate).watch_runtime_lag(stopped));
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
