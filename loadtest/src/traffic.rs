//! The traffic of a run: which conversation and activity type comes next (skewed, mixed), and the
//! activity bodies, built from the real Teams payloads in `fixtures/activities/`.

use rand::Rng;
use serde_json::{Value, json};

use crate::scenario::Scenario;

const PERSONAL_MESSAGE: &str = include_str!("../../fixtures/activities/personal-message.json");
const CHANNEL_MESSAGE: &str =
    include_str!("../../fixtures/activities/channel-message-mention.json");
const MEMBERS_ADDED_PERSONAL: &str =
    include_str!("../../fixtures/activities/conversationupdate-membersadded-personal.json");
const MEMBERS_ADDED_TEAM: &str =
    include_str!("../../fixtures/activities/conversationupdate-membersadded-team.json");
const REACTION: &str = include_str!("../../fixtures/activities/messagereaction-added.json");
const INVOKE: &str = include_str!("../../fixtures/activities/invoke-adaptivecard-action.json");

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Kind {
    Message,
    ConversationUpdate,
    MessageReaction,
    Invoke,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Message,
        Kind::ConversationUpdate,
        Kind::MessageReaction,
        Kind::Invoke,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::ConversationUpdate => "conversationUpdate",
            Kind::MessageReaction => "messageReaction",
            Kind::Invoke => "invoke",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationType {
    Personal,
    Group,
    Channel,
}

/// One conversation of the run: its integration, tenant, type and id.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub integration: usize,
    pub tenant: String,
    pub kind: ConversationType,
    pub id: String,
    /// The user who talks in it.
    pub user: String,
}

/// Fixture templates, parsed once; activities are built by filling in ids.
pub struct Templates {
    personal_message: Value,
    channel_message: Value,
    members_added_personal: Value,
    members_added_team: Value,
    reaction: Value,
    invoke: Value,
    service_url: String,
}

impl Templates {
    pub fn new(service_url: &str) -> Result<Self, String> {
        let parse = |name: &str, text: &str| {
            serde_json::from_str::<Value>(text).map_err(|e| format!("fixture {name}: {e}"))
        };
        Ok(Self {
            personal_message: parse("personal-message", PERSONAL_MESSAGE)?,
            channel_message: parse("channel-message-mention", CHANNEL_MESSAGE)?,
            members_added_personal: parse("membersadded-personal", MEMBERS_ADDED_PERSONAL)?,
            members_added_team: parse("membersadded-team", MEMBERS_ADDED_TEAM)?,
            reaction: parse("messagereaction-added", REACTION)?,
            invoke: parse("invoke-adaptivecard-action", INVOKE)?,
            service_url: service_url.to_owned(),
        })
    }

    /// The activity `id` of `kind` in `conversation`; a message says `text`.
    pub fn build(&self, kind: Kind, conversation: &Conversation, id: &str, text: &str) -> Value {
        let channel = conversation.kind == ConversationType::Channel;
        let mut activity = match (kind, channel) {
            (Kind::Message, false) => self.personal_message.clone(),
            (Kind::Message, true) => self.channel_message.clone(),
            (Kind::ConversationUpdate, false) => self.members_added_personal.clone(),
            (Kind::ConversationUpdate, true) => self.members_added_team.clone(),
            (Kind::MessageReaction, _) => self.reaction.clone(),
            (Kind::Invoke, _) => self.invoke.clone(),
        };
        activity["id"] = id.into();
        activity["serviceUrl"] = self.service_url.as_str().into();
        let conversation_type = match conversation.kind {
            ConversationType::Personal => "personal",
            ConversationType::Group => "groupChat",
            ConversationType::Channel => "channel",
        };
        activity["conversation"] = json!({
            "id": conversation.id,
            "conversationType": conversation_type,
            "tenantId": conversation.tenant,
            "isGroup": conversation.kind != ConversationType::Personal,
        });
        activity["channelData"]["tenant"] = json!({"id": conversation.tenant});
        if activity.get("from").is_some() {
            activity["from"]["id"] = conversation.user.as_str().into();
        }
        if kind == Kind::Message {
            if channel {
                // Keep the fixture's bot mention in front, as Teams sends it in a channel.
                let mention = activity["text"]
                    .as_str()
                    .and_then(|t| t.split("</at>").next())
                    .map(|m| format!("{m}</at> "))
                    .unwrap_or_default();
                activity["text"] = format!("{mention}{text}").into();
            } else {
                activity["text"] = text.into();
            }
        }
        activity
    }
}

/// Draws conversations (hot ones first, then a Zipf-like tail) and activity types.
pub struct Mix {
    hot: usize,
    hot_share: f64,
    /// Cumulative weights of the tail conversations (1/rank).
    tail: Vec<f64>,
    kinds: [(Kind, f64); 4],
}

impl Mix {
    pub fn new(scenario: &Scenario) -> Self {
        let hot = scenario.hot_conversations;
        let mut total = 0.0;
        let tail = (hot..scenario.conversations)
            .map(|i| {
                total += 1.0 / ((i - hot + 1) as f64).powf(0.8);
                total
            })
            .collect();
        let m = &scenario.activity_mix;
        let weights = [
            m.message,
            m.conversation_update,
            m.message_reaction,
            m.invoke,
        ];
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut kinds = [(Kind::Message, 0.0); 4];
        for (slot, (kind, weight)) in kinds.iter_mut().zip(Kind::ALL.iter().zip(weights)) {
            acc += weight / sum;
            *slot = (*kind, acc);
        }
        Self {
            hot,
            hot_share: if hot == 0 { 0.0 } else { scenario.hot_share },
            tail,
            kinds,
        }
    }

    pub fn conversation(&self, rng: &mut impl Rng) -> usize {
        if self.tail.is_empty() || rng.random::<f64>() < self.hot_share {
            return rng.random_range(0..self.hot.max(1));
        }
        let total = self.tail.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.hot
            + self
                .tail
                .partition_point(|c| *c < x)
                .min(self.tail.len() - 1)
    }

    pub fn kind(&self, rng: &mut impl Rng) -> Kind {
        let x = rng.random::<f64>();
        self.kinds
            .iter()
            .find(|(_, upto)| x < *upto)
            .map(|(kind, _)| *kind)
            .unwrap_or(Kind::Message)
    }
}

/// The run's conversations, spread over integrations, tenants and types by the scenario's mix.
pub fn conversations(scenario: &Scenario, run: &str) -> Vec<Conversation> {
    let m = &scenario.conversation_mix;
    let total = m.personal + m.group + m.channel;
    (0..scenario.conversations)
        .map(|i| {
            // A low-discrepancy position in [0, 1) spreads the types evenly over hot and cold ones.
            let position = (i as f64 * 0.618_033_988_75).fract() * total;
            let kind = if position < m.personal {
                ConversationType::Personal
            } else if position < m.personal + m.group {
                ConversationType::Group
            } else {
                ConversationType::Channel
            };
            let id = match kind {
                ConversationType::Personal => format!("a:lt-{run}-{i}"),
                ConversationType::Group => format!("19:lt-{run}-{i}@thread.v2"),
                ConversationType::Channel => {
                    format!("19:lt-{run}-{i}@thread.tacv2;messageid=1{i:012}")
                }
            };
            Conversation {
                integration: i % scenario.integrations,
                tenant: format!("00000000-0000-4000-9000-{:012}", i % scenario.tenants),
                kind,
                id,
                user: format!("29:lt-user-{i}"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn templates_build_every_kind_for_every_conversation_type() {
        let templates = Templates::new("http://127.0.0.1:1/amer/").unwrap();
        let scenario = Scenario {
            conversations: 10,
            ..Scenario::default()
        };
        for conversation in conversations(&scenario, "t") {
            for kind in Kind::ALL {
                let a = templates.build(kind, &conversation, "id-1", "hello");
                assert_eq!(a["id"], "id-1");
                assert_eq!(a["conversation"]["id"], conversation.id.as_str());
                assert_eq!(a["type"], kind.label());
                if kind == Kind::Message {
                    assert!(a["text"].as_str().unwrap().ends_with("hello"));
                }
            }
        }
    }

    #[test]
    fn the_mix_is_skewed_towards_hot_conversations() {
        let scenario = Scenario {
            conversations: 1000,
            hot_conversations: 5,
            hot_share: 0.3,
            ..Scenario::default()
        };
        let mix = Mix::new(&scenario);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0usize; 1000];
        for _ in 0..100_000 {
            counts[mix.conversation(&mut rng)] += 1;
        }
        let hot: usize = counts[..5].iter().sum();
        assert!((28_000..32_000).contains(&hot), "{hot}");
        assert!(counts[5] > counts[500] * 10, "a skewed tail");
        assert!(
            counts.iter().filter(|c| **c > 0).count() > 900,
            "a long tail"
        );
    }
}
