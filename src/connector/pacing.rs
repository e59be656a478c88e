//! Outbound pacing to Teams' documented limits (protocol.md §3.4), so that a burst is smoothed
//! instead of answered with 429s. Teams counts sends in sliding windows: per bot and conversation
//! 7 in 1 s, 8 in 2 s, 60 in 30 s and 1,800 in an hour; per bot app and tenant 50 in 1 s. A token
//! bucket can honour one window exactly but a set of windows only by giving up most of the short
//! windows' burst or the long windows' rate (a 500-message burst would take twice as long), so
//! each key keeps the times of its recent sends, and a send waits until every window of its
//! conversation and of its app has room: the fastest schedule Teams accepts.
//!
//! A send is counted from when it is admitted until its request is finished, and then at the time
//! it finished: Teams sees a request when it arrives, which is never after it finished, so the
//! router's count of any window is never below Teams' own. Admission is atomic over both keys.
//! At most `max_queued` sends of one bot (app and tenant) wait at once; beyond that its next send
//! is refused at once, so memory stays bounded when Teams is slower than the bot, and one bot's
//! backlog never refuses another bot's sends.
//!
//! Several routers on one Redis share each app-and-tenant budget by their [`Share`] of the
//! partitions: an instance holding `h` of `P` partitions sends at most `count * h / P` (rounded
//! down) in each app window, so that together they stay within Teams' limit without a round trip
//! per send. A conversation's sends come from the holder of its partition alone, so its own
//! windows stay local.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::clock::Instant;

use dashmap::DashMap;
use metrics::gauge;
use parking_lot::Mutex;

use crate::telemetry::CONNECTOR_QUEUE_DEPTH;

/// A limit: at most `count` sends in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub window: Duration,
    pub count: usize,
}

/// The sends of one key (a conversation, or an app in a tenant).
#[derive(Default)]
struct Log {
    /// Finish times of sends within the longest window, oldest first.
    finished: VecDeque<Instant>,
    /// Sends admitted and not finished yet (they count in every window).
    in_flight: usize,
    /// Sends of this key waiting for room (bounded per bot: the app key's count).
    waiting: usize,
    /// A send under the whole budget (live traffic) was admitted: the log is kept for its
    /// longest window. A conversation only background work wrote to (a broadcast's one copy)
    /// is forgotten once its short windows are over.
    live: bool,
}

impl Log {
    /// When one more send fits every limit: `None` for now, else the earliest time to try again.
    /// O(1) per limit: the finish times are in order, so a window is full exactly when the
    /// `count - in_flight`-th most recent finish is still inside it.
    fn room(
        &mut self,
        limits: &[Limit],
        share: Fraction,
        margin: Duration,
        now: Instant,
    ) -> Option<Instant> {
        let longest = limits.iter().map(|l| l.window).max().unwrap_or_default() + SAFETY_MARGIN;
        while self
            .finished
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= longest)
        {
            self.finished.pop_front();
        }
        let mut retry_at: Option<Instant> = None;
        for limit in limits {
            // Teams counts a request when it arrives; a margin absorbs what the network and a
            // busy machine add between that and the router's own clock readings.
            let window = limit.window + margin;
            let at = match share.of(limit.count).checked_sub(self.in_flight) {
                // Sends still in flight leave a window only after they finish: look again soon.
                None | Some(0) => now + IN_FLIGHT_POLL,
                Some(finishes_allowed) => {
                    let Some(index) = self.finished.len().checked_sub(finishes_allowed) else {
                        continue;
                    };
                    let edge = self.finished[index];
                    if now.saturating_duration_since(edge) >= window {
                        continue;
                    }
                    // The window has room again when that send has left it.
                    edge + window
                }
            };
            retry_at = Some(retry_at.map_or(at, |r| r.max(at)));
        }
        retry_at
    }

    /// Records a finished send, keeping the finish times in order (two permits may be dropped
    /// on two threads in the other order than they read the clock).
    fn finish(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let at = self.finished.back().map_or(now, |last| now.max(*last));
        self.finished.push_back(at);
    }

    fn is_idle(&self, limits: &[Limit], now: Instant) -> bool {
        let longest = limits.iter().map(|l| l.window).max().unwrap_or_default() + SAFETY_MARGIN;
        self.in_flight == 0
            && self.waiting == 0
            && self
                .finished
                .back()
                .is_none_or(|t| now.saturating_duration_since(*t) >= longest)
    }
}

/// The part of a budget this instance may use.
#[derive(Debug, Clone, Copy)]
struct Fraction {
    part: u32,
    /// 0: the whole budget.
    whole: u32,
}

impl Fraction {
    const WHOLE: Self = Self { part: 0, whole: 0 };

    /// `percent` of this fraction.
    fn scaled(self, percent: u32) -> Self {
        if percent >= 100 {
            return self;
        }
        if self.whole == 0 {
            return Self {
                part: percent,
                whole: 100,
            };
        }
        Self {
            part: self.part.saturating_mul(percent),
            whole: self.whole.saturating_mul(100),
        }
    }

    /// At least one send per window, so that no send waits for ever.
    fn of(self, count: usize) -> usize {
        if self.whole == 0 {
            return count;
        }
        let part = u64::from(self.part.min(self.whole));
        let scaled = (count as u64).saturating_mul(part) / u64::from(self.whole);
        usize::try_from(scaled).unwrap_or(count).max(1)
    }
}

/// This instance's share of every app-and-tenant budget: the partitions it holds out of all of
/// them (with the embedded store, or a Redis store not yet partitioned, the whole budget).
/// A share shrinks at once and grows only once the sends of the partitions' previous holder have
/// left Teams' windows, so that the shares of all instances never add up to more than the whole.
pub struct Share {
    held: AtomicU32,
    /// Live instances when last seen: an instance holding no partition yet (starting, or with
    /// Redis unreachable, running turns unrecorded) sends one such share.
    instances: AtomicU32,
    /// Held for less than the longest app window: not counted yet.
    maturing: Arc<AtomicU32>,
    partitions: AtomicU32,
    maturity: Duration,
}

impl Share {
    fn new(maturity: Duration) -> Self {
        Self {
            held: AtomicU32::new(0),
            instances: AtomicU32::new(1),
            maturing: Arc::new(AtomicU32::new(0)),
            partitions: AtomicU32::new(0),
            maturity,
        }
    }

    /// From now on the budget is shared by `partitions` partitions.
    pub fn partitioned(&self, partitions: u16) {
        self.partitions
            .store(u32::from(partitions), Ordering::Release);
    }

    pub fn set_instances(&self, live: usize) {
        self.instances.store(
            u32::try_from(live.max(1)).unwrap_or(u32::MAX),
            Ordering::Release,
        );
    }

    /// `taken` partitions are being taken from a holder that may have sent for them within the
    /// window: they count only once that has passed (call before [`Self::set_held`] counts them).
    pub fn taking(&self, taken: usize) {
        let taken = u32::try_from(taken).unwrap_or(u32::MAX);
        if taken == 0 {
            return;
        }
        self.maturing.fetch_add(taken, Ordering::AcqRel);
        let maturing = Arc::clone(&self.maturing);
        let maturity = self.maturity;
        tokio::spawn(async move {
            tokio::time::sleep(maturity).await;
            maturing.fetch_sub(taken, Ordering::AcqRel);
        });
    }

    /// `held` partitions now.
    pub fn set_held(&self, held: usize) {
        self.held
            .store(u32::try_from(held).unwrap_or(u32::MAX), Ordering::Release);
    }

    fn fraction(&self) -> Fraction {
        let whole = self.partitions.load(Ordering::Acquire);
        let part = self
            .held
            .load(Ordering::Acquire)
            .saturating_sub(self.maturing.load(Ordering::Acquire));
        if part == 0 && whole > 0 {
            return Fraction {
                part: 1,
                whole: self.instances.load(Ordering::Acquire).max(1),
            };
        }
        Fraction { part, whole }
    }
}

/// Added to every window.
const SAFETY_MARGIN: Duration = Duration::from_millis(100);

/// Windows up to this long are the ones a conversation's log is kept for when only background
/// work wrote to it.
const SHORT_WINDOW: Duration = Duration::from_secs(2);

/// How soon a send blocked only by sends in flight looks again.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(20);

pub struct Pacer {
    conversation_limits: Vec<Limit>,
    app_limits: Vec<Limit>,
    /// Per bot app and tenant: its own log and its conversations' logs. Found by borrowed keys
    /// (no key is built per send), each map sharded (no lock shared by all conversations).
    apps: DashMap<AppKey, Arc<AppLogs>>,
    waiting: AtomicUsize,
    max_queued: usize,
    share: Arc<Share>,
}

#[derive(Default)]
struct AppLogs {
    log: Arc<Mutex<Log>>,
    conversations: DashMap<String, Arc<Mutex<Log>>>,
}

/// A bot app in a tenant, as a map key that can be looked up by a pair of `&str`.
#[derive(PartialEq, Eq, Hash)]
struct AppKey {
    app_id: String,
    tenant: String,
}

/// The borrowed form of [`AppKey`].
trait AppKeyRef {
    fn app_id(&self) -> &str;
    fn tenant(&self) -> &str;
}

impl AppKeyRef for AppKey {
    fn app_id(&self) -> &str {
        &self.app_id
    }
    fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl AppKeyRef for (&str, &str) {
    fn app_id(&self) -> &str {
        self.0
    }
    fn tenant(&self) -> &str {
        self.1
    }
}

impl<'a> std::borrow::Borrow<dyn AppKeyRef + 'a> for AppKey {
    fn borrow(&self) -> &(dyn AppKeyRef + 'a) {
        self
    }
}

// Hashes as `AppKey`'s derived `Hash` does (field by field), so that both forms find one entry.
impl std::hash::Hash for dyn AppKeyRef + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.app_id().hash(state);
        self.tenant().hash(state);
    }
}

impl PartialEq for dyn AppKeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.app_id() == other.app_id() && self.tenant() == other.tenant()
    }
}

impl Eq for dyn AppKeyRef + '_ {}

#[derive(Debug, thiserror::Error)]
#[error("{0} outbound activities of this bot are already waiting for Teams' rate limits")]
pub struct QueueFull(pub usize);

/// An admitted send; dropping it records the send as finished now.
pub struct Permit {
    logs: [Arc<Mutex<Log>>; 2],
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = crate::clock::now();
        for log in &self.logs {
            log.lock().finish(now);
        }
    }
}

/// Counts a waiting send in its bot's queue and the queue depth while it lives.
struct Waiting<'a> {
    pacer: &'a Pacer,
    app: Arc<Mutex<Log>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut app = self.app.lock();
        app.waiting = app.waiting.saturating_sub(1);
        drop(app);
        let left = self.pacer.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        gauge!(CONNECTOR_QUEUE_DEPTH).set(left as f64);
    }
}

impl Pacer {
    pub fn new(conversation_limits: Vec<Limit>, app_limits: Vec<Limit>, max_queued: usize) -> Self {
        let longest = app_limits
            .iter()
            .map(|l| l.window)
            .max()
            .unwrap_or_default();
        Self {
            share: Arc::new(Share::new(longest + SAFETY_MARGIN)),
            conversation_limits,
            app_limits,
            apps: DashMap::new(),
            waiting: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// The logs of `conversation` and of its app in its tenant; allocates only for a new key.
    fn logs(&self, app_id: &str, tenant: &str, conversation: &str) -> [Arc<Mutex<Log>>; 2] {
        let key: &dyn AppKeyRef = &(app_id, tenant);
        let app = match self.apps.get(key) {
            Some(app) => Arc::clone(app.value()),
            None => Arc::clone(
                self.apps
                    .entry(AppKey {
                        app_id: app_id.to_owned(),
                        tenant: tenant.to_owned(),
                    })
                    .or_default()
                    .value(),
            ),
        };
        let conversation_log = match app.conversations.get(conversation) {
            Some(log) => Arc::clone(log.value()),
            None => Arc::clone(
                app.conversations
                    .entry(conversation.to_owned())
                    .or_default()
                    .value(),
            ),
        };
        [conversation_log, Arc::clone(&app.log)]
    }

    /// Admits the send if both windows have room now (the app's window up to `percent` of this
    /// instance's share of it).
    fn try_admit(
        &self,
        logs: &[Arc<Mutex<Log>>; 2],
        now: Instant,
        percent: u32,
    ) -> Result<(), Instant> {
        // Always conversation first, then app: one lock order, no deadlock.
        let mut conversation = logs[0].lock();
        let mut app = logs[1].lock();
        let wait_conversation = conversation.room(
            &self.conversation_limits,
            Fraction::WHOLE,
            SAFETY_MARGIN,
            now,
        );
        let share = self.share.fraction();
        let wait_app = if percent < 100 {
            // Work held under part of the budget (broadcasts) counts its share in Teams' own
            // windows, so that it reaches it; and it stops short of the whole budget in the
            // windows live traffic is paced on (with their margin), so that a live send finds
            // room even while sends of a second ago are still in those longer windows.
            let own = app.room(&self.app_limits, share.scaled(percent), Duration::ZERO, now);
            let leave_for_live = app.room(
                &self.app_limits,
                share.scaled(percent.midpoint(100)),
                SAFETY_MARGIN,
                now,
            );
            own.max(leave_for_live)
        } else {
            app.room(&self.app_limits, share.scaled(percent), SAFETY_MARGIN, now)
        };
        match (wait_conversation, wait_app) {
            (None, None) => {
                conversation.in_flight += 1;
                conversation.live |= percent >= 100;
                app.in_flight += 1;
                Ok(())
            }
            (a, b) => Err(a.max(b).unwrap_or(now + IN_FLIGHT_POLL)),
        }
    }

    /// Waits until `conversation` of the bot app `app_id` in `tenant` may send one more activity.
    pub async fn admit(
        &self,
        app_id: &str,
        tenant: &str,
        conversation: &str,
    ) -> Result<Permit, QueueFull> {
        self.admit_within(app_id, tenant, conversation, 100).await
    }

    /// Like [`Pacer::admit`], for background work (broadcasts): the app's windows admit it only
    /// while they are under `percent` of their budget, so that live conversations always have
    /// the rest.
    pub async fn admit_within(
        &self,
        app_id: &str,
        tenant: &str,
        conversation: &str,
        percent: u32,
    ) -> Result<Permit, QueueFull> {
        let logs = self.logs(app_id, tenant, conversation);
        if self.try_admit(&logs, crate::clock::now(), percent).is_ok() {
            return Ok(Permit { logs });
        }
        let bot_waiting = {
            let mut app = logs[1].lock();
            app.waiting += 1;
            app.waiting
        };
        let waiting = self.waiting.fetch_add(1, Ordering::AcqRel) + 1;
        let _waiting = Waiting {
            pacer: self,
            app: Arc::clone(&logs[1]),
        };
        if bot_waiting > self.max_queued {
            return Err(QueueFull(self.max_queued));
        }
        gauge!(CONNECTOR_QUEUE_DEPTH).set(waiting as f64);
        loop {
            match self.try_admit(&logs, crate::clock::now(), percent) {
                Ok(()) => return Ok(Permit { logs }),
                Err(retry_at) => tokio::time::sleep_until(retry_at).await,
            }
        }
    }

    /// Admits the send only if it needs no wait (typing indicators: never worth a delay).
    pub fn admit_now(&self, app_id: &str, tenant: &str, conversation: &str) -> Option<Permit> {
        let logs = self.logs(app_id, tenant, conversation);
        self.try_admit(&logs, crate::clock::now(), 100)
            .ok()
            .map(|()| Permit { logs })
    }

    /// Forgets keys whose windows are empty again (conversations quiet for a while).
    pub fn forget_idle(&self) {
        let now = crate::clock::now();
        // A log some send still holds (about to be admitted) is kept: dropping it would let
        // the next send of that key start a fresh log and miss this one.
        let idle = |log: &Arc<Mutex<Log>>, limits: &[Limit]| {
            Arc::strong_count(log) == 1 && log.lock().is_idle(limits, now)
        };
        // A broadcast writes once to each of a million chats: keeping each chat's log for an
        // hour would make its memory grow with its recipients. Such a log is kept for the
        // windows of two seconds and less (the ones one more send could fill); a live send into
        // that chat within the longer windows may then find Teams counting one send more than
        // the router does (a 429, retried), never more than the broadcast's copies.
        let short: Vec<Limit> = self
            .conversation_limits
            .iter()
            .copied()
            .filter(|l| l.window <= SHORT_WINDOW)
            .collect();
        let forgettable = |log: &Arc<Mutex<Log>>| {
            if Arc::strong_count(log) != 1 {
                return false;
            }
            let log = log.lock();
            if log.live {
                log.is_idle(&self.conversation_limits, now)
            } else {
                log.is_idle(&short, now)
            }
        };
        self.apps.retain(|_, app| {
            app.conversations.retain(|_, log| !forgettable(log));
            Arc::strong_count(app) > 1
                || !app.conversations.is_empty()
                || !idle(&app.log, &self.app_limits)
        });
    }

    /// This instance's share of the app-and-tenant budgets (set by the partitions it holds).
    pub fn share(&self) -> Arc<Share> {
        Arc::clone(&self.share)
    }

    /// Keys with a send log (for tests and the upkeep log).
    pub fn tracked(&self) -> usize {
        self.apps
            .iter()
            .map(|app| 1 + app.conversations.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn teams() -> Pacer {
        let ms = Duration::from_millis;
        Pacer::new(
            vec![
                Limit {
                    window: ms(1_000),
                    count: 7,
                },
                Limit {
                    window: ms(2_000),
                    count: 8,
                },
                Limit {
                    window: ms(30_000),
                    count: 60,
                },
                Limit {
                    window: ms(3_600_000),
                    count: 1_800,
                },
            ],
            vec![Limit {
                window: ms(1_000),
                count: 50,
            }],
            100,
        )
    }

    fn max_in_window(times: &[Instant], window: Duration) -> usize {
        times
            .iter()
            .map(|start| {
                times
                    .iter()
                    .filter(|t| **t >= *start && t.duration_since(*start) < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// The windows counted send by send, as the definition says.
    fn room_by_counting(log: &Log, limits: &[Limit], now: Instant) -> Option<Instant> {
        let mut retry_at: Option<Instant> = None;
        for limit in limits {
            let window = limit.window + SAFETY_MARGIN;
            let inside: Vec<Instant> = log
                .finished
                .iter()
                .copied()
                .filter(|t| now.saturating_duration_since(*t) < window)
                .collect();
            let used = inside.len() + log.in_flight;
            if used < limit.count {
                continue;
            }
            let must_leave = used + 1 - limit.count;
            let at = if must_leave <= inside.len() {
                inside[must_leave - 1] + window
            } else {
                now + IN_FLIGHT_POLL
            };
            retry_at = Some(retry_at.map_or(at, |r| r.max(at)));
        }
        retry_at
    }

    #[test]
    fn the_constant_time_check_agrees_with_counting_every_send() {
        let limits = teams().conversation_limits;
        let start = crate::clock::now();
        // A deterministic walk of sends at uneven gaps, with sends in flight now and then.
        let mut seed = 0x2545_f491_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut log = Log::default();
        let mut now = start;
        for _ in 0..5_000 {
            now += Duration::from_millis(next(400));
            log.in_flight = next(3) as usize;
            let expected = room_by_counting(&log, &limits, now);
            assert_eq!(
                log.room(&limits, Fraction::WHOLE, SAFETY_MARGIN, now),
                expected,
                "at {:?}",
                now - start
            );
            if expected.is_none() {
                log.finished.push_back(now);
            }
        }
    }

    #[tokio::test]
    async fn a_burst_in_one_conversation_keeps_within_teams_windows() {
        let pacer = teams();
        let started = crate::clock::now();
        let mut sent = Vec::new();
        for _ in 0..12 {
            let permit = pacer.admit("app", "tenant", "conv").await.unwrap();
            sent.push(crate::clock::now());
            drop(permit);
        }
        assert!(
            max_in_window(&sent, Duration::from_secs(1)) <= 7,
            "{sent:?}"
        );
        assert!(
            max_in_window(&sent, Duration::from_secs(2)) <= 8,
            "{sent:?}"
        );
        // 8 at once, then the 2 s window lets one more through as each of those leaves it.
        assert!(started.elapsed() >= Duration::from_millis(1_990));
        assert!(started.elapsed() < Duration::from_secs(8));
        // Another conversation is not held up.
        let other = crate::clock::now();
        drop(pacer.admit("app", "tenant", "other").await.unwrap());
        assert!(other.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn the_app_window_is_shared_by_its_conversations() {
        let pacer = teams();
        let started = crate::clock::now();
        let mut sent = Vec::new();
        for i in 0..60 {
            let permit = pacer
                .admit("app", "tenant", &format!("c{}", i % 30))
                .await
                .unwrap();
            sent.push(crate::clock::now());
            drop(permit);
        }
        assert!(max_in_window(&sent, Duration::from_secs(1)) <= 50);
        assert!(started.elapsed() >= Duration::from_millis(990));
        // Another app is not held up.
        assert!(pacer.admit_now("other-app", "tenant", "c0").is_some());
    }

    #[tokio::test]
    async fn sends_in_flight_count_and_the_queue_is_bounded() {
        let pacer = Arc::new(Pacer::new(
            vec![Limit {
                window: Duration::from_secs(1),
                count: 1,
            }],
            vec![],
            1,
        ));
        let first = pacer.admit("app", "tenant", "c").await.unwrap();
        assert!(
            pacer.admit_now("app", "tenant", "c").is_none(),
            "in flight counts"
        );
        let waiting = {
            let pacer = Arc::clone(&pacer);
            tokio::spawn(async move { pacer.admit("app", "tenant", "c").await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            pacer.admit("app", "tenant", "c").await.is_err(),
            "queue of one is full"
        );
        drop(first);
        assert!(waiting.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        pacer.forget_idle();
        assert_eq!(pacer.tracked(), 0);
    }

    #[tokio::test]
    async fn a_chat_only_a_broadcast_wrote_to_is_forgotten_after_the_short_windows() {
        let pacer = teams();
        drop(pacer.admit_within("app", "tenant", "broadcast", 80).await);
        drop(pacer.admit("app", "tenant", "live").await);
        assert_eq!(pacer.tracked(), 3, "the app and two conversations");
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        pacer.forget_idle();
        assert_eq!(
            pacer.tracked(),
            2,
            "the live conversation is kept for its hour"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn background_work_leaves_live_traffic_room_while_its_last_second_ages_out() {
        let pacer = Arc::new(teams());
        let background = |tag: &'static str| {
            let pacer = Arc::clone(&pacer);
            async move {
                let mut admitted = Vec::new();
                for i in 0..100 {
                    let conversation = format!("{tag}{i}");
                    match tokio::time::timeout(
                        Duration::from_millis(5),
                        pacer.admit_within("app", "tenant", &conversation, 80),
                    )
                    .await
                    {
                        Ok(Ok(permit)) => admitted.push(permit),
                        _ => break,
                    }
                }
                admitted
            }
        };
        let first = background("a").await;
        assert_eq!(first.len(), 40, "80 % of Teams' 50 a second");
        drop(first);
        // Teams' own second is over, the router's margin not yet.
        tokio::time::sleep(Duration::from_millis(1_030)).await;
        let second = background("b").await;
        assert!(
            second.len() < 10,
            "{} admitted while the last second's 40 are still in the live windows",
            second.len()
        );
        assert!(
            pacer.admit_now("app", "tenant", "live").is_some(),
            "live traffic finds room"
        );
    }

    /// Sends admitted at once for one app in one tenant, one per conversation.
    fn admitted_now(pacer: &Pacer, tag: &str) -> Vec<Permit> {
        (0..100)
            .map_while(|i| pacer.admit_now("app", "tenant", &format!("{tag}{i}")))
            .collect()
    }

    #[tokio::test]
    async fn an_instance_sends_its_share_of_the_app_budget() {
        let pacer = teams();
        pacer.share().partitioned(1_024);
        pacer.share().set_held(342);
        // 50 × 342 / 1,024 = 16.7: three instances holding 342, 341 and 341 send 48 at most.
        assert_eq!(admitted_now(&pacer, "a").len(), 16);

        let pacer = teams();
        pacer.share().partitioned(1_024);
        pacer.share().set_instances(3);
        assert_eq!(
            admitted_now(&pacer, "a").len(),
            16,
            "holding nothing yet: a share of the live instances'"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_just_taken_count_once_their_last_holder_sends_left_the_window() {
        let pacer = teams();
        pacer.share().partitioned(1_024);
        pacer.share().set_held(512);
        pacer.share().taking(512);
        pacer.share().set_held(1_024);
        assert_eq!(admitted_now(&pacer, "a").len(), 25);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(pacer.share().fraction().part, 1_024);
        // Giving partitions up counts at once.
        pacer.share().set_held(100);
        assert_eq!(pacer.share().fraction().part, 100);
    }
}
