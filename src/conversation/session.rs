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
    pub history: History,
}

/// One entry of a [`History`], borrowed from it; also how each entry is encoded there and in the
/// snapshot (postcard, every field always written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry<'a> {
    pub role: Role,
    pub text: &'a str,
    pub at_ms: u64,
    /// The user's activity id, or the id the Bot Connector gave the bot's reply.
    pub id: Option<&'a str>,
}

impl Entry<'_> {
    pub fn owned(self) -> HistoryEntry {
        HistoryEntry {
            role: self.role,
            text: self.text.to_owned(),
            at_ms: self.at_ms,
            id: self.id.map(str::to_owned),
        }
    }
}

/// A session's history, oldest first, held the way its snapshot writes it: the entries encoded
/// back to back in one buffer. Recording a turn appends to it and writing the snapshot copies it
/// whole: no allocation per entry, and no entries scattered over the heap to gather at each write.
#[derive(Debug, Clone, Default)]
pub struct History {
    encoded: Vec<u8>,
    /// Where each entry begins in `encoded`; what lies before the first was dropped.
    starts: VecDeque<usize>,
    /// The entries' text bytes, for the byte bound.
    text_bytes: usize,
}

impl History {
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// The entries, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Entry<'_>> {
        (0..self.starts.len()).filter_map(|at| self.entry(at))
    }

    fn entry(&self, at: usize) -> Option<Entry<'_>> {
        let start = *self.starts.get(at)?;
        let end = self
            .starts
            .get(at + 1)
            .copied()
            .unwrap_or(self.encoded.len());
        let (entry, _) = codec::take::<Entry>(self.encoded.get(start..end)?).ok()?;
        Some(entry)
    }

    /// Appends an entry, dropping the oldest ones beyond the limits.
    pub fn push(&mut self, entry: Entry<'_>, limits: HistoryLimits) {
        let start = self.encoded.len();
        if codec::append(&entry, &mut self.encoded).is_err() {
            return;
        }
        self.starts.push_back(start);
        self.text_bytes += entry.text.len();
        while self.starts.len() > limits.max_entries.max(1)
            || (self.text_bytes > limits.max_bytes && self.starts.len() > 1)
        {
            let dropped = self.entry(0).map_or(0, |e| e.text.len());
            self.starts.pop_front();
            self.text_bytes = self.text_bytes.saturating_sub(dropped);
        }
        // What was dropped is reclaimed once it is most of the buffer: amortized O(1) per entry.
        let first = self.starts.front().copied().unwrap_or(self.encoded.len());
        if first > self.encoded.len() / 2 {
            self.encoded.drain(..first);
            for start in &mut self.starts {
                *start -= first;
            }
        }
    }

    /// The live entries' encoding, back to back.
    fn live(&self) -> &[u8] {
        let first = self.starts.front().copied().unwrap_or(self.encoded.len());
        self.encoded.get(first..).unwrap_or_default()
    }

    /// Reads `count` entries encoded back to back at the front of `bytes`, and what follows them.
    fn read(count: u64, bytes: &[u8]) -> Result<(Self, &[u8]), CodecError> {
        let mut history = Self::default();
        let mut rest = bytes;
        for _ in 0..count {
            let (entry, after) = codec::take::<Entry>(rest)?;
            history.starts.push_back(bytes.len() - rest.len());
            history.text_bytes += entry.text.len();
            rest = after;
        }
        history.encoded = bytes[..bytes.len() - rest.len()].to_vec();
        Ok((history, rest))
    }
}

impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

/// As a list of entries (the form of sessions written as JSON before snapshots were binary).
impl Serialize for History {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<HistoryEntry>::deserialize(deserializer)?;
        let mut history = Self::default();
        let unbounded = HistoryLimits {
            max_entries: usize::MAX,
            max_bytes: usize::MAX,
        };
        for entry in &entries {
            history.push(
                Entry {
                    role: entry.role,
                    text: &entry.text,
                    at_ms: entry.at_ms,
                    id: entry.id.as_deref(),
                },
                unbounded,
            );
        }
        Ok(history)
    }
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

/// A record as its snapshot writes it, its answered digests read straight from the window.
#[derive(Serialize)]
#[serde(bound = "")]
struct StoringRecord<I: Iterator<Item = u64> + Clone> {
    answered: Digests<I>,
    last_sequence: u64,
}

struct Digests<I>(I);

/// Counted first: postcard writes a list's length before it, and a filtered window does not
/// know its length.
impl<I: Iterator<Item = u64> + Clone> Serialize for Digests<I> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.clone().count()))?;
        for digest in self.0.clone() {
            seq.serialize_element(&digest)?;
        }
        seq.end()
    }
}

impl ConversationRecord {
    #[cfg(test)]
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Self::encode_from(self.answered.iter().copied(), self.last_sequence)
    }

    /// The snapshot of a record with these answered digests (oldest first), written without
    /// collecting them first.
    pub fn encode_from(
        answered: impl Iterator<Item = u64> + Clone,
        last_sequence: u64,
    ) -> Result<Vec<u8>, CodecError> {
        // A digest is ten bytes as a varint, at most.
        let size = 16 + 10 * answered.clone().count();
        codec::encode_sized(
            &StoringRecord {
                answered: Digests(answered),
                last_sequence,
            },
            size,
        )
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

/// A session's snapshot: these fields, then its history's entry count and entries (as postcard
/// writes a struct with a list last, which is how it was written before the history was kept
/// encoded).
#[derive(Serialize, Deserialize)]
struct SessionHead<'a> {
    conversation_id: std::borrow::Cow<'a, str>,
    started_at_ms: u64,
    expires_at_ms: u64,
    turns: u64,
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
            history: History::default(),
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
    pub fn record(&mut self, entry: Entry<'_>, limits: HistoryLimits) {
        self.history.push(entry, limits);
    }

    /// The answer to [`SESSION_COMMAND`].
    pub fn describe(&self) -> String {
        let last_user = self
            .history
            .iter()
            .rev()
            .find(|e| e.role == Role::User)
            .map(|e| e.text);
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
        let entries = self.history.live();
        let mut bytes = codec::encode_sized(
            &SessionHead {
                conversation_id: self.conversation_id.as_str().into(),
                started_at_ms: self.started_at_ms,
                expires_at_ms: self.expires_at_ms,
                turns: self.turns,
            },
            48 + self.conversation_id.len() + entries.len(),
        )?;
        codec::append(&(self.history.len() as u64), &mut bytes)?;
        bytes.extend_from_slice(entries);
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let Encoded::Binary(rest) = codec::encoded(bytes) else {
            return codec::decode(bytes);
        };
        let (head, rest) = codec::take::<SessionHead>(rest)?;
        let (count, rest) = codec::take::<u64>(rest)?;
        let (history, _) = History::read(count, rest)?;
        Ok(Self {
            conversation_id: head.conversation_id.into_owned(),
            started_at_ms: head.started_at_ms,
            expires_at_ms: head.expires_at_ms,
            turns: head.turns,
            history,
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
    let personal = match activity.conversation_type() {
        Some(kind) => kind == "personal",
        // Rare (Teams gives the type): the conversation is read again for `isGroup`.
        None => !activity
            .conversation()
            .get("isGroup")
            .and_then(|g| g.as_bool())
            .unwrap_or(false),
    };
    if !personal {
        return None;
    }
    activity.from_id().filter(|id| !id.is_empty())
}

pub fn is_reset_command(text: &str) -> bool {
    RESET_COMMANDS.iter().any(|c| text.eq_ignore_ascii_case(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(text: &str) -> Entry<'_> {
        Entry {
            role: Role::User,
            text,
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
            s.history.iter().map(|e| e.text).collect::<Vec<_>>(),
            ["bb", "cc", "dd"]
        );
        s.record(entry("0123456789"), limits);
        assert_eq!(s.history.len(), 1, "bytes bound keeps only what fits");
    }

    #[test]
    fn a_long_history_keeps_its_newest_entries_in_a_bounded_buffer() {
        let mut s = Session::new("c", 0, 1000);
        let limits = HistoryLimits {
            max_entries: 50,
            max_bytes: 32 * 1024,
        };
        let texts: Vec<String> = (0..10_000).map(|n| format!("message {n}")).collect();
        for (n, text) in texts.iter().enumerate() {
            let id = n.to_string();
            s.record(
                Entry {
                    role: if n % 2 == 0 { Role::User } else { Role::Bot },
                    text,
                    at_ms: n as u64,
                    id: Some(&id),
                },
                limits,
            );
        }
        let kept: Vec<_> = s.history.iter().map(|e| (e.text, e.at_ms)).collect();
        let expected: Vec<_> = (9_950..10_000)
            .map(|n| (texts[n].as_str(), n as u64))
            .collect();
        assert_eq!(kept, expected);
        assert!(
            s.history.encoded.len() < 2 * 50 * 32,
            "{}",
            s.history.encoded.len()
        );
        assert_eq!(
            s.history.iter().next_back().and_then(|e| e.id),
            Some("9999")
        );
        assert_eq!(
            Session::decode(&s.encode().expect("encodes")).expect("reads"),
            s
        );
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
        assert_eq!(fresh.history.len(), 0);
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
            Entry {
                role: Role::Bot,
                text: "hi",
                at_ms: 12,
                id: Some("1:reply"),
            },
            limits,
        );
        session.turns = 1;
        let bytes = session.encode().expect("encodes");
        assert_eq!(Session::decode(&bytes).expect("binary"), session);
        // Written as the whole session was written before its history was kept encoded.
        #[derive(Serialize)]
        struct Before<'a> {
            conversation_id: &'a str,
            started_at_ms: u64,
            expires_at_ms: u64,
            turns: u64,
            history: Vec<Entry<'a>>,
        }
        let before = Before {
            conversation_id: "a:1",
            started_at_ms: 10,
            expires_at_ms: 1010,
            turns: 1,
            history: session.history.iter().collect(),
        };
        assert_eq!(codec::encode(&before).expect("encodes"), bytes);
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
        #[derive(Serialize)]
        struct RecordBefore<'a> {
            answered: &'a [u64],
            last_sequence: u64,
        }
        let before = RecordBefore {
            answered: &record.answered,
            last_sequence: 2,
        };
        assert_eq!(codec::encode(&before).expect("encodes"), bytes);
        // Straight from a window, whose answered digests are a filter of what it took.
        let mut window = super::super::dedup::DedupWindow::new(8);
        for id in ["1", "skipped", "2"] {
            window.take(id);
        }
        window.mark_answered("1");
        window.mark_answered("2");
        let from_window =
            ConversationRecord::encode_from(window.answered(), 2).expect("encodes from a window");
        assert_eq!(from_window, bytes);
        let earlier = br#"{"handledIds":["1","2"],"lastSequence":2}"#;
        assert_eq!(
            ConversationRecord::decode(earlier).expect("json"),
            record,
            "ids written as text before read as their digests"
        );
    }

    #[test]
    fn keys_follow_the_contract() {
        let personal = TurnActivity::of_json(&json!({
            "type": "message", "id": "1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "a:1", "conversationType": "personal"}, "from": {"id": "29:u"}
        }));
        assert_eq!(session_key("i", &personal).name, "teams-session-i-29:u");
        assert_eq!(session_key("i", &personal).user.as_deref(), Some("29:u"));
        let channel = TurnActivity::of_json(&json!({
            "type": "message", "id": "1", "serviceUrl": "s", "channelId": "msteams",
            "conversation": {"id": "19:c@thread.tacv2", "conversationType": "channel", "isGroup": true},
            "from": {"id": "29:u"}
        }));
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
