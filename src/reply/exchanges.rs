//! Teams SSO token exchange (`signin/tokenExchange`), as botbuilder's token-exchange middleware
//! answers it (protocol.md §5.1): Teams sends the invoke once per signed-in client (desktop, web,
//! mobile) with the same `value.id`. Each is exchanged until one succeeds; after that, the others
//! get 200 with an empty body and never reach the bot. A failed exchange is 412 with
//! `{id, connectionName, failureDetail}`, so the client falls back to the sign-in card.
//!
//! The exchange itself is the bot's (it holds the OAuth connection): success is its
//! InvokeResponse with a 2xx status.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::activity::TurnActivity;
use crate::backend::InvokeResponse;
use crate::clock::Instant;

pub const TOKEN_EXCHANGE: &str = "signin/tokenExchange";

/// How long a succeeded exchange id is remembered (the clients' duplicates come within seconds).
const EXCHANGED_FOR: Duration = Duration::from_secs(15 * 60);
/// Remembered ids past which expired ones are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// What the invoke asks to exchange: `value.id` and `value.connectionName`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeRequest {
    pub id: String,
    pub connection_name: String,
}

impl ExchangeRequest {
    /// The request of a `signin/tokenExchange` invoke (`None` for anything else).
    pub fn of(activity: &TurnActivity) -> Option<Self> {
        if activity.kind() != "invoke" || activity.name() != Some(TOKEN_EXCHANGE) {
            return None;
        }
        Some(Self::from_value(activity.value().as_ref()))
    }

    pub fn from_value(value: Option<&Value>) -> Self {
        let field = |name: &str| {
            value
                .and_then(|v| v.get(name))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            id: field("id"),
            connection_name: field("connectionName"),
        }
    }

    /// The 412 that tells Teams the exchange failed (it then shows the sign-in card).
    pub fn failed(&self, detail: &str) -> InvokeResponse {
        InvokeResponse {
            status: 412,
            body: json!({
                "id": self.id,
                "connectionName": self.connection_name,
                "failureDetail": detail,
            }),
        }
    }
}

/// The answer to a duplicate of an exchange that already succeeded: 200, empty body.
pub fn already_exchanged() -> InvokeResponse {
    InvokeResponse {
        status: 200,
        body: Value::Null,
    }
}

enum Slot {
    /// Being exchanged: the outcome (true: succeeded) is announced here.
    InFlight(watch::Receiver<Option<bool>>),
    Exchanged {
        until: Instant,
    },
}

/// Exchange ids per integration: the ones being exchanged and the ones that succeeded.
#[derive(Default)]
pub struct TokenExchanges {
    slots: DashMap<(Arc<str>, String), Slot>,
}

/// What a token-exchange invoke does.
pub enum Claim<'a> {
    /// An exchange with this id succeeded: answer 200, empty, without the bot.
    AlreadyExchanged,
    /// This invoke exchanges; [`Exchanging::finish`] says how it went.
    Exchange(Exchanging<'a>),
}

/// The one invoke of an id that is being exchanged; dropping it unfinished counts as a failure.
pub struct Exchanging<'a> {
    exchanges: &'a TokenExchanges,
    key: (Arc<str>, String),
    outcome: watch::Sender<Option<bool>>,
    finished: bool,
}

impl Exchanging<'_> {
    pub fn finish(mut self, succeeded: bool) {
        self.settle(succeeded);
    }

    fn settle(&mut self, succeeded: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        if succeeded {
            self.exchanges.slots.insert(
                self.key.clone(),
                Slot::Exchanged {
                    until: crate::clock::now() + EXCHANGED_FOR,
                },
            );
        } else {
            self.exchanges.slots.remove(&self.key);
        }
        let _ = self.outcome.send(Some(succeeded));
    }
}

impl Drop for Exchanging<'_> {
    fn drop(&mut self) {
        self.settle(false);
    }
}

impl TokenExchanges {
    /// Whether this invoke exchanges, or is the duplicate of one that succeeded. A duplicate
    /// arriving while another invoke of its id is exchanging waits for that one: its success
    /// answers the duplicate, its failure lets the duplicate try (each client is exchanged).
    pub async fn claim(&self, integration: &Arc<str>, id: &str) -> Claim<'_> {
        let key = (Arc::clone(integration), id.to_owned());
        loop {
            let waiting = {
                if self.slots.len() > PRUNE_ABOVE {
                    let now = crate::clock::now();
                    self.slots.retain(
                        |_, slot| !matches!(slot, Slot::Exchanged { until } if *until <= now),
                    );
                }
                match self.slots.entry(key.clone()) {
                    dashmap::Entry::Vacant(vacant) => {
                        let (outcome, watcher) = watch::channel(None);
                        vacant.insert(Slot::InFlight(watcher));
                        return Claim::Exchange(Exchanging {
                            exchanges: self,
                            key,
                            outcome,
                            finished: false,
                        });
                    }
                    dashmap::Entry::Occupied(mut occupied) => match occupied.get() {
                        Slot::Exchanged { until } if *until > crate::clock::now() => {
                            return Claim::AlreadyExchanged;
                        }
                        Slot::Exchanged { .. } => {
                            let (outcome, watcher) = watch::channel(None);
                            occupied.insert(Slot::InFlight(watcher));
                            return Claim::Exchange(Exchanging {
                                exchanges: self,
                                key,
                                outcome,
                                finished: false,
                            });
                        }
                        Slot::InFlight(watcher) => watcher.clone(),
                    },
                }
            };
            let mut waiting = waiting;
            let succeeded = match waiting.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.unwrap_or(false),
                Err(_) => false,
            };
            if succeeded {
                return Claim::AlreadyExchanged;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicates_of_a_succeeded_exchange_are_answered_without_the_bot() {
        let exchanges = TokenExchanges::default();
        let integration: Arc<str> = Arc::from("teams");
        let Claim::Exchange(first) = exchanges.claim(&integration, "x1").await else {
            panic!("the first exchanges");
        };
        // A duplicate while the first is exchanging waits for it.
        let waiter = async {
            matches!(
                exchanges.claim(&integration, "x1").await,
                Claim::AlreadyExchanged
            )
        };
        let finisher = async {
            tokio::task::yield_now().await;
            first.finish(true);
        };
        let (waited, ()) = tokio::join!(waiter, finisher);
        assert!(waited);
        assert!(matches!(
            exchanges.claim(&integration, "x1").await,
            Claim::AlreadyExchanged
        ));
        // Another integration's id of the same value is its own.
        let other: Arc<str> = Arc::from("other");
        assert!(matches!(
            exchanges.claim(&other, "x1").await,
            Claim::Exchange(_)
        ));
    }

    #[tokio::test]
    async fn a_failed_exchange_lets_the_next_client_try() {
        let exchanges = TokenExchanges::default();
        let integration: Arc<str> = Arc::from("teams");
        let Claim::Exchange(first) = exchanges.claim(&integration, "x2").await else {
            panic!("the first exchanges");
        };
        drop(first);
        let Claim::Exchange(second) = exchanges.claim(&integration, "x2").await else {
            panic!("after a failure the next one exchanges");
        };
        second.finish(false);
    }
}
