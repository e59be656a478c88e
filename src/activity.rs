//! The activity as the router sees it: parsed once, owned, by simd-json on the request path
//! ([`parse_turn`]); the request path checks and routes it through its borrowed [`Envelope`], and
//! the conversation's turn reads the same parse. Mention stripping lives here.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The routing envelope with every required field present.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub service_url: &'a str,
    pub channel_id: &'a str,
    pub conversation_id: &'a str,
    /// `conversation.tenantId`, else `channelData.tenant.id`.
    pub tenant_id: Option<&'a str>,
    /// `from.id` and `from.aadObjectId` (for `allowFrom`).
    pub from_id: Option<&'a str>,
    pub from_aad_object_id: Option<&'a str>,
    /// An invoke's name.
    pub name: Option<&'a str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("missing field: {0}")]
    MissingField(&'static str),
    #[error("the JSON nests deeper than {MAX_NESTING} levels")]
    TooDeep,
}

/// Per-thread parse scratch: the one copy of the body simd-json needs, and its reusable buffers.
struct Scratch {
    bytes: Vec<u8>,
    buffers: simd_json::Buffers,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        bytes: Vec::with_capacity(4096),
        buffers: simd_json::Buffers::new(4096),
    });
}

/// Parses `body` once, owned, by simd-json: the request path checks and routes it through its
/// [`TurnActivity::envelope`], and the turn reads it. The body is copied once into a per-thread
/// buffer (simd-json rewrites its input), whose buffers are reused.
pub fn parse_turn(body: &[u8]) -> Result<TurnActivity, ParseError> {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let Scratch { bytes, buffers } = &mut *scratch;
            bytes.clear();
            bytes.extend_from_slice(body);
            simd_json::serde::from_slice_with_buffers::<TurnActivity>(bytes.as_mut_slice(), buffers)
                .map_err(|e| ParseError::Malformed(e.to_string()))
        }
        Err(_) => simd_json::serde::from_slice::<TurnActivity>(&mut body.to_vec())
            .map_err(|e| ParseError::Malformed(e.to_string())),
    })
}

/// Arrays and objects an activity may nest at most. Teams' deepest payloads (Adaptive Cards in
/// attachments and invoke values) stay far below it; the actor's parser refuses input past 128.
pub const MAX_NESTING: usize = 64;

/// What the envelope parse does not see but the actor's full parse needs: nesting no deeper than
/// [`MAX_NESTING`]. Checked on the request path, so that nothing is acknowledged that the
/// conversation could not read. No allocation; a body with few brackets (every Teams activity
/// seen so far) is cleared by one SIMD count, and strings are skipped with `memchr`.
pub fn admissible(body: &[u8]) -> Result<(), ParseError> {
    let openers = memchr::memchr2_iter(b'[', b'{', body)
        .take(MAX_NESTING + 1)
        .count();
    if openers <= MAX_NESTING {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = body.get(at) {
        at += 1;
        match byte {
            b'"' => {
                // To the closing quote: past escapes, whatever the string holds.
                loop {
                    match memchr::memchr2(b'"', b'\\', &body[at.min(body.len())..]) {
                        Some(offset) if body[at + offset] == b'\\' => at += offset + 2,
                        Some(offset) => {
                            at += offset + 1;
                            break;
                        }
                        None => return Ok(()),
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(ParseError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The activity a turn works on, owned; parsed by the conversation actor, never on the request
/// path. Objects the reply echoes back (`from`, `recipient`, `conversation`) stay as JSON so that
/// every field Teams sent is preserved.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TurnActivity {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub service_url: String,
    pub channel_id: String,
    pub conversation: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members_added: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members_removed: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Value>,
    /// `installationUpdate`: `add` or `remove` (and their `-upgrade` forms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_data: Option<Value>,
    /// Every other field Teams sent, so that a webhook gets the activity whole.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl TurnActivity {
    /// An installation or membership update saying the bot is no longer here: the app
    /// uninstalled, the bot removed, the team or channel deleted.
    pub fn says_bot_left(&self) -> bool {
        match self.kind.as_str() {
            "installationUpdate" => self
                .action
                .as_deref()
                .is_some_and(|a| a.starts_with("remove")),
            "conversationUpdate" => {
                let event = self
                    .channel_data
                    .as_ref()
                    .and_then(|d| d.get("eventType"))
                    .and_then(|e| e.as_str());
                let bot = self
                    .recipient
                    .as_ref()
                    .and_then(|r| r.get("id"))
                    .and_then(|id| id.as_str());
                matches!(event, Some("teamDeleted" | "channelDeleted"))
                    || bot.is_some_and(|bot| {
                        self.members_removed
                            .iter()
                            .any(|m| m.get("id").and_then(|id| id.as_str()) == Some(bot))
                    })
            }
            _ => false,
        }
    }

    /// The fields routing and the request's checks need, with every required one present and
    /// not empty.
    pub fn envelope(&self) -> Result<Envelope<'_>, ParseError> {
        fn required<'b>(v: &'b str, name: &'static str) -> Result<&'b str, ParseError> {
            (!v.is_empty())
                .then_some(v)
                .ok_or(ParseError::MissingField(name))
        }
        let conversation_id = self
            .conversation
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or(ParseError::MissingField("conversation.id"))?;
        Ok(Envelope {
            kind: required(&self.kind, "type")?,
            id: required(&self.id, "id")?,
            service_url: required(&self.service_url, "serviceUrl")?,
            channel_id: required(&self.channel_id, "channelId")?,
            conversation_id,
            tenant_id: self.tenant_id().filter(|tenant| !tenant.is_empty()),
            from_id: self.from_field("id"),
            from_aad_object_id: self.from_field("aadObjectId"),
            name: self.name.as_deref(),
        })
    }

    pub fn conversation_id(&self) -> &str {
        self.conversation
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The sender's Teams user id (`from.id`).
    pub fn from_field(&self, name: &str) -> Option<&str> {
        self.from.as_ref()?.get(name)?.as_str()
    }

    /// The tenant: `conversation.tenantId`, else `channelData.tenant.id`.
    pub fn tenant_id(&self) -> Option<&str> {
        self.conversation
            .get("tenantId")
            .and_then(Value::as_str)
            .or_else(|| {
                self.channel_data
                    .as_ref()?
                    .get("tenant")?
                    .get("id")?
                    .as_str()
            })
    }

    pub fn recipient_id(&self) -> Option<&str> {
        self.recipient.as_ref()?.get("id")?.as_str()
    }

    /// The text with every mention of the bot itself removed, as a user typed it.
    pub fn text_without_bot_mentions(&self) -> String {
        strip_mentions(
            self.text.as_deref().unwrap_or_default(),
            &self.entities,
            self.recipient_id(),
        )
    }

    /// True when a `conversationUpdate` says the bot itself was added.
    /// A one-to-one chat with the bot (the only kind Teams streams answers into).
    pub fn is_personal(&self) -> bool {
        self.conversation
            .get("conversationType")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind == "personal")
    }

    pub fn bot_was_added(&self) -> bool {
        let Some(bot) = self.recipient_id() else {
            return false;
        };
        self.kind == "conversationUpdate"
            && self
                .members_added
                .iter()
                .any(|m| m.get("id").and_then(Value::as_str) == Some(bot))
    }
}

/// One pass over the activity's fields: each known one is taken as it is read (a value of the
/// wrong type for a lenient field is dropped), every other one goes to `extra` as it is. No
/// intermediate map, no second pass (`#[serde(flatten)]` would buffer the whole activity).
impl<'de> Deserialize<'de> for TurnActivity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TurnActivityVisitor)
    }
}

struct TurnActivityVisitor;

impl<'de> serde::de::Visitor<'de> for TurnActivityVisitor {
    type Value = TurnActivity;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an activity object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TurnActivity, A::Error> {
        use serde::de::Error;
        fn text(value: Value) -> Option<String> {
            match value {
                Value::String(text) => Some(text),
                _ => None,
            }
        }
        fn list(value: Value) -> Vec<Value> {
            match value {
                Value::Array(items) => items,
                _ => Vec::new(),
            }
        }
        fn object(value: Value) -> Option<Value> {
            (!value.is_null()).then_some(value)
        }
        let (mut kind, mut id, mut service_url, mut channel_id) = (None, None, None, None);
        let mut conversation = None;
        let mut activity = TurnActivity {
            kind: String::new(),
            id: String::new(),
            service_url: String::new(),
            channel_id: String::new(),
            conversation: Value::Null,
            from: None,
            recipient: None,
            text: None,
            value: None,
            name: None,
            locale: None,
            entities: Vec::new(),
            members_added: Vec::new(),
            members_removed: Vec::new(),
            attachments: Vec::new(),
            action: None,
            channel_data: None,
            extra: serde_json::Map::new(),
        };
        // A field that routing or the request's checks read, given twice, is refused: which one
        // counts would be up to the parser (and to whatever parsed it before us). Any other key
        // given twice keeps its last value, as JSON parsers commonly do.
        let mut checked_seen = 0u8;
        while let Some(key) = map.next_key::<Key>()? {
            if let Some(bit) = CHECKED_FIELDS.iter().position(|f| *f == key.0) {
                if checked_seen & (1 << bit) != 0 {
                    return Err(A::Error::duplicate_field(CHECKED_FIELDS[bit]));
                }
                checked_seen |= 1 << bit;
            }
            match key.0.as_ref() {
                "type" => kind = Some(map.next_value::<String>()?),
                "id" => id = Some(map.next_value::<String>()?),
                "serviceUrl" => service_url = Some(map.next_value::<String>()?),
                "channelId" => channel_id = Some(map.next_value::<String>()?),
                "conversation" => {
                    conversation = Some(map.next_value_seed(UniqueKeys {
                        checked: &["id", "tenantId"],
                        tenant: false,
                    })?)
                }
                "from" => {
                    activity.from = object(map.next_value_seed(UniqueKeys {
                        checked: &["id", "aadObjectId"],
                        tenant: false,
                    })?)
                }
                "recipient" => activity.recipient = object(map.next_value()?),
                "value" => activity.value = object(map.next_value()?),
                "channelData" => {
                    activity.channel_data = object(map.next_value_seed(UniqueKeys {
                        checked: &["tenant"],
                        tenant: true,
                    })?)
                }
                "text" => activity.text = text(map.next_value()?),
                "name" => activity.name = text(map.next_value()?),
                "locale" => activity.locale = text(map.next_value()?),
                "action" => activity.action = text(map.next_value()?),
                "entities" => activity.entities = list(map.next_value()?),
                "membersAdded" => activity.members_added = list(map.next_value()?),
                "membersRemoved" => activity.members_removed = list(map.next_value()?),
                "attachments" => activity.attachments = list(map.next_value()?),
                _ => {
                    let value = map.next_value::<Value>()?;
                    activity.extra.insert(key.0.into_owned(), value);
                }
            }
        }
        // A missing field reads as empty here: [`TurnActivity::envelope`] names it.
        activity.kind = kind.unwrap_or_default();
        activity.id = id.unwrap_or_default();
        activity.service_url = service_url.unwrap_or_default();
        activity.channel_id = channel_id.unwrap_or_default();
        activity.conversation = conversation.unwrap_or_default();
        Ok(activity)
    }
}

/// The top-level fields the request path checks or routes by (`conversation.id`, `from.id`,
/// `channelData.tenant.id` and the invoke's `name` among them): the first of [`KNOWN_FIELDS`].
const CHECKED_FIELDS: &[&str] = KNOWN_FIELDS.split_at(8).0;

/// Reads a JSON value, refusing an object that gives one of the `checked` keys twice (with
/// `tenant`, also `tenant.id` twice): for the objects whose fields the checks read.
struct UniqueKeys {
    checked: &'static [&'static str],
    tenant: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        use serde::de::Error;
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = if self.tenant && key == "tenant" {
                map.next_value_seed(UniqueKeys {
                    checked: &["id"],
                    tenant: false,
                })?
            } else {
                map.next_value::<Value>()?
            };
            if self.checked.contains(&key.as_str()) && object.contains_key(&key) {
                return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
            }
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A field name of an activity: a known one without allocating (even when the parser hands it
/// over unescaped in a scratch buffer), any other one owned, for `extra`.
struct Key(std::borrow::Cow<'static, str>);

/// The fields [`TurnActivityVisitor`] takes by name, those of [`CHECKED_FIELDS`] first.
const KNOWN_FIELDS: &[&str] = &[
    "type",
    "id",
    "serviceUrl",
    "channelId",
    "conversation",
    "from",
    "channelData",
    "name",
    "recipient",
    "value",
    "text",
    "locale",
    "action",
    "entities",
    "membersAdded",
    "membersRemoved",
    "attachments",
];

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, name: &str) -> Result<Key, E> {
                Ok(Key(
                    match KNOWN_FIELDS.iter().find(|known| **known == name) {
                        Some(known) => std::borrow::Cow::Borrowed(*known),
                        None => std::borrow::Cow::Owned(name.to_owned()),
                    },
                ))
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// Removes every occurrence of each mention text whose `mentioned.id` is the bot, then trims
/// spaces, `&nbsp;` and newlines. Identity comes from the entity id, never the display name.
pub fn strip_mentions(text: &str, entities: &[Value], bot_id: Option<&str>) -> String {
    let mut out = text.to_owned();
    if let Some(bot_id) = bot_id {
        for entity in entities {
            let is_bot_mention = entity.get("type").and_then(Value::as_str) == Some("mention")
                && entity
                    .get("mentioned")
                    .and_then(|m| m.get("id"))
                    .and_then(Value::as_str)
                    == Some(bot_id);
            if let Some(mention) = entity
                .get("text")
                .and_then(Value::as_str)
                .filter(|t| is_bot_mention && !t.is_empty())
            {
                out = out.replace(mention, "");
            }
        }
    }
    let out = out.replace("&nbsp;", " ");
    out.trim_matches(|c: char| c.is_whitespace() || c == '\u{a0}')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope of one parse, handed to `f` (it borrows the parse).
    fn with_envelope<R>(body: &[u8], f: impl FnOnce(Result<Envelope<'_>, ParseError>) -> R) -> R {
        match parse_turn(body) {
            Ok(activity) => f(activity.envelope()),
            Err(error) => f(Err(error)),
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/activities/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn field_names_are_read_escaped_or_not_and_others_kept() {
        let body = br#"{"type":"message","id":"1","serviceUrl":"https://x/","channelId":"msteams","conversation":{"id":"a"},"te\u0078t":"hi","locale":"en","x-custom":{"k":1}}"#;
        let activity = parse_turn(body).expect("parses");
        assert_eq!(activity.text.as_deref(), Some("hi"));
        assert_eq!(activity.locale.as_deref(), Some("en"));
        assert_eq!(
            activity.extra.get("x-custom"),
            Some(&serde_json::json!({"k": 1}))
        );
        assert_eq!(activity.extra.len(), 1);
    }

    #[test]
    fn a_fixture_parsed_and_serialized_is_the_activity_teams_sent() {
        let dir = format!("{}/fixtures/activities", env!("CARGO_MANIFEST_DIR"));
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).expect("fixtures") {
            let path = entry.expect("fixture").path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let body = std::fs::read(&path).expect("fixture");
            let sent: Value = serde_json::from_slice(&body).expect("fixture JSON");
            let activity = parse_turn(&body).expect("parses");
            // What a webhook gets.
            let whole = serde_json::to_value(&activity).expect("serializes");
            assert_eq!(whole, sent, "{}", path.display());
            read += 1;
        }
        assert!(read >= 10, "{read} fixtures");
    }

    /// Found by the `activity_envelope` fuzz target: the envelope check ignores keys it does not
    /// route by, so the actor's parse must take whatever the envelope check let through.
    #[test]
    fn acknowledged_activities_with_repeated_or_odd_keys_parse() {
        let base = r#"{"type":"message","id":"1","serviceUrl":"https://x/","channelId":"msteams","conversation":{"id":"a"}"#;
        for extra in [
            r#","recipient":{"id":"28:a"},"recipient":{"id":"28:b"}"#,
            r#","text":"first","text":"second""#,
            r#","text":5,"locale":[],"name":{},"action":true"#,
            r#","entities":{"type":"mention"},"membersAdded":"x","attachments":1"#,
        ] {
            let body = format!("{base}{extra}}}");
            let routable = with_envelope(body.as_bytes(), |e| e.is_ok());
            assert!(routable && admissible(body.as_bytes()).is_ok(), "{body}");
            let turn = parse_turn(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(turn.id, "1");
        }
        let twice = format!("{base},\"text\":\"first\",\"text\":\"second\"}}");
        let turn = parse_turn(twice.as_bytes()).unwrap();
        assert_eq!(turn.text.as_deref(), Some("second"));
        let deep = format!("{base},\"value\":{}{}}}", "[".repeat(65), "]".repeat(65));
        assert_eq!(admissible(deep.as_bytes()), Err(ParseError::TooDeep));
        let in_string = format!("{base},\"text\":\"{}\"}}", "[".repeat(1000));
        assert_eq!(admissible(in_string.as_bytes()), Ok(()));
    }

    /// The fast nesting check agrees with the plain byte-by-byte one on inputs made of the bytes
    /// that matter (brackets, quotes, backslashes), deep and shallow.
    #[test]
    fn nesting_check_agrees_with_a_plain_scan() {
        fn plain(body: &[u8]) -> bool {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            for &b in body {
                if in_string {
                    match b {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > MAX_NESTING {
                            return false;
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            true
        }
        let alphabet = b"[[[{{]}\"\\a";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..2_000 {
            let len = 50 + round % 400;
            let body: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            assert_eq!(
                admissible(&body).is_ok(),
                plain(&body),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn envelope_of_every_fixture() {
        for name in [
            "personal-message.json",
            "channel-message-mention.json",
            "invoke-adaptivecard-action.json",
            "conversationupdate-membersadded-team.json",
            "installationupdate-add-team.json",
            "messagereaction-added.json",
        ] {
            let body = fixture(name);
            with_envelope(&body, |env| {
                let env = env.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(env.channel_id, "msteams", "{name}");
                assert!(!env.conversation_id.is_empty());
            });
        }
    }

    #[test]
    fn escaped_strings_are_unescaped_in_place() {
        let body = fixture("channel-message-mention.json");
        with_envelope(&body, |env| {
            let env = env.unwrap();
            assert_eq!(
                env.conversation_id,
                "19:6848757105754c8981c67612732d9aa7@thread.tacv2;messageid=1759881511856"
            );
            assert_eq!(env.tenant_id, Some("50612dbb-0237-4969-b378-8d42590f9c00"));
        });
    }

    #[test]
    fn tenant_falls_back_to_channel_data() {
        let body = fixture("personal-message.json");
        with_envelope(&body, |env| {
            assert_eq!(
                env.unwrap().tenant_id,
                Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
            )
        });
    }

    #[test]
    fn missing_fields_are_named() {
        let cases = [
            (
                r#"{"id":"1","serviceUrl":"s","channelId":"c","conversation":{"id":"x"}}"#,
                "type",
            ),
            (
                r#"{"type":"message","serviceUrl":"s","channelId":"c","conversation":{"id":"x"}}"#,
                "id",
            ),
            (
                r#"{"type":"message","id":"1","channelId":"c","conversation":{"id":"x"}}"#,
                "serviceUrl",
            ),
            (
                r#"{"type":"message","id":"1","serviceUrl":"s","channelId":"c"}"#,
                "conversation.id",
            ),
            (
                r#"{"type":"message","id":"1","serviceUrl":"s","channelId":"c","conversation":{"id":""}}"#,
                "conversation.id",
            ),
            (
                r#"{"type":"message","id":"1","serviceUrl":"s","conversation":{"id":"x"}}"#,
                "channelId",
            ),
        ];
        for (body, field) in cases {
            with_envelope(body.as_bytes(), |env| {
                assert_eq!(env.unwrap_err(), ParseError::MissingField(field), "{body}")
            });
        }
    }

    #[test]
    fn a_checked_field_given_twice_is_refused_and_others_keep_the_last() {
        let base = r#"{"type":"message","id":"1","serviceUrl":"s","channelId":"c""#;
        for twice in [
            r#","conversation":{"id":"x"},"serviceUrl":"t"}"#,
            r#","conversation":{"id":"x","id":"y"}}"#,
            r#","conversation":{"id":"x"},"from":{"id":"a","id":"b"}}"#,
            r#","conversation":{"id":"x"},"channelData":{"tenant":{"id":"a","id":"b"}}}"#,
            r#","conversation":{"id":"x"},"channelData":{"tenant":{"id":"a"},"tenant":{"id":"b"}}}"#,
        ] {
            let body = format!("{base}{twice}");
            match parse_turn(body.as_bytes()) {
                Err(ParseError::Malformed(reason)) => {
                    assert!(reason.contains("duplicate"), "{body}: {reason}")
                }
                other => panic!("{body}: {:?}", other.map(|a| a.id)),
            }
        }
        let body = format!(
            r#"{base},"conversation":{{"id":"x"}},"channelData":{{"a":1,"a":2}},"locale":"x","locale":"y"}}"#
        );
        let activity = parse_turn(body.as_bytes()).unwrap();
        assert_eq!(activity.locale.as_deref(), Some("y"));
        assert_eq!(activity.channel_data, Some(serde_json::json!({"a": 2})));
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        for body in [
            &b"{"[..],
            b"",
            b"[1,2]",
            b"{\"type\": 5}",
            b"\xff\xfe",
            b"null",
        ] {
            with_envelope(body, |env| assert!(env.is_err(), "{body:?}"));
        }
    }

    #[test]
    fn bot_mentions_are_stripped_everywhere_and_others_kept() {
        let body = fixture("channel-message-mention.json");
        let activity = parse_turn(&body).unwrap();
        assert_eq!(activity.text_without_bot_mentions(), "reply to thread");

        let entities = vec![
            serde_json::json!({"type":"mention","mentioned":{"id":"28:bot"},"text":"<at>Bot</at>"}),
            serde_json::json!({"type":"mention","mentioned":{"id":"29:user"},"text":"<at>Ann</at>"}),
        ];
        let text = "<at>Bot</at>&nbsp;hi <at>Ann</at> <at>Bot</at>\n";
        assert_eq!(
            strip_mentions(text, &entities, Some("28:bot")),
            "hi <at>Ann</at>"
        );
    }

    #[test]
    fn bot_added_is_detected_from_members_added() {
        let body = fixture("conversationupdate-membersadded-personal.json");
        let mut activity = parse_turn(&body).unwrap();
        assert!(
            !activity.bot_was_added(),
            "placeholder ids differ in the fixture"
        );
        activity.recipient =
            Some(serde_json::json!({"id": "28:f5d48856-5b42-41a0-8c3a-c5f944b679b0"}));
        assert!(activity.bot_was_added());
    }
}
