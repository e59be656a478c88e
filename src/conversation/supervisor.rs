//! The supervisor of every conversation actor. It starts them (so the request path never waits
//! for a spawn) and restarts one that failed; the restarted actor finds the conversation's queue
//! untouched and carries on with the next turn.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use dashmap::DashMap;
use metrics::counter;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::actor::{ConversationActor, ConversationArgs};
use super::{Conversation, ConversationSettings, Directory, Population};
use crate::reply::ReplyServices;
use crate::telemetry::ACTOR_RESTARTS;

pub enum SupervisorMsg {
    /// A new conversation needs its actor.
    Start(Arc<Conversation>),
}

pub struct ConversationSupervisor;

pub struct SupervisorArgs {
    settings: ConversationSettings,
    services: Arc<ReplyServices>,
    directory: Arc<OnceLock<Weak<Directory>>>,
    population: Arc<Population>,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    /// Live conversation actors, to know which conversation a failed one served.
    children: HashMap<ActorId, Arc<Conversation>>,
}

pub(super) async fn start(
    settings: ConversationSettings,
    services: Arc<ReplyServices>,
) -> Result<(Arc<Directory>, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
    let slot = Arc::new(OnceLock::new());
    let population = Arc::new(Population::default());
    let (supervisor, handle) = Actor::spawn(
        None,
        ConversationSupervisor,
        SupervisorArgs {
            settings: settings.clone(),
            services,
            directory: Arc::clone(&slot),
            population: Arc::clone(&population),
        },
    )
    .await?;
    let directory = Arc::new(Directory {
        conversations: DashMap::new(),
        population,
        settings,
        supervisor,
    });
    // The supervisor holds the directory weakly: the directory owns the supervisor's address.
    let _ = slot.set(Arc::downgrade(&directory));
    Directory::watch_resting(&directory);
    Ok((directory, handle))
}

impl ConversationSupervisor {
    async fn spawn_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        conversation: Arc<Conversation>,
    ) {
        let directory = state.args.directory.get().cloned().unwrap_or_default();
        let args = ConversationArgs {
            conversation: Arc::clone(&conversation),
            directory,
            population: Arc::clone(&state.args.population),
            services: Arc::clone(&state.args.services),
            settings: state.args.settings.clone(),
        };
        match Actor::spawn_linked(None, ConversationActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                state.children.insert(actor.get_id(), conversation);
            }
            Err(error) => {
                tracing::error!(%error, "cannot start a conversation actor");
            }
        }
    }
}

impl Actor for ConversationSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Start(conversation) => {
                Self::spawn_child(&myself, state, conversation).await;
            }
        }
        Ok(())
    }

    /// Overrides the default, which would stop the supervisor when any child dies.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(conversation) = state.children.remove(&cell.get_id()) else {
                    return Ok(());
                };
                let closed = {
                    let mut shared = conversation.state();
                    shared.actor = None;
                    shared.closed
                };
                counter!(ACTOR_RESTARTS).increment(1);
                tracing::error!(
                    integration = %conversation.key.integration,
                    %error,
                    "conversation actor failed; restarting it"
                );
                if !closed {
                    Self::spawn_child(&myself, state, conversation).await;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
