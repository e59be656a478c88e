//! The conversation actor: takes the next queued turn, runs it (awaits a plain one itself, with an
//! eye on invokes queued beside it; a streamed one runs in a linked reply actor, an invoke beside
//! the turn order on a task of its own) and takes the next one only when the turn is finished.
//! With nothing queued it listens: it awaits the next activity in place (the request path nudges
//! it, no message) and watches its snapshot window and rest deadline itself, until a message is
//! cast to it or the conversation is quiet enough to rest. It
//! owns the session: loaded from the latest snapshot at the first turn (after a passivation, a
//! panic or on another instance), checked for redeliveries, updated after every turn and handed to
//! the snapshot writer (after every turn, or gathered for `storage.snapshot_sync_ms` with the
//! embedded store and without durable accept, and always before it stops). A quiet actor rests:
//! it stops and leaves what it holds with its conversation in memory, for the next actor; a
//! conversation quiet for the idle timeout passivates (leaves memory).

use crate::clock::Instant;
use std::sync::{Arc, Weak};

use metrics::{counter, histogram};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::admission::TurnPermit;
use super::session::{
    ConversationRecord, Entry, RESET_CONFIRMATION, Role, SESSION_COMMAND, Session, SessionKey,
    conversation_key, is_reset_command, session_key, session_user,
};
use super::{Conversation, ConversationSettings, Directory, Population, Turn};
use crate::activity::TurnActivity;
use crate::backend::{InvokeReply, InvokeResponse};
use crate::registry::Integration;
use crate::reply::{ReplyActor, ReplyArgs, ReplyServices, SentReply, TurnWork};
use crate::store::partitions::SnapshotKind;
use crate::store::{Put, Receipt, now_ms};
use crate::telemetry::{
    ACTIVITIES_DUPLICATE, PARTITION_FENCED, PARTITION_TURNS_DROPPED, SNAPSHOT_FAILURES,
    TURN_DURATION, TURNS_FAILED,
};

#[derive(Debug)]
pub enum ConversationMsg {
    /// A turn was queued (for an actor reading its mailbox; a listening one is nudged).
    Wake,
    /// A turn is done (`ok` false: it panicked).
    TurnFinished {
        turn: u64,
        reply: Option<SentReply>,
        ok: bool,
    },
    /// The idle timer fired; passivate if nothing happened since. Armed only for an actor
    /// going back to its mailbox: a listening one watches the deadline itself.
    IdleCheck,
    /// The turns gathered since the last snapshot are written now (armed likewise).
    FlushSnapshots,
    /// The integration was deleted: finish what is queued (each turn is dropped, since the
    /// integration is gone) and stop.
    End,
}

/// Turn work is boxed where the actor awaits it: an idle actor's task then holds only a small
/// future, not the largest state any turn can reach (this is most of a live conversation's
/// memory when there are hundreds of thousands of them).
pub struct ConversationActor;

pub struct ConversationArgs {
    pub conversation: Arc<Conversation>,
    pub directory: Weak<Directory>,
    pub population: Arc<Population>,
    pub services: Arc<ReplyServices>,
    pub settings: ConversationSettings,
}

/// What a conversation keeps in memory while it rests without an actor: the next actor goes
/// on from it without reading the store.
pub(super) struct Resting {
    session: Option<(SessionKey, Session)>,
    record: Option<(u64, std::time::Duration)>,
    addresses_learned_from: Option<String>,
    loaded_under: Option<String>,
}

/// A turn being run.
struct RunningTurn {
    /// The actor's number for it.
    turn: u64,
    /// The reply actor running it, when it streams.
    reply_actor: Option<ActorId>,
    /// An invoke run beside the turn order.
    side: bool,
    started: Instant,
    activity_id: String,
    receipt: Option<Receipt>,
    /// A session command (`///reset`, `///session`): the router answers it, and neither the
    /// command nor its answer is a turn of the conversation with the bot.
    session_command: bool,
    /// The activity's pending place and the turn's in-flight place: the first is given back
    /// at the turn's end, the second may pass to the conversation's next turn.
    admission: Option<(super::admission::Ticket, Option<TurnPermit>)>,
}

/// Turns one conversation may run in a row on one in-flight place before it queues for a new
/// one. Passing the place on lets a busy conversation drain its mailbox at the pace of its turns
/// instead of queueing behind every other conversation once per activity (which, past the bound
/// of turns in flight, made a hot conversation's latency grow with its backlog); the cap keeps a
/// few busy conversations from holding every place.
const TURNS_PER_PLACE: u32 = 8;

/// Turns of a busy conversation the actor awaits in a row (listening between them) before it
/// reads its mailbox (a message cast to it while it awaits a turn waits for the turn's end).
const TURNS_BEFORE_MAILBOX: u32 = 8;

pub struct ConversationActorState {
    args: ConversationArgs,
    current: Option<RunningTurn>,
    /// Invokes running beside the turn order.
    side: Vec<RunningTurn>,
    /// The session and its key, loaded at the first turn.
    session: Option<(SessionKey, Session)>,
    /// The conversation's turn sequence, loaded at the first turn with its answered activities
    /// (which go into the conversation's dedup window), and how long its record is kept in the
    /// store.
    record: Option<(u64, std::time::Duration)>,
    /// An idle check is scheduled (one at a time, however many turns ran).
    idle_check_armed: bool,
    /// The conversation was ended: stop once nothing is left to run.
    ending: bool,
    /// A snapshot of it found the writer's queue full and was dropped: the conversation stays
    /// in memory (it does not passivate) until its snapshots are queued again.
    unsaved: bool,
    /// The in-flight place of the turn that just ended, kept for the next queued one.
    kept_place: Option<TurnPermit>,
    /// Turns run in a row on the current place (the running one included).
    place_turns: u32,
    /// The number of the last turn started.
    turns_started: u64,
    /// The serviceUrl the address book last learned this conversation from: learning it again
    /// on every turn cost a serialization of its accounts and a hash for nothing new.
    addresses_learned_from: Option<String>,
    /// Turns finished since the last snapshot was handed to the writer (coalescing).
    snapshots_dirty: bool,
    /// A `FlushSnapshots` is on its way.
    flush_armed: bool,
    /// When the gathered snapshots are due at the writer: watched while the actor awaits a turn
    /// or listens, carried by a `FlushSnapshots` while it reads its mailbox.
    flush_due: Option<Instant>,
    /// With a shared store: the partition lease (`run:epoch`) under which the record and session
    /// in memory were read, and every turn since ran here. While turns keep coming under it, no
    /// other instance can have run one, so the store is not read again.
    loaded_under: Option<String>,
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationActorState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let (resting, ended) = {
            let mut state = args.conversation.state();
            state.actor = Some(myself.clone());
            // A predecessor that died mid-turn left the flag set; its turn is over.
            state.busy = false;
            state.listening = false;
            state.side_running = 0;
            state.waking = false;
            (state.resting.take(), state.closed)
        };
        if resting.is_some()
            && let Some(directory) = args.directory.upgrade()
        {
            directory.count_resting(-1);
        }
        let Resting {
            session,
            record,
            addresses_learned_from,
            loaded_under,
        } = resting.map_or(
            Resting {
                session: None,
                record: None,
                addresses_learned_from: None,
                loaded_under: None,
            },
            |resting| *resting,
        );
        Ok(ConversationActorState {
            args,
            current: None,
            side: Vec::new(),
            session,
            record,
            idle_check_armed: false,
            // Woken to rest no more, but its integration was deleted meanwhile.
            ending: ended,
            unsaved: false,
            kept_place: None,
            place_turns: 0,
            turns_started: 0,
            addresses_learned_from,
            snapshots_dirty: false,
            flush_armed: false,
            flush_due: None,
            loaded_under,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Turns queued before this actor existed (or while its predecessor restarted).
        Box::pin(start_side_turns(&myself, state)).await;
        Box::pin(start_next_turn(&myself, state)).await;
        arm_flush(&myself, state);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The mailbox is being read: what was cast so far needs no wake-up of a listener.
        state.args.conversation.nudge.clear_mail();
        match message {
            ConversationMsg::Wake => {
                Box::pin(start_side_turns(&myself, state)).await;
                Box::pin(start_next_turn(&myself, state)).await;
            }
            ConversationMsg::TurnFinished { turn, reply, ok } => {
                if let Some(turn) = take_turn(state, |t| t.turn == turn) {
                    Box::pin(finish_turn(state, turn, reply, ok)).await;
                    Box::pin(start_next_turn(&myself, state)).await;
                }
            }
            ConversationMsg::IdleCheck => rest_or_passivate_if_idle(&myself, state),
            ConversationMsg::FlushSnapshots => {
                state.flush_armed = false;
                flush_snapshots(state);
            }
            ConversationMsg::End => {
                state.ending = true;
                Box::pin(start_next_turn(&myself, state)).await;
            }
        }
        arm_flush(&myself, state);
        Ok(())
    }

    /// Stopped (passivated, ended, or the router is shutting down): nothing gathered is lost.
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        flush_snapshots(state);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A reply actor that stops normally reported `TurnFinished` first; only a failure ends
        // its turn here.
        let SupervisionEvent::ActorFailed(cell, error) = &event else {
            return Ok(());
        };
        let failed = cell.get_id();
        if let Some(turn) = take_turn(state, |t| t.reply_actor == Some(failed)) {
            tracing::error!(integration = %state.args.conversation.key.integration, %error, "turn failed");
            Box::pin(finish_turn(state, turn, None, false)).await;
            Box::pin(start_next_turn(&myself, state)).await;
        }
        Ok(())
    }
}

/// The running turn (in order or beside it) that `is` picks, taken out of the running ones.
fn take_turn(
    state: &mut ConversationActorState,
    is: impl Fn(&RunningTurn) -> bool,
) -> Option<RunningTurn> {
    if state.current.as_ref().is_some_and(&is) {
        return state.current.take();
    }
    let index = state.side.iter().position(is)?;
    Some(state.side.swap_remove(index))
}

/// Ends a turn: history, dedup window, snapshots, journal.
async fn finish_turn(
    state: &mut ConversationActorState,
    mut turn: RunningTurn,
    reply: Option<SentReply>,
    ok: bool,
) {
    if let Some((ticket, permit)) = turn.admission.take() {
        drop(ticket);
        // Only the turn order passes its place on; an invoke beside it gives its place back.
        if !turn.side {
            state.kept_place = permit;
        }
    }
    histogram!(TURN_DURATION).record(turn.started.elapsed().as_secs_f64());
    if !ok {
        counter!(TURNS_FAILED).increment(1);
    }
    let settings = &state.args.settings;
    let persistence = &settings.persistence;
    if let (Some((_, session)), Some(reply), false) =
        (state.session.as_mut(), reply, turn.session_command)
    {
        session.record(
            Entry {
                role: Role::Bot,
                text: &reply.text,
                at_ms: now_ms(),
                id: reply.id.as_deref(),
            },
            persistence.limits,
        );
    }
    if let Some((last_sequence, _)) = state.record.as_mut() {
        *last_sequence += 1;
    }
    state
        .args
        .conversation
        .state()
        .dedup
        .mark_answered(&turn.activity_id);
    // With a shared store the snapshots go with the stream acknowledgement, in one script that
    // a holder which lost the partition cannot run; an invoke run where it was accepted leaves
    // them in memory, for the next acknowledgement of this conversation to write.
    if persistence.partitions.is_none() {
        match persistence.snapshots.coalesce_window() {
            Some(window) => {
                state.snapshots_dirty = true;
                // Watched by the actor while it awaits a turn or listens; a timer message is
                // armed only when it goes back to its mailbox.
                state
                    .flush_due
                    .get_or_insert_with(|| crate::clock::now() + window);
            }
            None => state.unsaved = !save_snapshots(state),
        }
    }
    let snapshots = stream_snapshots(state, turn.receipt.as_ref());
    // A turn of the turn order run unrecorded (Redis down, `storage.on_unavailable = "accept"`)
    // has no acknowledgement to carry its snapshots.
    let unrecorded = persistence.partitions.is_some() && turn.receipt.is_none() && !turn.side;
    let entry = match &turn.receipt {
        Some(Receipt::Stream(entry)) => Some(Arc::clone(entry)),
        _ => None,
    };
    // The next turn starts only once this one is recorded as answered, so a crash can repeat
    // at most the turn in flight.
    let answered = record_answered(persistence, turn.receipt.take(), &snapshots).await;
    // A holder whose lease lapsed (paused, cut off), looked at once the acknowledgement gave
    // up, must not write what it holds the writer's unfenced way: the partition's next holder
    // may have moved the conversation on.
    let still_held = entry.as_ref().is_none_or(|entry| entry.is_current());
    drop(entry);
    if unrecorded || (answered == Answered::Failed && still_held) {
        // Kept in memory until the writer has them (the conversation does not passivate).
        state.unsaved = !save_snapshots(state);
    }
    let mut shared = state.args.conversation.state();
    if turn.side {
        shared.side_running = shared.side_running.saturating_sub(1);
    } else {
        shared.busy = false;
    }
    shared.last_activity = crate::clock::now();
}

/// Starts every invoke waiting beside the turn order.
async fn start_side_turns(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) {
    loop {
        let turn = {
            let mut shared = state.args.conversation.state();
            match shared.side_queue.pop_front() {
                Some(turn) => {
                    shared.side_running += 1;
                    turn
                }
                None => return,
            }
        };
        begin_turn(myself, state, turn, true).await;
    }
}

/// Hands the session and the conversation record to the snapshot writer; `false` when one of
/// them was dropped (queue full).
fn save_snapshots(state: &ConversationActorState) -> bool {
    let persistence = &state.args.settings.persistence;
    let puts = match &persistence.partitions {
        // With a shared store only when a turn could not write them with its acknowledgement
        // (Redis failing): under their keys in the partition's slot.
        Some(log) => {
            let (integration, conversation) = (
                &state.args.conversation.key.integration,
                &state.args.conversation.key.conversation_id,
            );
            let partition = log.partition_of(integration, conversation);
            snapshot_puts(state, |kind, _, owner| {
                log.snapshot_name(partition, kind, integration, owner)
            })
        }
        None => snapshot_puts(state, |_, name, _| name),
    };
    let mut queued = true;
    // Each is saved even when one before it was dropped.
    for put in puts {
        queued &= persistence.snapshots.save(put);
    }
    queued
}

/// The snapshots a turn finishing a stream entry writes with its acknowledgement, in its
/// partition's slot (none for other turns).
fn stream_snapshots(state: &ConversationActorState, receipt: Option<&Receipt>) -> Vec<Put> {
    let (Some(Receipt::Stream(entry)), Some(log)) =
        (receipt, &state.args.settings.persistence.partitions)
    else {
        return Vec::new();
    };
    let partition = entry.partition();
    let integration = &state.args.conversation.key.integration;
    snapshot_puts(state, |kind, _, owner| {
        log.snapshot_key(partition, kind, integration, owner)
    })
}

/// The session and the conversation record, encoded, each under `key_of(kind, the contract's
/// name, the id it belongs to)`.
fn snapshot_puts(
    state: &ConversationActorState,
    key_of: impl Fn(SnapshotKind, String, &str) -> String,
) -> Vec<Put> {
    let conversation_id = &state.args.conversation.key.conversation_id;
    let mut puts = Vec::with_capacity(2);
    let mut push = |encoded: Result<Vec<u8>, crate::store::codec::CodecError>, key, ttl| {
        match encoded {
            Ok(bytes) => puts.push(Put {
                key,
                value: bytes.into(),
                ttl,
            }),
            // Not a queue problem: keeping the conversation in memory would not make it serialize.
            Err(error) => {
                counter!(SNAPSHOT_FAILURES).increment(1);
                tracing::error!(%error, "snapshot does not serialize");
            }
        }
    };
    if let Some((key, session)) = &state.session {
        let ttl = std::time::Duration::from_millis(session.remaining_ms(now_ms()));
        let (kind, owner) = session_owner(key, conversation_id);
        push(session.encode(), key_of(kind, key.name.clone(), owner), ttl);
    }
    if let Some((last_sequence, ttl)) = state.record {
        let name = conversation_key(&state.args.conversation.key.integration, conversation_id);
        let encoded = ConversationRecord::encode_from(
            state.args.conversation.state().dedup.answered(),
            last_sequence,
        );
        push(
            encoded,
            key_of(SnapshotKind::Record, name, conversation_id),
            ttl,
        );
    }
    puts
}

/// Whose session it is: a personal chat's user, else the conversation.
fn session_owner<'a>(key: &'a SessionKey, conversation_id: &'a str) -> (SnapshotKind, &'a str) {
    match &key.user {
        Some(user) => (SnapshotKind::UserSession, user),
        None => (SnapshotKind::ConversationSession, conversation_id),
    }
}

async fn start_next_turn(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) {
    if state.current.is_some() {
        return;
    }
    let mut awaited = 0;
    loop {
        if stopping(state) {
            return;
        }
        let turn = {
            let mut shared = state.args.conversation.state();
            if shared.busy {
                return;
            }
            shared.queue.pop_front().inspect(|_| shared.busy = true)
        };
        let Some(turn) = turn else {
            // Nothing queued: the place goes to another conversation.
            state.kept_place = None;
            if state.ending && state.side.is_empty() {
                myself.stop(Some("integration deleted".into()));
                return;
            }
            match listen(myself, state).await {
                Heard::Work => {
                    Box::pin(start_side_turns(myself, state)).await;
                    continue;
                }
                Heard::Mail => {
                    // Back to the mailbox; the idle check watches the quiet from there.
                    let after = awake_for(state).unwrap_or(state.args.settings.idle_timeout);
                    arm_idle_check(myself, state, after);
                }
                Heard::Quiet => rest_or_passivate_if_idle(myself, state),
                Heard::Stopping => flush_snapshots(state),
            }
            return;
        };
        match begin_turn(myself, state, turn, false).await {
            Begun::Skipped => {}
            Begun::Running => return,
            Begun::Await(work) => {
                let (reply, ok) = await_turn(myself, state, work).await;
                if let Some(turn) = state.current.take() {
                    finish_turn(state, turn, reply, ok).await;
                }
                awaited += 1;
                if awaited == TURNS_BEFORE_MAILBOX {
                    // The mailbox is read before the rest of the queue (a woken successor
                    // takes it if this actor stops meanwhile).
                    let _ = myself.cast(ConversationMsg::Wake);
                    return;
                }
            }
        }
    }
}

fn stopping(state: &ConversationActorState) -> bool {
    state
        .args
        .settings
        .stopping
        .load(std::sync::atomic::Ordering::Acquire)
}

/// What ended a listen.
enum Heard {
    /// Turns are queued.
    Work,
    /// A message waits in the mailbox, which is read next (before what is queued, if anything:
    /// a `Wake` follows the message then).
    Mail,
    /// Quiet for as long as the conversation may stay awake without resting.
    Quiet,
    /// The router stops.
    Stopping,
}

/// An idle actor awaits its next activity in place: the request path queues it and nudges the
/// actor, with no message through the mailbox, and the gathered snapshots' window and the
/// conversation's rest are deadlines watched here rather than timer messages (each of which
/// was a task spawned). A message cast meanwhile (an invoke's end, the integration's end)
/// nudges it back to the mailbox.
async fn listen(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) -> Heard {
    use std::future::Future;
    use std::task::Poll;

    let conversation = Arc::clone(&state.args.conversation);
    let quiet_after = awake_for(state).unwrap_or(state.args.settings.idle_timeout);
    let rest_due = {
        let mut shared = conversation.state();
        if !shared.queue.is_empty() || !shared.side_queue.is_empty() {
            return Heard::Work;
        }
        shared.listening = true;
        shared.last_activity + quiet_after
    };
    let mut rest = std::pin::pin!(tokio::time::sleep_until(rest_due));
    loop {
        let mut flush_due = std::pin::pin!(flush_deadline(state));
        let heard = std::future::poll_fn(|cx| {
            if conversation.nudge.poll_mail(cx) {
                return Poll::Ready(Some(Heard::Mail));
            }
            if conversation.nudge.poll_nudged(cx) {
                return Poll::Ready(Some(Heard::Work));
            }
            if rest.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Heard::Quiet));
            }
            if passed(flush_due.as_mut(), cx) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        let Some(heard) = heard else {
            flush_snapshots(state);
            continue;
        };
        let stopping = stopping(state);
        let queued = {
            let mut shared = conversation.state();
            let queued = !shared.queue.is_empty() || !shared.side_queue.is_empty();
            if matches!(heard, Heard::Work) && !queued && !stopping {
                // Nothing came after all (a nudge meant for a turn taken already).
                continue;
            }
            shared.listening = false;
            queued
        };
        return match heard {
            _ if stopping => Heard::Stopping,
            Heard::Mail if queued => {
                // The mailbox first, then what is queued: a wake-up follows the message.
                let _ = myself.cast(ConversationMsg::Wake);
                Heard::Mail
            }
            _ if queued => Heard::Work,
            heard => heard,
        };
    }
}

/// Awaits a plain turn of the turn order. Meanwhile the mailbox is not read, so what must not
/// wait for the turn's end is watched here: invokes queued beside it start, and the gathered
/// snapshots are handed over when their window closes or the router stops.
async fn await_turn(
    myself: &ActorRef<ConversationMsg>,
    state: &mut ConversationActorState,
    mut work: TurnWork,
) -> (Option<SentReply>, bool) {
    use std::task::Poll;

    let conversation = Arc::clone(&state.args.conversation);
    loop {
        let mut flush_due = std::pin::pin!(flush_deadline(state));
        let finished = std::future::poll_fn(|cx| {
            if let Poll::Ready(outcome) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(outcome));
            }
            if conversation.nudge.poll_nudged(cx) {
                return Poll::Ready(None);
            }
            if passed(flush_due.as_mut(), cx) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Some(outcome) = finished {
            return outcome;
        }
        Box::pin(start_side_turns(myself, state)).await;
        flush_snapshots(state);
    }
}

/// The gathered snapshots' deadline, while there are some, for an actor that watches it itself
/// (awaiting a turn, or listening).
fn flush_deadline(state: &ConversationActorState) -> Option<tokio::time::Sleep> {
    state
        .flush_due
        .filter(|_| state.snapshots_dirty)
        .map(tokio::time::sleep_until)
}

/// Whether `deadline`, when there is one, has passed (`cx` is woken when it does).
fn passed(
    deadline: std::pin::Pin<&mut Option<tokio::time::Sleep>>,
    cx: &mut std::task::Context<'_>,
) -> bool {
    use std::future::Future;
    deadline
        .as_pin_mut()
        .is_some_and(|due| due.poll(cx).is_ready())
}

/// How a turn was begun.
enum Begun {
    /// Not started (dropped, a redelivery, no integration): the caller takes the next one.
    Skipped,
    /// Running on its own (an invoke beside the turn order, a streamed answer in a reply
    /// actor): it reports `TurnFinished`.
    Running,
    /// A plain turn of the turn order, for this actor to await.
    Await(TurnWork),
}

/// Starts one turn, in the turn order or (`side`) beside it.
async fn begin_turn(
    myself: &ActorRef<ConversationMsg>,
    state: &mut ConversationActorState,
    turn: Turn,
    side: bool,
) -> Begun {
    let Turn {
        activity,
        accepted_at,
        mut invoke,
        receipt,
        ticket,
    } = turn;
    let mut receipt = receipt;
    let skip = |state: &mut ConversationActorState,
                reason: &str,
                invoke: Option<InvokeReply>,
                receipt: Option<Receipt>,
                failed: bool| {
        if failed {
            counter!(TURNS_FAILED).increment(1);
        }
        if let Some(waiting) = invoke {
            waiting.send(InvokeResponse::error("TurnFailed", reason));
        }
        complete(&state.args.settings.persistence, receipt);
        release(state, side);
    };
    if let Some(Receipt::Stream(entry)) = &receipt
        && !entry.is_current()
    {
        // Its partition moved to another instance, which replays it: this one must not send.
        // If the partition comes back here, it is offered again and must not pass for a
        // redelivery.
        counter!(PARTITION_TURNS_DROPPED).increment(1);
        state.args.conversation.state().dedup.forget(activity.id());
        entry.left_pending();
        invoke.take();
        drop(receipt.take());
        release(state, side);
        return Begun::Skipped;
    }
    let activity = *activity;
    let Some(integration) = state
        .args
        .services
        .registry
        .integration(&state.args.conversation.key.integration)
    else {
        skip(
            state,
            "the integration no longer exists",
            invoke.take(),
            receipt.take(),
            true,
        );
        return Begun::Skipped;
    };
    // Beside a running turn, the state in memory is the newest: reading the store again would
    // drop what that turn has not saved yet. So is it for a turn of a partition held without a
    // break since the state was read.
    let beside_running = side && (state.current.is_some() || !state.side.is_empty());
    let held_under = match &receipt {
        Some(Receipt::Stream(entry)) => Some(entry.lease_value()),
        _ => None,
    };
    let current_in_memory = held_under.is_some()
        && state.loaded_under.as_deref() == held_under
        && state.record.is_some();
    let held_under = held_under.map(str::to_owned);
    if !beside_running || state.record.is_none() {
        load_record(state, &integration, current_in_memory).await;
    }
    // Within this conversation the session is told by its user alone: its key (two strings
    // formatted) is built only for another session.
    let user = session_user(&activity);
    let same_session = state
        .session
        .as_ref()
        .is_some_and(|(held, _)| held.user.as_deref() == user);
    // Another session beside a running turn (a personal chat's invoke from another user) is
    // read for this turn only: the running turn keeps the one it records into.
    let running_session = if beside_running && !same_session {
        state.session.take()
    } else {
        None
    };
    if !beside_running || !same_session {
        load_session(
            state,
            &integration,
            &activity,
            same_session,
            current_in_memory,
        )
        .await;
    }
    if !side || current_in_memory {
        // A turn read outside a held partition (an invoke run where it was accepted) may have
        // read state another instance wrote since: the next turn reads again.
        state.loaded_under = held_under;
    }
    if state
        .args
        .conversation
        .state()
        .dedup
        .is_answered(activity.id())
    {
        // A redelivery that slipped past the in-memory window (after a restart or failover).
        counter!(ACTIVITIES_DUPLICATE).increment(1);
        skip(state, "duplicate", invoke.take(), receipt.take(), false);
        return Begun::Skipped;
    }
    let text = activity.text_without_bot_mentions();
    if state
        .args
        .settings
        .panic_trigger
        .as_deref()
        .is_some_and(|trigger| text == trigger)
    {
        release(state, side);
        // A panic of this actor (not of a turn, whose panic is caught where it runs) skips
        // `post_stop`: what was gathered is handed over first, as on any known way out.
        flush_snapshots(state);
        panic!("testing.panic_trigger received: failing this turn on purpose");
    }

    let limits = state.args.settings.persistence.limits;
    let mut say = None;
    if activity.kind() == "message"
        && let Some((_, session)) = state.session.as_mut()
    {
        if is_reset_command(&text) {
            *session = session.restart(now_ms(), integration.record.session_duration);
            say = Some(RESET_CONFIRMATION.to_owned());
        } else if text.eq_ignore_ascii_case(SESSION_COMMAND) {
            say = Some(session.describe());
        } else {
            session.record(
                Entry {
                    role: Role::User,
                    text: &text,
                    at_ms: now_ms(),
                    id: Some(activity.id()),
                },
                limits,
            );
            session.turns += 1;
        }
    }
    let session_command = say.is_some();
    let activity_id = activity.id().to_owned();
    // Only a backend that reads the history gets the session's id and a copy of its history
    // (the running turn holds it while this actor records the next).
    let reads_history = state
        .args
        .services
        .registry
        .bot(&integration.record.bot_id)
        .is_some_and(|bot| bot.backend().reads_history());
    let (session_id, history) = match &state.session {
        Some((key, session)) if reads_history => (
            format!("{}-{}", key.name, session.started_at_ms),
            session.history.iter().map(Entry::owned).collect(),
        ),
        _ => (String::new(), Vec::new()),
    };
    if running_session.is_some() {
        state.session = running_session;
    }
    state.turns_started += 1;
    let number = state.turns_started;
    // The bot removed from here teaches nothing, and the next activity (an installation)
    // teaches the addresses again.
    let bot_left = activity.says_bot_left();
    let learn_addresses = activity.has_recipient()
        && !bot_left
        && state.addresses_learned_from.as_deref() != Some(activity.service_url());
    if learn_addresses {
        state.addresses_learned_from = Some(activity.service_url().to_owned());
    } else if bot_left {
        state.addresses_learned_from = None;
    }
    let reply = ReplyArgs {
        learn_addresses,
        session_id,
        history,
        services: Arc::clone(&state.args.services),
        integration,
        activity,
        text,
        accepted_at,
        invoke,
        say,
    };
    // Past the bound of turns in flight, this conversation waits here for a place; its mailbox
    // keeps filling and the request path sheds on the pending bound.
    let admission = match ticket {
        // An invoke beside the turn order takes a place of its own.
        Some(ticket) if side => {
            let permit = ticket.turn_permit().await;
            Some((ticket, permit))
        }
        Some(ticket) => {
            let permit = match state.kept_place.take() {
                Some(permit) if state.place_turns < TURNS_PER_PLACE => {
                    state.place_turns += 1;
                    Some(permit)
                }
                kept => {
                    // Given back first: this conversation queues behind the others.
                    drop(kept);
                    state.place_turns = 1;
                    ticket.turn_permit().await
                }
            };
            Some((ticket, permit))
        }
        // A turn admitted without a ticket (replayed from the journal) takes no place.
        None => {
            if !side {
                state.kept_place = None;
            }
            None
        }
    };
    // A turn running on its own reports its end in the mailbox.
    let done = || -> crate::reply::TurnDone {
        let actor = myself.clone();
        let conversation = Arc::clone(&state.args.conversation);
        Box::new(move |reply, ok| {
            let _ = actor.cast(ConversationMsg::TurnFinished {
                turn: number,
                reply,
                ok,
            });
            // A listening actor reads its mailbox for it.
            conversation.nudge.mail();
        })
    };
    let mut work = None;
    let reply_actor = if crate::reply::streams(&reply) {
        match Actor::spawn_linked(None, ReplyActor, (reply, done()), myself.get_cell()).await {
            Ok((reply_actor, _)) => Some(reply_actor.get_id()),
            Err(error) => {
                tracing::error!(%error, "cannot start a reply actor; turn dropped");
                skip(
                    state,
                    "the turn could not be started",
                    None,
                    receipt.take(),
                    true,
                );
                return Begun::Skipped;
            }
        }
    } else if side {
        crate::reply::spawn_turn(reply, done());
        None
    } else {
        work = Some(crate::reply::turn_work(reply));
        None
    };
    let running = RunningTurn {
        turn: number,
        reply_actor,
        side,
        started: crate::clock::now(),
        activity_id,
        receipt,
        session_command,
        admission,
    };
    if side {
        state.side.push(running);
    } else {
        state.current = Some(running);
    }
    work.map_or(Begun::Running, Begun::Await)
}

/// An activity that needs no answer (dropped, or a redelivery) is done with in its log.
fn complete(persistence: &super::Persistence, receipt: Option<Receipt>) {
    match receipt {
        Some(Receipt::Journal(seq)) => {
            if let Some(journal) = &persistence.journal {
                journal.complete(seq);
            }
        }
        Some(Receipt::Stream(entry)) => {
            tokio::spawn(async move {
                // Nothing changed: its acknowledgement writes no snapshot (one written now could
                // land after the next turn's).
                if let Err(error) = entry.finish(&[]).await {
                    tracing::warn!(%error, "a skipped stream entry stays pending; its partition's next holder replays it");
                }
            });
        }
        None => {}
    }
}

/// Records that an activity was answered, and waits until that is durable: a crash before this
/// returns replays the turn (one duplicate message), a crash after does not.
async fn record_answered(
    persistence: &super::Persistence,
    receipt: Option<Receipt>,
    snapshots: &[Put],
) -> Answered {
    match receipt {
        Some(Receipt::Journal(seq)) => {
            if let Some(journal) = &persistence.journal
                && let Err(error) = journal.record_answered(seq).await
            {
                tracing::warn!(%error, "answered turn not recorded yet; the journal writer retries");
            }
            Answered::Recorded
        }
        Some(Receipt::Stream(entry)) => match entry.finish(snapshots).await {
            Ok(true) => Answered::Recorded,
            Ok(false) => {
                counter!(PARTITION_FENCED).increment(1);
                tracing::warn!(
                    "answered turn not acknowledged: its partition has another holder now"
                );
                Answered::Fenced
            }
            Err(error) => {
                tracing::warn!(%error, "answered turn not acknowledged; its partition's next holder replays it");
                Answered::Failed
            }
        },
        None => Answered::Unrecorded,
    }
}

/// What recording a turn as answered came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// In the journal or acknowledged in its stream (with its snapshots).
    Recorded,
    /// Refused: the partition has another holder, which replays the entry.
    Fenced,
    /// Unknown or failed (Redis failing): the entry stays pending, its snapshots unwritten.
    Failed,
    /// Nothing to record it in.
    Unrecorded,
}

/// A turn that will not run gives its slot back: the turn order's, or one beside it.
fn release(state: &ConversationActorState, side: bool) {
    let mut shared = state.args.conversation.state();
    if side {
        shared.side_running = shared.side_running.saturating_sub(1);
    } else {
        shared.busy = false;
    }
}

/// Loads the conversation's dedup window and sequence once per actor (with a shared store, again
/// unless `current_in_memory`).
async fn load_record(
    state: &mut ConversationActorState,
    integration: &Integration,
    current_in_memory: bool,
) {
    if state.record.is_some()
        && (current_in_memory || state.args.settings.persistence.partitions.is_none())
    {
        return;
    }
    let conversation_id = &state.args.conversation.key.conversation_id;
    let name = conversation_key(&integration.record.id, conversation_id);
    let stored = load_snapshot(
        state,
        name,
        SnapshotKind::Record,
        conversation_id,
        ConversationRecord::decode,
    )
    .await;
    let stored_sequence = stored.as_ref().map_or(0, |record| record.last_sequence);
    if let Some(record) = &stored {
        // Later redeliveries are then caught at the door, without a turn.
        state
            .args
            .conversation
            .state()
            .dedup
            .merge_answered(&record.answered);
    }
    let ttl = std::time::Duration::from_millis(
        integration
            .record
            .session_duration
            .max(DEDUP_RECORD_MIN_TTL_MS),
    );
    // With a shared store another instance may have run turns since: the later count wins.
    let last_sequence = state
        .record
        .map_or(stored_sequence, |(known, _)| known.max(stored_sequence));
    state.record = Some((last_sequence, ttl));
}

/// A conversation's dedup window outlives short sessions: Teams redelivers within minutes.
const DEDUP_RECORD_MIN_TTL_MS: u64 = 3_600_000;

/// A snapshot of the conversation: from its partition's slot with a shared store (else, once,
/// where versions before partitioned snapshots wrote it, under the contract's `name`), from
/// the snapshot writer's queue or the embedded store otherwise.
async fn load_snapshot<T, E: std::fmt::Display>(
    state: &ConversationActorState,
    name: String,
    kind: SnapshotKind,
    owner: &str,
    decode: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Option<T> {
    let persistence = &state.args.settings.persistence;
    let stored = match &persistence.partitions {
        Some(log) => {
            let integration = &state.args.conversation.key.integration;
            let partition =
                log.partition_of(integration, &state.args.conversation.key.conversation_id);
            // Pending writes first (a turn whose acknowledgement failed queued its snapshots).
            let key = log.snapshot_name(partition, kind, integration, owner);
            match persistence.snapshots.load(&key).await {
                Ok(None) => persistence.snapshots.load(&name).await,
                found => found,
            }
        }
        None => persistence.snapshots.load(&name).await,
    };
    match stored {
        Ok(bytes) => bytes.and_then(|b| match decode(&b) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::error!(%error, "stored snapshot is unreadable; starting afresh");
                None
            }
        }),
        Err(error) => {
            tracing::warn!(%error, "snapshot could not be loaded; starting from memory");
            None
        }
    }
}

/// Makes `state.session` the session this activity belongs to (`held`: the one in memory is it):
/// the one in memory, else the latest snapshot, else a new one (also when the stored one expired).
async fn load_session(
    state: &mut ConversationActorState,
    integration: &Integration,
    activity: &TurnActivity,
    held: bool,
    current_in_memory: bool,
) {
    if state.session.is_some() && !held {
        // Another session takes this one's place: what it gathered is handed over first.
        flush_snapshots(state);
    }
    let now = now_ms();
    let duration = integration.record.session_duration;
    let memory_is_current =
        current_in_memory || state.args.settings.persistence.partitions.is_none();
    let (key, loaded) = match state.session.take() {
        Some((key, session)) if held && memory_is_current => (key, session),
        _ => {
            let key = session_key(&integration.record.id, activity);
            let conversation_id = &state.args.conversation.key.conversation_id;
            let (kind, owner) = session_owner(&key, conversation_id);
            let session = load_snapshot(state, key.name.clone(), kind, owner, Session::decode)
                .await
                .unwrap_or_else(|| Session::new(activity.conversation_id(), now, duration));
            (key, session)
        }
    };
    let session = if loaded.is_expired(now) {
        loaded.restart(now, duration)
    } else {
        loaded
    };
    state.session = Some((key, session));
}

/// How long a quiet conversation keeps its actor before it rests (`None`: until it passivates):
/// `rest_after`, or not at all while more conversations than `max_awake` have one. An actor is
/// kilobytes (its task, its channels, its turn's future) where a resting conversation is a few
/// hundred bytes, so memory follows the conversations in memory, not how many were touched
/// lately; past the bound a conversation's next activity starts an actor instead of waking one.
fn awake_for(state: &ConversationActorState) -> Option<std::time::Duration> {
    let settings = &state.args.settings;
    let after = settings.rest_after?;
    let crowded = settings
        .max_awake
        .is_some_and(|max| state.args.population.awake() > max);
    Some(if crowded {
        std::time::Duration::ZERO
    } else {
        after
    })
}

fn arm_idle_check(
    myself: &ActorRef<ConversationMsg>,
    state: &mut ConversationActorState,
    after: std::time::Duration,
) {
    if !state.idle_check_armed {
        state.idle_check_armed = true;
        myself.send_after(after, || ConversationMsg::IdleCheck);
    }
}

/// Hands the turns gathered since the last snapshot to the writer.
fn flush_snapshots(state: &mut ConversationActorState) {
    state.flush_due = None;
    if std::mem::take(&mut state.snapshots_dirty) {
        state.unsaved = !save_snapshots(state);
    }
}

/// On the way back to the mailbox: a timer message for the gathered snapshots, which nothing
/// watches there (one at a time; an early one only writes them sooner).
fn arm_flush(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) {
    if state.flush_armed || !state.snapshots_dirty {
        return;
    }
    if let Some(due) = state.flush_due {
        state.flush_armed = true;
        let after = due.saturating_duration_since(crate::clock::now());
        myself.send_after(after, || ConversationMsg::FlushSnapshots);
    }
}

/// What an idle check decided, once the conversation had been quiet for long enough.
enum Quiet {
    /// An activity came meanwhile; the end of its turn arms the next check.
    Busy,
    Rest,
    Passivate,
}

fn rest_or_passivate_if_idle(
    myself: &ActorRef<ConversationMsg>,
    state: &mut ConversationActorState,
) {
    state.idle_check_armed = false;
    let idle_timeout = state.args.settings.idle_timeout;
    let rest_after = awake_for(state);
    let quiet_for = {
        let shared = state.args.conversation.state();
        let idle = !shared.busy
            && shared.queue.is_empty()
            && shared.side_running == 0
            && shared.side_queue.is_empty();
        idle.then(|| shared.last_activity.elapsed())
    };
    let Some(quiet_for) = quiet_for else {
        // Work is queued or running; the end of the running turn arms the next check.
        return;
    };
    let due = quiet_for >= idle_timeout || rest_after.is_some_and(|after| quiet_for >= after);
    if !due {
        // A conversation still talking keeps gathering its turns for the coalescing window.
        let next = rest_after
            .filter(|&after| after > quiet_for)
            .unwrap_or(idle_timeout);
        arm_idle_check(myself, state, next - quiet_for);
        return;
    }
    flush_snapshots(state);
    if state.unsaved {
        // Resting or passivating now would lose what the dropped snapshot held (a resting
        // conversation may passivate without an actor to save it); try again, else wait.
        state.unsaved = !save_snapshots(state);
        if state.unsaved {
            arm_idle_check(myself, state, idle_timeout);
            return;
        }
    }
    let quiet = {
        let mut shared = state.args.conversation.state();
        if shared.busy
            || !shared.queue.is_empty()
            || shared.side_running > 0
            || !shared.side_queue.is_empty()
        {
            // An activity came while the snapshots were handed over.
            Quiet::Busy
        } else if quiet_for >= idle_timeout {
            shared.closed = true;
            shared.actor = None;
            Quiet::Passivate
        } else {
            shared.actor = None;
            // Empty, but with the room its busiest moment took (hundreds of bytes), which a
            // resting conversation gives back with its actor.
            shared.queue.shrink_to_fit();
            shared.side_queue.shrink_to_fit();
            shared.resting = Some(Box::new(Resting {
                session: state.session.take(),
                record: state.record.take(),
                addresses_learned_from: state.addresses_learned_from.take(),
                loaded_under: state.loaded_under.take(),
            }));
            // Counted under the lock, before the next actor can take the rest back.
            if let Some(directory) = state.args.directory.upgrade() {
                directory.count_resting(1);
            }
            Quiet::Rest
        }
    };
    match quiet {
        Quiet::Busy => {}
        Quiet::Rest => myself.stop(Some("resting".into())),
        Quiet::Passivate => {
            // The session's latest snapshot is already with the snapshot writer, which the next
            // actor of this conversation reads before the store.
            if let Some(directory) = state.args.directory.upgrade() {
                directory.remove(&state.args.conversation);
            }
            myself.stop(Some("idle".into()));
        }
    }
}
