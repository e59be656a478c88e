//! What a conversation keeps beyond its actor, as two snapshots:
//! - its [`Session`] (history of turns bounded by count and bytes, start, expiry, counters) under
//!   the contract's session key, which in personal chats is the user's;
//! - its [`ConversationRecord`] (the digests of the activities it answered and its turn sequence)
//!   under the conversation's own key, so that redeliveries are caught per conversation after a
//!   passivation, a restart or on another instance.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::dedup::digest;
use crate::activity::TurnActivity;
pub use crate::backend::{HistoryEntry, Role};
use crate::store::codec::{self, CodecError, Encoded};

/// User messages that start a fresh session.
pub const RESET_COMMANDS: &[&str] = &["///restart", "///reset", "///new"];
/// A user message that asks what the session holds (its turns and last message).
pub const SESSION_COMMAND: &str = "///session";
pub const RESET_CONFIRMATION: &str = "Started a new session.";

#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub conversation_id: String,
    pub started_at_ms: u64,
    pub expires_at_ms: u64,
    /// Turns run in this session.
    pub turns: u64,
    pub history: VecDeque<HistoryEntry>,
}

/// Per conversation: the digests of the activities it answered (oldest first, see
/// [`super::dedup`]) and its turn sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub answered: Vec<u64>,
    pub last_sequence: u64,
}

/// The record as it was written before snapshots were binary.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonRecord {
    #[serde(default)]
    handled_ids: Vec<String>,
    #[serde(default)]
    last_sequence: u64,
}

impl ConversationRecord {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        match codec::encoded(bytes) {
            Encoded::Binary(_) => codec::decode(bytes),
            Encoded::Json(json) => {
                let record: JsonRecord = serde_json::from_slice(json)?;
                Ok(Self {
                    answered: record.handled_ids.iter().map(|id| digest(id)).collect(),
                    last_sequence: record.last_sequence,
                })
            }
        }
    }
}

/// A session as a snapshot holds it, borrowed from the session (nothing copied to write it).
#[derive(Serialize)]
struct StoringSession<'a> {
    conversation_id: &'a str,
    started_at_ms: u64,
    expires_at_ms: u64,
    turns: u64,
    history: StoringHistory<'a>,
}

struct StoringHistory<'a>(&'a VecDeque<HistoryEntry>);

impl Serialize for StoringHistory<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|entry| StoringEntry {
            role: entry.role,
            text: &entry.text,
            at_ms: entry.at_ms,
            id: entry.id.as_deref(),
        }))
    }
}

/// Every field always written: a binary encoding has no field names to skip by.
#[derive(Serialize)]
struct StoringEntry<'a> {
    role: Role,
    text: &'a str,
    at_ms: u64,
    id: Option<&'a str>,
}

#[derive(Deserialize)]
struct StoredSession {
    conversation_id: String,
    started_at_ms: u64,
    expires_at_ms: u64,
    turns: u64,
    history: VecDeque<StoredEntry>,
}

#[derive(Deserialize)]
struct StoredEntry {
    role: Role,
    text: String,
    at_ms: u64,
    id: Option<String>,
}

/// `teams-conversation-{integrationId}-{conversationId}`
pub fn conversation_key(integration: &str, conversation_id: &str) -> String {
    format!("teams-conversation-{integration}-{conversation_id}")
}

impl Session {
    pub fn new(conversation_id: &str, now_ms: u64, duration_ms: u64) -> Self {
        Self {
            conversation_id: conversation_id.to_owned(),
            started_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(duration_ms),
            turns: 0,
            history: VecDeque::new(),
        }
    }

    /// A fresh session of the same conversation.
    pub fn restart(&self, now_ms: u64, duration_ms: u64) -> Self {
        Self::new(&self.conversation_id, now_ms, duration_ms)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// Appends to the history, dropping the oldest entries beyond the limits.
    pub fn record(&mut self, entry: HistoryEntry, limits: HistoryLimits) {
        self.history.push_back(entry);
        let mut bytes: usize = self.history.iter().map(|e| e.text.len()).sum();
        while self.history.len() > limits.max_entries.max(1)
            || (bytes > limits.max_bytes && self.history.len() > 1)
        {
            if let Some(dropped) = self.history.pop_front() {
                bytes -= dropped.text.len();
            }
        }
    }

    /// The answer to [`SESSION_COMMAND`].
    pub fn describe(&self) -> String {
        let last_user = self
            .history
            .iter()
            .rev()
            .find(|e| e.role == Role::User)
            .map(|e| e.text.as_str());
        match last_user {
            Some(text) => format!(
                "session: {} turns, {} messages remembered; your last message: \"{text}\"",
                self.turns,
                self.history.len()
            ),
            None => format!("session: {} turns, nothing remembered yet", self.turns),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        // Each entry: its text and id, plus a few bytes of lengths, role and time (varints).
        let size = 64
            + self.conversation_id.len()
            + self
                .history
                .iter()
                .map(|entry| 16 + entry.text.len() + entry.id.as_ref().map_or(0, String::len))
                .sum::<usize>();
        codec::encode_sized(
            &StoringSession {
                conversation_id: &self.conversation_id,
                started_at_ms: self.started_at_ms,
                expires_at_ms: self.expires_at_ms,
                turns: self.turns,
                history: StoringHistory(&self.history),
            },
            size,
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let Encoded::Binary(_) = codec::encoded(bytes) else {
            return codec::decode(bytes);
        };
        let stored: StoredSession = codec::decode(bytes)?;
        Ok(Self {
            conversation_id: stored.conversation_id,
            started_at_ms: stored.started_at_ms,
            expires_at_ms: stored.expires_at_ms,
            turns: stored.turns,
            history: stored
                .history
                .into_iter()
                .map(|entry| HistoryEntry {
                    role: entry.role,
                    text: entry.text,
                    at_ms: entry.at_ms,
                    id: entry.id,
                })
                .collect(),
        })
    }

    /// Milliseconds the session has left (its store TTL).
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.saturating_sub(now_ms).max(1)
    }
}

/// The session a turn records into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    /// The contract's name: `teams-session-{integrationId}-{userId}` in personal chats,
    /// `teams-session-{integrationId}-{conversationId}` in group chats and channels.
    pub name: String,
    /// The personal chat's user, whose session it is (else the conversation's).
    pub user: Option<String>,
}

pub fn session_key(integration: &str, activity: &TurnActivity) -> SessionKey {
    match session_user(activity) {
        Some(user) => SessionKey {
            name: format!("teams-session-{integration}-{user}"),
            user: Some(user.to_owned()),
        },
        None => SessionKey {
            name: format!("teams-session-{integration}-{}", activity.conversation_id()),
            user: None,
        },
    }
}

/// Whose session an activity belongs to: its sender's in a personal chat, else (`None`) its
/// conversation's. Within one conversation this alone tells two sessions apart.
pub fn session_user(activity: &TurnActivity) -> Option<&str> {
    let personal = match activity
        .conversation
        .get("conversationType")
        .and_then(|t| t.as_str())
    {
        Some(kind) => kind == "personal",
        None => !activity
            .conversation
            .get("isGroup")
            .and_then(|g| g.as_bool())
            .unwrap_or(false),
    };
    if !personal {
        return None;
    }
    activity
        .from
        .as_ref()
        .and_then(|f| f.get("id"))
        .and_then(|id| id.as_str())
        .filter(|id| !id.is_empty())
}

pub fn is_reset_command(text: &str) -> bool {
    RESET_COMMANDS.iter().any(|c| text.eq_ignore_ascii_case(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(text: &str) -> HistoryEntry {
        HistoryEntry {
            role: Role::User,
            text: text.into(),
            at_ms: 0,
            id: None,
        }
    }

    #[test]
    fn history_is_bounded_by_count_and_bytes() {
        let mut s = Session::new("c", 0, 1000);
        let limits = HistoryLimits {
            max_entries: 3,
            max_bytes: 10,
        };
        for t in ["aa", "bb", "cc", "dd"] {
            s.record(entry(t), limits);
        }
        assert_eq!(
            s.history
                .iter()
                .map(|e| e.text.as_str())
                .collect::<Vec<_>>(),
            ["bb", "cc", "dd"]
        );
        s.record(entry("0123456789"), limits);
        assert_eq!(s.history.len(), 1, "bytes bound keeps only what fits");
    }

    #[test]
    fn restart_forgets_history_and_starts_a_new_window() {
        let mut s = Session::new("c", 0, 1000);
        let limits = HistoryLimits {
            max_entries: 5,
            max_bytes: 100,
        };
        s.record(entry("x"), limits);
        s.turns = 3;
        let fresh = s.restart(500, 1000);
        assert!(fresh.history.is_empty());
        assert_eq!(fresh.turns, 0);
        assert_eq!(fresh.expires_at_ms, 1500);
        assert!(!fresh.is_expired(1499) && fresh.is_expired(1500));
    }

    #[test]
    fn snapshots_are_binary_and_earlier_json_ones_still_read() {
        let mut session = Session::new("a:1", 10, 1000);
        let limits = HistoryLimits {
            max_entries: 5,
            max_bytes: 100,
        };
        session.record(entry("say \"hi\"\n"), limits);
        session.record(
            HistoryEntry {
                role: Role::Bot,
                text: "hi".into(),
                at_ms: 12,
                id: Some("1:reply".into()),
            },
            limits,
        );
        session.turns = 1;
        let bytes = session.encode().expect("encodes");
        assert_eq!(Session::decode(&bytes).expect("binary"), session);
        let json = serde_json::to_vec(&session).expect("json");
        assert!(
            bytes.len() < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(Session::decode(&json).expect("json"), session);

        let record = ConversationRecord {
            answered: vec![digest("1"), digest("2")],
            last_sequence: 2,
        };
        let bytes = record.encode().expect("encodes");
        assert_eq!(ConversationRecord::decode(&bytes).expect("binary"), record);
        let earlier = br#"{"handledIds":["1","2"],"lastSequence":2}"#;
        assert_eq!(
            ConversationRecord::decode(earlier).expect("json"),
            record,
            "ids written as text before read as their digests"
        );
    }

    fn activity(json: serde_json::Value) -> Result<TurnActivity, crate::activity::ParseError> {
        crate::activity::parse_turn(serde_json::to_vec(&json).unwrap_or_default().into())
    }

    #[test]
    fn keys_follow_the_contract() {
        let personal = activity(json!({
            "type": "message", "id": "1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "a:1", "conversationType": "personal"}, "from": {"id": "29:u"}
        }))
        .unwrap();
        assert_eq!(session_key("i", &personal).name, "teams-session-i-29:u");
        assert_eq!(session_key("i", &personal).user.as_deref(), Some("29:u"));
        let channel = activity(json!({
            "type": "message", "id": "1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "19:c@thread.tacv2", "conversationType": "channel", "isGroup": true},
            "from": {"id": "29:u"}
        }))
        .unwrap();
        assert_eq!(
            session_key("i", &channel),
            SessionKey {
                name: "teams-session-i-19:c@thread.tacv2".into(),
                user: None
            }
        );
        assert!(
            is_reset_command("///RESET")
                && is_reset_command("///new")
                && !is_reset_command("reset")
        );
    }
}
