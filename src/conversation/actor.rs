//! The conversation actor: takes the next queued turn, runs it in a linked reply actor, and takes
//! the next one only when that reply actor has stopped. Idle actors passivate.

use std::sync::{Arc, Weak};
use std::time::Instant;

use metrics::{counter, histogram};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::{Conversation, ConversationSettings, Directory};
use crate::activity::TurnActivity;
use crate::backend::InvokeResponse;
use crate::reply::{ReplyActor, ReplyArgs, ReplyServices};
use crate::telemetry::{TURN_DURATION, TURNS_FAILED};

#[derive(Debug)]
pub enum ConversationMsg {
    /// A turn was queued.
    Wake,
    /// The idle timer fired; passivate if nothing happened since.
    IdleCheck,
}

pub struct ConversationActor;

pub struct ConversationArgs {
    pub conversation: Arc<Conversation>,
    pub directory: Weak<Directory>,
    pub services: Arc<ReplyServices>,
    pub settings: ConversationSettings,
}

pub struct ConversationActorState {
    args: ConversationArgs,
    /// The reply actor running the current turn, and when it started.
    current: Option<(ActorId, Instant)>,
    /// An idle check is scheduled (one at a time, however many turns ran).
    idle_check_armed: bool,
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
        {
            let mut state = args.conversation.state();
            state.actor = Some(myself.clone());
            // A predecessor that died mid-turn left the flag set; its turn is over.
            state.busy = false;
        }
        Ok(ConversationActorState {
            args,
            current: None,
            idle_check_armed: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Turns queued before this actor existed (or while its predecessor restarted).
        start_next_turn(&myself, state).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConversationMsg::Wake => start_next_turn(&myself, state).await,
            ConversationMsg::IdleCheck => passivate_if_idle(&myself, state),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, error) => (cell, Some(error.to_string())),
            _ => return Ok(()),
        };
        let Some((id, started)) = state.current else {
            return Ok(());
        };
        if cell.get_id() != id {
            return Ok(());
        }
        histogram!(TURN_DURATION).record(started.elapsed().as_secs_f64());
        if let Some(error) = failure {
            counter!(TURNS_FAILED).increment(1);
            tracing::error!(integration = %state.args.conversation.key.integration, %error, "turn failed");
        }
        state.current = None;
        {
            let mut shared = state.args.conversation.state();
            shared.busy = false;
            shared.last_activity = Instant::now();
        }
        start_next_turn(&myself, state).await;
        Ok(())
    }
}

async fn start_next_turn(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) {
    if state.current.is_some() {
        return;
    }
    let args = &state.args;
    loop {
        let turn = {
            let mut shared = args.conversation.state();
            if shared.busy {
                return;
            }
            match shared.queue.pop_front() {
                Some(turn) => {
                    shared.busy = true;
                    turn
                }
                None => break,
            }
        };
        let mut invoke = turn.invoke;
        let finish_unrun =
            |reason: &str, invoke: Option<tokio::sync::oneshot::Sender<InvokeResponse>>| {
                args.conversation.state().busy = false;
                counter!(TURNS_FAILED).increment(1);
                if let Some(waiting) = invoke {
                    let _ = waiting.send(InvokeResponse::error("TurnFailed", reason));
                }
            };
        let activity = match TurnActivity::parse(&turn.body) {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(integration = %args.conversation.key.integration, %error, "activity cannot be read as a turn; dropped");
                finish_unrun("the activity could not be read", invoke.take());
                continue;
            }
        };
        if args
            .settings
            .panic_trigger
            .as_deref()
            .is_some_and(|trigger| activity.text_without_bot_mentions() == trigger)
        {
            args.conversation.state().busy = false;
            panic!("testing.panic_trigger received: failing this turn on purpose");
        }
        let Some(integration) = args
            .services
            .registry
            .integration(&args.conversation.key.integration)
        else {
            finish_unrun("the integration no longer exists", invoke.take());
            continue;
        };
        let reply = ReplyArgs {
            services: Arc::clone(&args.services),
            integration,
            activity,
            accepted_at: turn.accepted_at,
            invoke,
        };
        match Actor::spawn_linked(None, ReplyActor, reply, myself.get_cell()).await {
            Ok((reply_actor, _)) => {
                state.current = Some((reply_actor.get_id(), Instant::now()));
                return;
            }
            Err(error) => {
                tracing::error!(%error, "cannot start a reply actor; turn dropped");
                finish_unrun("the turn could not be started", None);
            }
        }
    }
    // Nothing left to do: check back after the idle timeout.
    arm_idle_check(myself, state, state.args.settings.idle_timeout);
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

fn passivate_if_idle(myself: &ActorRef<ConversationMsg>, state: &mut ConversationActorState) {
    state.idle_check_armed = false;
    let idle_timeout = state.args.settings.idle_timeout;
    let remaining = {
        let mut shared = state.args.conversation.state();
        let quiet_for = shared.last_activity.elapsed();
        if shared.busy || !shared.queue.is_empty() {
            // The end of the running turn arms the next check.
            return;
        }
        if quiet_for < idle_timeout {
            Some(idle_timeout - quiet_for)
        } else {
            shared.closed = true;
            shared.actor = None;
            None
        }
    };
    if let Some(remaining) = remaining {
        arm_idle_check(myself, state, remaining);
        return;
    }
    let args = &state.args;
    if let Some(directory) = args.directory.upgrade() {
        directory.remove(&args.conversation);
    }
    myself.stop(Some("idle".into()));
}
