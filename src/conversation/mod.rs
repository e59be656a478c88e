//! Conversations: one actor per (integration, `conversation.id`), supervised, running one turn
//! at a time in the order activities were accepted.
//!
//! A conversation's pending turns and its dedup window live in [`Conversation`], shared between
//! the request path (which enqueues) and the actor (which runs turns). They outlive the actor, so
//! a restarted actor picks up every queued activity: a panic loses at most the turn that caused
//! it. The mutex guarding them is per conversation, never shared by all requests.
//!
//! A quiet conversation rests: its actor stops (an actor's floor is kilobytes: four channels and
//! a task) and its session waits beside the queue for the next actor, which the next activity
//! starts. The directory passivates resting conversations once they are quiet for the idle
//! timeout.

mod actor;
pub(crate) mod admission;
pub(crate) mod dedup;
pub(crate) mod session;
mod supervisor;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::Instant;

use crate::activity::TurnActivity;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use metrics::gauge;
use ractor::ActorRef;

use crate::reply::ReplyServices;
use crate::store::Receipt;
use crate::store::writer::{Journal, Snapshots};
use crate::telemetry::{CONVERSATIONS_ACTIVE, CONVERSATIONS_RESTING};
use session::HistoryLimits;

pub use actor::ConversationMsg;
pub use supervisor::{ConversationSupervisor, SupervisorMsg};

/// Limits and behaviour of conversations.
#[derive(Clone)]
pub struct ConversationSettings {
    pub mailbox_capacity: usize,
    pub max_active: usize,
    pub idle_timeout: Duration,
    /// Quiet for this long, a conversation rests: its actor stops, its state stays in memory.
    pub rest_after: Option<Duration>,
    /// Past this many conversations with an actor, a quiet one rests as soon as its turn ends
    /// (`None`: no bound).
    pub max_awake: Option<usize>,
    pub dedup_window: usize,
    pub panic_trigger: Option<String>,
    pub persistence: Arc<Persistence>,
    /// Set past the shutdown's deadline: actors start no more turns of the turn order (under
    /// durable accept the next start runs what is left from the journal).
    pub stopping: Arc<AtomicBool>,
}

/// Where conversations keep what must survive them.
pub struct Persistence {
    pub snapshots: Arc<Snapshots>,
    /// Present under durable accept: answered activities are completed in it.
    pub journal: Option<Arc<Journal>>,
    pub limits: HistoryLimits,
    /// With a shared store: its partitions. Another instance may have moved a conversation on,
    /// so snapshots are read again unless the turn comes under the partition lease they were
    /// read under, and they are written only with a stream entry's fenced acknowledgement.
    pub partitions: Option<Arc<crate::store::partitions::PartitionLog>>,
}

/// One accepted activity waiting for its turn.
pub struct Turn {
    /// The activity, as the request path parsed it.
    pub activity: Box<TurnActivity>,
    pub accepted_at: Instant,
    pub invoke: Option<InvokeReply>,
    /// Where the activity was recorded (durable accept, or a partition's stream).
    pub receipt: Option<Receipt>,
    /// Its place among pending activities (none for activities replayed from the journal).
    pub ticket: Option<admission::Ticket>,
}

/// An activity arriving at its conversation.
pub struct Arrival {
    /// The activity, as the request path parsed it.
    pub activity: Box<TurnActivity>,
    /// An invoke: the request waits for the bot's answer.
    pub is_invoke: bool,
    /// Where it was recorded (durable accept, or a partition's stream).
    pub receipt: Option<Receipt>,
    /// Its place among pending activities (none for activities replayed from the journal).
    pub ticket: Option<admission::Ticket>,
}

pub use crate::backend::{InvokeAnswer, InvokeReply};

/// Invoke answers a conversation keeps for redeliveries of the same invoke.
const REMEMBERED_INVOKES: usize = 16;

/// What happened to an activity offered to its conversation.
pub enum Admission {
    /// Queued; an invoke gets the receiver of its answer.
    Accepted(Option<InvokeAnswer>),
    /// Seen before in this conversation: acknowledged and not run again. A redelivered invoke
    /// gets the original's answer.
    Duplicate(Option<InvokeAnswer>),
    /// The conversation's queue is full.
    MailboxFull,
    /// Too many conversations in memory.
    Overloaded,
}

/// The (integration, conversation id) a conversation is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    pub integration: Arc<str>,
    pub conversation_id: Arc<str>,
}

pub struct Conversation {
    pub key: ConversationKey,
    state: Mutex<ConversationState>,
    /// Told when work is queued for an actor that is not reading its mailbox (an invoke beside
    /// the turn being awaited, any activity while it listens), when a message is cast to a
    /// listening actor, and when the router stops.
    nudge: Nudge,
}

/// A wake-up for the one task that watches it (the conversation's actor): atomic flags and a
/// waker, without the lock and list of waiters a `Notify` keeps, nor the boxed message and the
/// channels of a ractor cast (the actor watches it for every turn it awaits and while it
/// listens).
#[derive(Default)]
struct Nudge {
    /// Work was queued (or the router stops).
    work: AtomicBool,
    /// A message was cast to the actor: a listening actor goes back to its mailbox.
    mail: AtomicBool,
    watcher: futures_util::task::AtomicWaker,
}

impl Nudge {
    fn nudge(&self) {
        self.work.store(true, Ordering::Release);
        self.watcher.wake();
    }

    fn mail(&self) {
        self.mail.store(true, Ordering::Release);
        self.watcher.wake();
    }

    /// Whether it was nudged since the last time it answered true; the task polling it is woken
    /// by the next nudge (or message).
    fn poll_nudged(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.watcher.register(cx.waker());
        take(&self.work)
    }

    /// Whether a message was cast since the last time it answered true (registered as
    /// [`Nudge::poll_nudged`] is).
    fn poll_mail(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.watcher.register(cx.waker());
        take(&self.mail)
    }

    /// The actor is reading its mailbox: what was cast so far is read without a wake-up.
    fn clear_mail(&self) {
        self.mail.store(false, Ordering::Release);
    }
}

/// Clears `flag`, and says whether it was set (a load first: the flag is mostly clear, and a
/// swap would take the cache line for nothing).
fn take(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Acquire) && flag.swap(false, Ordering::AcqRel)
}

struct ConversationState {
    queue: VecDeque<Turn>,
    /// Invokes waiting to run beside the turn order: a card click is answered within Teams'
    /// seconds even while a message turn waits on a slow model.
    side_queue: VecDeque<Turn>,
    /// Invokes running beside the turn order.
    side_running: usize,
    /// The activities taken, and which of them were answered.
    dedup: dedup::DedupWindow,
    /// The live actor; `None` while it is being (re)started, or while the conversation rests.
    actor: Option<ActorRef<ConversationMsg>>,
    /// What the actor held when it stopped to rest, for the next one.
    resting: Option<Box<actor::Resting>>,
    /// A resting conversation's new actor was asked for.
    waking: bool,
    /// Set once the actor has passivated: the conversation takes no more turns.
    closed: bool,
    /// A turn is being run by a reply actor.
    busy: bool,
    /// The actor, idle, awaits its next turn in place (with a nudge, no mailbox message).
    listening: bool,
    last_activity: Instant,
    /// The answers of the latest invokes, by activity id.
    invokes: VecDeque<(Arc<str>, InvokeAnswer)>,
}

impl ConversationState {
    fn invoke_answer(&self, activity_id: &str) -> Option<InvokeAnswer> {
        self.invokes
            .iter()
            .find(|(id, _)| &**id == activity_id)
            .map(|(_, answer)| answer.clone())
    }
}

enum Enqueue {
    /// Queued; the actor to wake through its mailbox (idle in it), or to nudge (listening, or
    /// awaiting a turn while an invoke comes).
    Queued {
        wake: Option<ActorRef<ConversationMsg>>,
        nudge: bool,
    },
    /// Queued in a resting conversation: it needs a new actor.
    QueuedToWake,
    Duplicate(Option<InvokeAnswer>),
    Full,
    /// Passivated: the turn comes back, for the conversation that takes its place.
    Closed(Turn),
}

impl Conversation {
    fn new(key: ConversationKey, settings: &ConversationSettings) -> Self {
        Self {
            key,
            state: Mutex::new(ConversationState {
                queue: VecDeque::new(),
                side_queue: VecDeque::new(),
                side_running: 0,
                dedup: dedup::DedupWindow::new(settings.dedup_window),
                actor: None,
                resting: None,
                waking: false,
                closed: false,
                busy: false,
                listening: false,
                last_activity: crate::clock::now(),
                invokes: VecDeque::new(),
            }),
            nudge: Nudge::default(),
        }
    }

    /// A panic inside a turn poisons nothing we rely on: the state is consistent between
    /// statements, so a poisoned lock is taken over.
    fn state(&self) -> MutexGuard<'_, ConversationState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, activity_id: &str, turn: Turn, capacity: usize) -> Enqueue {
        let mut state = self.state();
        if state.closed {
            return Enqueue::Closed(turn);
        }
        // An entry of a partition's stream is unique there (its id was claimed before it was
        // appended): it is a duplicate only once answered. Taken and not answered, it is one
        // whose turn this instance dropped when the partition's lease lapsed, offered again.
        let seen = if matches!(turn.receipt, Some(Receipt::Stream(_))) {
            state.dedup.is_answered(activity_id)
        } else {
            state.dedup.contains(activity_id)
        };
        if seen {
            return Enqueue::Duplicate(state.invoke_answer(activity_id));
        }
        if state.queue.len() + state.side_queue.len() >= capacity {
            return Enqueue::Full;
        }
        state.dedup.take(activity_id);
        // Only an idle actor needs waking: a busy one takes the next turn when its turn ends,
        // and a non-empty queue already has a wake-up on its way. Under load this spares one
        // cross-thread wake-up per activity.
        let needs_wake = !state.busy && state.queue.is_empty();
        // A listening actor is nudged instead: no message to box, no mailbox to poll.
        let listening = state.listening;
        if let Some(reply) = &turn.invoke {
            if state.invokes.len() == REMEMBERED_INVOKES {
                state.invokes.pop_front();
            }
            state
                .invokes
                .push_back((activity_id.into(), reply.subscribe()));
        }
        state.last_activity = crate::clock::now();
        let wakes_resting = state.resting.is_some() && !state.waking;
        if wakes_resting {
            state.waking = true;
        }
        let turn_is_invoke = turn.invoke.is_some();
        if turn_is_invoke {
            state.side_queue.push_back(turn);
        } else {
            state.queue.push_back(turn);
        }
        if wakes_resting {
            return Enqueue::QueuedToWake;
        }
        if turn_is_invoke {
            // Not behind the running turn: the actor is woken to start it now (nudged too, for
            // an actor awaiting a turn, its mailbox unread until it ends).
            return Enqueue::Queued {
                wake: state.actor.clone().filter(|_| !listening),
                nudge: true,
            };
        }
        Enqueue::Queued {
            wake: state.actor.clone().filter(|_| needs_wake && !listening),
            nudge: needs_wake && listening,
        }
    }

    /// Activities queued or running.
    fn pending(&self) -> usize {
        let state = self.state();
        state.queue.len() + usize::from(state.busy) + state.side_queue.len() + state.side_running
    }
}

/// How many conversations are in memory and how many of them rest without an actor: counted
/// by the directory, read by a quiet actor to know whether it may keep its actor.
#[derive(Default)]
pub(crate) struct Population {
    active: AtomicUsize,
    /// Of the active ones, those resting without an actor.
    resting: AtomicUsize,
}

impl Population {
    /// Conversations with an actor (or one on its way).
    fn awake(&self) -> usize {
        self.active
            .load(Ordering::Relaxed)
            .saturating_sub(self.resting.load(Ordering::Relaxed))
    }
}

/// All conversations in memory, and the door through which activities reach them.
pub struct Directory {
    /// integration id → conversation id → conversation. Lookups by `&str` allocate nothing.
    conversations: DashMap<Box<str>, DashMap<Box<str>, Arc<Conversation>>>,
    population: Arc<Population>,
    settings: ConversationSettings,
    supervisor: ActorRef<SupervisorMsg>,
}

impl Directory {
    /// Starts the supervisor and returns the directory that feeds it.
    pub async fn start(
        settings: ConversationSettings,
        services: Arc<ReplyServices>,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        supervisor::start(settings, services).await
    }

    /// Waits (up to `deadline`) until the snapshots of every turn finished so far are in the
    /// store: a partition is handed to another holder only then, so that it reads them.
    pub async fn snapshots_written(&self, deadline: std::time::Duration) -> bool {
        self.settings
            .persistence
            .snapshots
            .written_so_far(deadline)
            .await
    }

    /// Offers an accepted activity to its conversation, starting the conversation if needed.
    pub fn accept(
        &self,
        integration: &Arc<str>,
        conversation_id: &str,
        activity_id: &str,
        arrival: Arrival,
    ) -> Admission {
        let Arrival {
            activity,
            is_invoke,
            receipt,
            ticket,
        } = arrival;
        let (invoke, reply) = if is_invoke {
            let (tx, rx) = InvokeReply::new();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let mut turn = Turn {
            activity,
            accepted_at: crate::clock::now(),
            invoke,
            receipt,
            ticket,
        };
        // A conversation that passivated between lookup and enqueue is replaced; twice at most.
        for _ in 0..3 {
            let conversation = match self.lookup(integration, conversation_id) {
                Some(c) => c,
                None => match self.create(integration, conversation_id) {
                    Some(c) => c,
                    None => return Admission::Overloaded,
                },
            };
            match conversation.enqueue(activity_id, turn, self.settings.mailbox_capacity) {
                Enqueue::Queued { wake, nudge } => {
                    if let Some(actor) = wake {
                        // A dead actor cannot take the wake-up; its successor drains the queue.
                        let _ = actor.cast(ConversationMsg::Wake);
                    }
                    if nudge {
                        conversation.nudge.nudge();
                    }
                    return Admission::Accepted(reply);
                }
                Enqueue::QueuedToWake => {
                    self.start_actor(&conversation);
                    return Admission::Accepted(reply);
                }
                Enqueue::Duplicate(answer) => return Admission::Duplicate(answer),
                Enqueue::Full => return Admission::MailboxFull,
                Enqueue::Closed(back) => {
                    self.remove(&conversation);
                    turn = back;
                }
            }
        }
        Admission::Overloaded
    }

    /// Offers an activity recorded before (journal, partition stream): it took no place among
    /// pending activities, and is never an invoke.
    pub fn accept_recorded(
        &self,
        integration: &Arc<str>,
        conversation_id: &str,
        activity_id: &str,
        activity: Box<TurnActivity>,
        receipt: Option<Receipt>,
    ) -> Admission {
        self.accept(
            integration,
            conversation_id,
            activity_id,
            Arrival {
                activity,
                is_invoke: false,
                receipt,
                ticket: None,
            },
        )
    }

    /// Whether the conversation has already seen this activity id (a cheap pre-check, so that
    /// a redelivery costs no journal write).
    pub fn seen(&self, integration: &str, conversation_id: &str, activity_id: &str) -> bool {
        self.lookup(integration, conversation_id)
            .is_some_and(|c| c.state().dedup.contains(activity_id))
    }

    /// Whether the conversation has answered this activity id (within its window).
    pub fn answered(&self, integration: &str, conversation_id: &str, activity_id: &str) -> bool {
        self.lookup(integration, conversation_id)
            .is_some_and(|c| c.state().dedup.is_answered(activity_id))
    }

    /// The answer of an invoke the conversation has seen (for a redelivery of it).
    pub fn invoke_answer(
        &self,
        integration: &str,
        conversation_id: &str,
        activity_id: &str,
    ) -> Option<InvokeAnswer> {
        self.lookup(integration, conversation_id)?
            .state()
            .invoke_answer(activity_id)
    }

    fn lookup(&self, integration: &str, conversation_id: &str) -> Option<Arc<Conversation>> {
        self.conversations
            .get(integration)?
            .get(conversation_id)
            .map(|c| Arc::clone(c.value()))
    }

    fn create(&self, integration: &Arc<str>, conversation_id: &str) -> Option<Arc<Conversation>> {
        let per_integration = self
            .conversations
            .entry(integration.as_ref().into())
            .or_default()
            .downgrade();
        let conversation = match per_integration.entry(conversation_id.into()) {
            Entry::Occupied(existing) => return Some(Arc::clone(existing.get())),
            Entry::Vacant(slot) => {
                if self.population.active.fetch_add(1, Ordering::AcqRel) >= self.settings.max_active
                {
                    self.population.active.fetch_sub(1, Ordering::AcqRel);
                    return None;
                }
                let conversation = Arc::new(Conversation::new(
                    ConversationKey {
                        integration: Arc::clone(integration),
                        conversation_id: conversation_id.into(),
                    },
                    &self.settings,
                ));
                slot.insert(Arc::clone(&conversation));
                conversation
            }
        };
        gauge!(CONVERSATIONS_ACTIVE).set(self.population.active.load(Ordering::Acquire) as f64);
        self.start_actor(&conversation);
        Some(conversation)
    }

    /// Counts conversations starting (`1`) or ending (`-n`) a rest.
    fn count_resting(&self, delta: isize) {
        if delta == 0 {
            return;
        }
        let now = if delta > 0 {
            self.population
                .resting
                .fetch_add(delta as usize, Ordering::AcqRel)
                + delta as usize
        } else {
            let by = delta.unsigned_abs();
            self.population
                .resting
                .fetch_sub(by, Ordering::AcqRel)
                .saturating_sub(by)
        };
        gauge!(CONVERSATIONS_RESTING).set(now as f64);
    }

    fn start_actor(&self, conversation: &Arc<Conversation>) {
        if self
            .supervisor
            .cast(SupervisorMsg::Start(Arc::clone(conversation)))
            .is_err()
        {
            tracing::error!("conversation supervisor is gone; the activity waits for a restart");
        }
    }

    /// Passivates the resting conversations quiet for `idle_timeout`: their actors, when they
    /// stopped to rest, handed their snapshots to the writer, so they only leave memory.
    fn passivate_resting(&self) -> usize {
        let idle_timeout = self.settings.idle_timeout;
        let mut quiet = Vec::new();
        for per_integration in self.conversations.iter() {
            for conversation in per_integration.iter() {
                let mut state = conversation.state();
                if state.resting.is_some()
                    && !state.waking
                    && state.actor.is_none()
                    && state.queue.is_empty()
                    && state.side_queue.is_empty()
                    && state.last_activity.elapsed() >= idle_timeout
                {
                    state.closed = true;
                    state.resting = None;
                    quiet.push(Arc::clone(conversation.value()));
                }
            }
        }
        // Removed once no shard of the map is held by the walk above.
        for conversation in &quiet {
            self.remove(conversation);
        }
        self.count_resting(-(quiet.len() as isize));
        quiet.len()
    }

    /// Passivates resting conversations on time, until the directory is dropped.
    fn watch_resting(directory: &Arc<Self>) {
        if directory.settings.rest_after.is_none() {
            return;
        }
        // A resting conversation leaves memory at most a quarter of its idle timeout late.
        let every = (directory.settings.idle_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(10));
        let directory = Arc::downgrade(directory);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(directory) = directory.upgrade() else {
                    return;
                };
                directory.passivate_resting();
            }
        });
    }

    /// Forgets a conversation (only this instance of it: a newer one under the key stays).
    fn remove(&self, conversation: &Arc<Conversation>) {
        let key = &conversation.key;
        let Some(per_integration) = self.conversations.get(key.integration.as_ref()) else {
            return;
        };
        if per_integration
            .remove_if(key.conversation_id.as_ref(), |_, c| {
                Arc::ptr_eq(c, conversation)
            })
            .is_some()
        {
            let now = self
                .population
                .active
                .fetch_sub(1, Ordering::AcqRel)
                .saturating_sub(1);
            gauge!(CONVERSATIONS_ACTIVE).set(now as f64);
        }
    }

    /// Ends every live conversation of a deleted integration: no more turns are taken, queued
    /// ones are dropped by their actor (their integration is gone), and the actors stop. Stored
    /// sessions stay. Returns how many conversations were ended.
    pub fn end_integration(&self, integration: &str) -> usize {
        let Some((_, per_integration)) = self.conversations.remove(integration) else {
            return 0;
        };
        let mut ended = 0;
        let mut were_resting = 0;
        for (_, conversation) in per_integration {
            let actor = {
                let mut state = conversation.state();
                state.closed = true;
                if state.resting.take().is_some() {
                    were_resting += 1;
                }
                state.actor.clone()
            };
            if let Some(actor) = actor {
                let _ = actor.cast(ConversationMsg::End);
                conversation.nudge.mail();
            }
            ended += 1;
        }
        self.count_resting(-were_resting);
        let now = self
            .population
            .active
            .fetch_sub(ended, Ordering::AcqRel)
            .saturating_sub(ended);
        gauge!(CONVERSATIONS_ACTIVE).set(now as f64);
        ended
    }

    /// Activities accepted but not finished, over all conversations (for draining on shutdown).
    pub fn pending(&self) -> usize {
        self.conversations
            .iter()
            .map(|per| per.iter().map(|c| c.pending()).sum::<usize>())
            .sum()
    }

    pub fn active(&self) -> usize {
        self.population.active.load(Ordering::Acquire)
    }

    /// Past the shutdown's deadline: no conversation starts another turn of its turn order,
    /// and each hands its gathered snapshots to the writer now, even one still awaiting a turn
    /// (it stops once that turn ends).
    pub fn stop_taking_turns(&self) {
        self.settings.stopping.store(true, Ordering::Release);
        for per in self.conversations.iter() {
            for conversation in per.iter() {
                conversation.nudge.nudge();
            }
        }
    }

    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }
}
