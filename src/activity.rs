//! The activity as the router sees it: parsed once on the request path ([`parse_turn`]), by
//! serde_json borrowing from the request's bytes, and kept as one exact copy of those bytes with
//! the positions of the fields the router reads. The request path checks and routes it through
//! its borrowed [`Envelope`]; the turn reads the same parse. Objects the reply echoes back
//! (`from`, `recipient`, `conversation`) and those a webhook gets are the bytes Teams sent, never
//! a rebuilt tree. Mention stripping lives here.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

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

/// Parses `body` once: serde_json borrows every string without escapes and every object the
/// router does not look into, then the body is copied once, exactly, into the activity, and
/// what was borrowed becomes a position in that copy. No tree is built and no field allocated
/// but the strings that had escapes (their unescaped text has to live somewhere).
///
/// simd-json is not used here: it rewrites its input (so the bytes a webhook gets would need a
/// second copy) and cannot hand over an object unparsed.
pub fn parse_turn(body: &[u8]) -> Result<TurnActivity, ParseError> {
    let text = std::str::from_utf8(body).map_err(|e| ParseError::Malformed(e.to_string()))?;
    Fields::parse(text)
        .and_then(|fields| fields.into_activity(text))
        .map_err(|e| ParseError::Malformed(e.to_string()))
}

/// Arrays and objects an activity may nest at most. Teams' deepest payloads (Adaptive Cards in
/// attachments and invoke values) stay far below it; the parser refuses input past 128.
pub const MAX_NESTING: usize = 64;

/// What the parse bounds only at 128: nesting no deeper than [`MAX_NESTING`], checked on the
/// request path before any parser walks the body. No allocation; a body with few brackets
/// (every Teams activity seen so far) is cleared by one SIMD count, and strings are skipped
/// with `memchr`.
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

/// Where a piece of the activity is in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

/// A string field: where it is in the body, or its unescaped text when it had escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Text {
    At(Span),
    Unescaped(Box<str>),
}

/// The activity a turn works on: the body Teams sent, copied once, and where the fields the
/// router reads are in it. Objects read rarely (`channelData`, `value`, members, attachments)
/// are parsed when asked for.
#[derive(Debug, Clone)]
pub struct TurnActivity {
    body: Box<str>,
    kind: Text,
    id: Text,
    service_url: Text,
    channel_id: Text,
    conversation: Option<Span>,
    conversation_id: Option<Text>,
    tenant_id: Option<Text>,
    conversation_type: Option<Text>,
    from: Option<Span>,
    from_id: Option<Text>,
    from_aad_object_id: Option<Text>,
    from_name: Option<Text>,
    recipient: Option<Span>,
    recipient_id: Option<Text>,
    text: Option<Text>,
    name: Option<Text>,
    locale: Option<Text>,
    /// When the channel stamped it (the user sent it), RFC 3339 in UTC.
    timestamp: Option<Text>,
    action: Option<Text>,
    value: Option<Span>,
    entities: Option<Span>,
    members_added: Option<Span>,
    members_removed: Option<Span>,
    attachments: Option<Span>,
    channel_data: Option<Span>,
    event_type: Option<Text>,
    /// The integration does not pass attachments on: the turn and a webhook see none.
    attachments_hidden: bool,
}

impl TurnActivity {
    fn text<'s>(&'s self, text: &'s Text) -> &'s str {
        match text {
            Text::At(span) => self.slice(*span),
            Text::Unescaped(text) => text,
        }
    }

    fn slice(&self, span: Span) -> &str {
        self.body
            .get(span.start as usize..span.end as usize)
            .unwrap_or_default()
    }

    fn optional<'s>(&'s self, text: &'s Option<Text>) -> Option<&'s str> {
        text.as_ref().map(|t| self.text(t))
    }

    /// A rarely read object or list, as a JSON value (`None` when absent or `null`).
    fn parsed(&self, span: Option<Span>) -> Option<Value> {
        span.and_then(|span| serde_json::from_str(self.slice(span)).ok())
    }

    /// The elements of a list field; a field that is not a list has none.
    fn list(&self, span: Option<Span>) -> Vec<Value> {
        match self.parsed(span) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        }
    }

    pub fn kind(&self) -> &str {
        self.text(&self.kind)
    }

    pub fn id(&self) -> &str {
        self.text(&self.id)
    }

    pub fn service_url(&self) -> &str {
        self.text(&self.service_url)
    }

    pub fn channel_id(&self) -> &str {
        self.text(&self.channel_id)
    }

    pub fn conversation_id(&self) -> &str {
        self.optional(&self.conversation_id).unwrap_or_default()
    }

    /// The tenant: `conversation.tenantId`, else `channelData.tenant.id`.
    pub fn tenant_id(&self) -> Option<&str> {
        self.optional(&self.tenant_id)
    }

    /// `from.id`, the sender's Teams user id.
    pub fn from_id(&self) -> Option<&str> {
        self.optional(&self.from_id)
    }

    pub fn from_aad_object_id(&self) -> Option<&str> {
        self.optional(&self.from_aad_object_id)
    }

    pub fn from_name(&self) -> Option<&str> {
        self.optional(&self.from_name)
    }

    pub fn recipient_id(&self) -> Option<&str> {
        self.optional(&self.recipient_id)
    }

    pub fn text_field(&self) -> Option<&str> {
        self.optional(&self.text)
    }

    /// An invoke's or event's name.
    pub fn name(&self) -> Option<&str> {
        self.optional(&self.name)
    }

    pub fn locale(&self) -> Option<&str> {
        self.optional(&self.locale)
    }

    /// `timestamp`: when the channel stamped the activity, as it wrote it.
    pub fn timestamp(&self) -> Option<&str> {
        self.optional(&self.timestamp)
    }

    /// `installationUpdate`: `add` or `remove` (and their `-upgrade` forms).
    pub fn action(&self) -> Option<&str> {
        self.optional(&self.action)
    }

    /// `channelData.eventType` (channelCreated, teamDeleted, ...).
    pub fn event_type(&self) -> Option<&str> {
        self.optional(&self.event_type)
    }

    /// The conversation object as Teams sent it.
    pub fn conversation_json(&self) -> Option<&str> {
        self.conversation.map(|span| self.slice(span))
    }

    /// The sender's account object as Teams sent it.
    pub fn from_json(&self) -> Option<&str> {
        self.from.map(|span| self.slice(span))
    }

    /// The bot's account object as Teams sent it.
    pub fn recipient_json(&self) -> Option<&str> {
        self.recipient.map(|span| self.slice(span))
    }

    pub fn conversation(&self) -> Value {
        self.parsed(self.conversation).unwrap_or_default()
    }

    pub fn recipient(&self) -> Option<Value> {
        self.parsed(self.recipient)
    }

    pub fn has_recipient(&self) -> bool {
        self.recipient.is_some()
    }

    /// An invoke's or a card submission's `value`.
    pub fn value(&self) -> Option<Value> {
        self.parsed(self.value)
    }

    pub fn channel_data(&self) -> Option<Value> {
        self.parsed(self.channel_data)
    }

    pub fn members_added(&self) -> Vec<Value> {
        self.list(self.members_added)
    }

    pub fn members_removed(&self) -> Vec<Value> {
        self.list(self.members_removed)
    }

    /// How many attachments the turn sees, without reading them.
    pub fn attachment_count(&self) -> usize {
        if self.attachments_hidden {
            return 0;
        }
        self.attachments
            .and_then(|span| serde_json::from_str::<Count>(self.slice(span)).ok())
            .map_or(0, |count| count.0)
    }

    /// The integration does not pass attachments on: from now on the turn and a webhook see
    /// none.
    pub fn hide_attachments(&mut self) {
        self.attachments_hidden = true;
    }

    /// An installation or membership update saying the bot is no longer here: the app
    /// uninstalled, the bot removed, the team or channel deleted.
    pub fn says_bot_left(&self) -> bool {
        match self.kind() {
            "installationUpdate" => self.action().is_some_and(|a| a.starts_with("remove")),
            "conversationUpdate" => {
                matches!(self.event_type(), Some("teamDeleted" | "channelDeleted"))
                    || self.lists_bot(self.members_removed)
            }
            _ => false,
        }
    }

    /// True when a member list (`membersAdded`, `membersRemoved`) names the bot itself.
    fn lists_bot(&self, members: Option<Span>) -> bool {
        let Some(bot) = self.recipient_id() else {
            return false;
        };
        self.list(members)
            .iter()
            .any(|m| m.get("id").and_then(Value::as_str) == Some(bot))
    }

    /// `membersRemoved` names the bot itself.
    pub fn bot_was_removed(&self) -> bool {
        self.lists_bot(self.members_removed)
    }

    /// True when a `conversationUpdate` says the bot itself was added.
    pub fn bot_was_added(&self) -> bool {
        self.kind() == "conversationUpdate" && self.lists_bot(self.members_added)
    }

    /// The fields routing and the request's checks need, with every required one present and
    /// not empty.
    pub fn envelope(&self) -> Result<Envelope<'_>, ParseError> {
        fn required<'b>(v: &'b str, name: &'static str) -> Result<&'b str, ParseError> {
            (!v.is_empty())
                .then_some(v)
                .ok_or(ParseError::MissingField(name))
        }
        Ok(Envelope {
            kind: required(self.kind(), "type")?,
            id: required(self.id(), "id")?,
            service_url: required(self.service_url(), "serviceUrl")?,
            channel_id: required(self.channel_id(), "channelId")?,
            conversation_id: required(self.conversation_id(), "conversation.id")?,
            tenant_id: self.tenant_id().filter(|tenant| !tenant.is_empty()),
            from_id: self.from_id(),
            from_aad_object_id: self.from_aad_object_id(),
            name: self.name(),
        })
    }

    /// The text with every mention of the bot itself removed, as a user typed it.
    pub fn text_without_bot_mentions(&self) -> String {
        strip_mentions(
            self.text_field().unwrap_or_default(),
            self.entities.map(|span| self.slice(span)),
            self.recipient_id(),
        )
    }

    /// A one-to-one chat with the bot (the only kind Teams streams answers into).
    pub fn is_personal(&self) -> bool {
        self.optional(&self.conversation_type) == Some("personal")
    }

    /// `conversation.conversationType`, when Teams gave it.
    pub fn conversation_type(&self) -> Option<&str> {
        self.optional(&self.conversation_type)
    }
}

#[cfg(test)]
impl TurnActivity {
    /// An activity from a JSON value, as if Teams had sent it.
    pub(crate) fn of_json(value: &Value) -> Self {
        match parse_turn(value.to_string().as_bytes()) {
            Ok(activity) => activity,
            Err(error) => panic!("{value}: {error}"),
        }
    }
}

/// What a webhook gets: the activity Teams sent, as it sent it (without its attachments when
/// the integration does not pass them on).
impl Serialize for TurnActivity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        if self.attachments_hidden {
            let mut fields: serde_json::Map<String, Value> =
                serde_json::from_str(&self.body).map_err(S::Error::custom)?;
            fields.remove("attachments");
            return fields.serialize(serializer);
        }
        let whole: &RawValue = serde_json::from_str(&self.body).map_err(S::Error::custom)?;
        whole.serialize(serializer)
    }
}

/// A piece of an activity written into another JSON document as Teams sent it (the reply's
/// `conversation`, `from` and `recipient`).
#[derive(Debug, Clone, Copy)]
pub struct Verbatim<'a>(pub &'a str);

impl Serialize for Verbatim<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let raw: &RawValue = serde_json::from_str(self.0).map_err(S::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// The number of elements of a JSON list (anything else counts none), read without keeping them.
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Count, A::Error> {
                let mut count = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(Count(count))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Count(0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
        }
        deserializer.deserialize_any(Counter)
    }
}

/// A string borrowed from the body when it had no escapes, else unescaped into its own.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor)
    }
}

struct StrVisitor;

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Str<'de>, E> {
        Ok(Str(Cow::Owned(v)))
    }
}

/// A lenient string field: a value of another type reads as absent.
#[derive(Default)]
struct Lenient<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Lenient<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for LenientVisitor<'a> {
            type Value = Lenient<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Lenient<'a>, E> {
                Ok(Lenient(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Lenient<'a>, E> {
                Ok(Lenient(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Lenient<'a>, E> {
                Ok(Lenient(Some(Cow::Owned(v))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Lenient<'a>, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Lenient<'a>, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Lenient<'a>, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Lenient<'a>, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Lenient<'a>, E> {
                Ok(Lenient(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Lenient(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Lenient(None))
            }
        }
        deserializer.deserialize_any(LenientVisitor(std::marker::PhantomData))
    }
}

/// A field name, borrowed when it can be: compared, never kept.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_identifier(StrVisitor)
            .map(|name| Name(name.0))
    }
}

/// The fields of an activity the router reads, borrowed from its body.
#[derive(Default)]
struct Fields<'a> {
    kind: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    service_url: Option<Cow<'a, str>>,
    channel_id: Option<Cow<'a, str>>,
    conversation: Option<&'a RawValue>,
    from: Option<&'a RawValue>,
    channel_data: Option<&'a RawValue>,
    name: Option<Cow<'a, str>>,
    recipient: Option<&'a RawValue>,
    value: Option<&'a RawValue>,
    text: Option<Cow<'a, str>>,
    locale: Option<Cow<'a, str>>,
    timestamp: Option<Cow<'a, str>>,
    action: Option<Cow<'a, str>>,
    entities: Option<&'a RawValue>,
    members_added: Option<&'a RawValue>,
    members_removed: Option<&'a RawValue>,
    attachments: Option<&'a RawValue>,
}

/// The top-level fields the request path checks or routes by (`conversation.id`, `from.id`,
/// `channelData.tenant.id` and the invoke's `name` among them): given twice, they are refused,
/// since which one counts would be up to the parser (and to whatever parsed it before us). Any
/// other field given twice keeps its last value, as JSON parsers commonly do.
const CHECKED_FIELDS: [&str; 8] = [
    "type",
    "id",
    "serviceUrl",
    "channelId",
    "conversation",
    "from",
    "channelData",
    "name",
];

impl<'a> Fields<'a> {
    fn parse(body: &'a str) -> Result<Self, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(body);
        let fields = serde::Deserializer::deserialize_map(&mut de, FieldsVisitor)?;
        de.end()?;
        Ok(fields)
    }

    fn into_activity(self, body: &str) -> Result<TurnActivity, serde_json::Error> {
        let at = Positions::of(body);
        fn null_is_absent(raw: Option<&RawValue>) -> Option<&RawValue> {
            raw.filter(|r| r.get() != "null")
        }
        let conversation = null_is_absent(self.conversation);
        let from = null_is_absent(self.from);
        let recipient = null_is_absent(self.recipient);
        let channel_data = null_is_absent(self.channel_data);
        let [conversation_id, tenant_id, conversation_type] = conversation
            .map(|raw| {
                Picked::of(
                    raw,
                    ["id", "tenantId", "conversationType"],
                    &["id", "tenantId"],
                )
            })
            .transpose()?
            .unwrap_or_default();
        let [from_id, from_aad_object_id, from_name] = from
            .map(|raw| Picked::of(raw, ["id", "aadObjectId", "name"], &["id", "aadObjectId"]))
            .transpose()?
            .unwrap_or_default();
        let [recipient_id] = recipient
            .map(|raw| Picked::of(raw, ["id"], &[]))
            .transpose()?
            .unwrap_or_default();
        let (channel_tenant, event_type) = channel_data
            .map(ChannelData::of)
            .transpose()?
            .unwrap_or_default();
        let text = |value: Option<Cow<'_, str>>| value.map(|v| at.text(v));
        let span = |raw: Option<&RawValue>| raw.and_then(|r| at.span(r.get()));
        Ok(TurnActivity {
            kind: at.text(self.kind.unwrap_or_default()),
            id: at.text(self.id.unwrap_or_default()),
            service_url: at.text(self.service_url.unwrap_or_default()),
            channel_id: at.text(self.channel_id.unwrap_or_default()),
            conversation: span(conversation),
            conversation_id: text(conversation_id),
            tenant_id: text(tenant_id.or(channel_tenant)),
            conversation_type: text(conversation_type),
            from: span(from),
            from_id: text(from_id),
            from_aad_object_id: text(from_aad_object_id),
            from_name: text(from_name),
            recipient: span(recipient),
            recipient_id: text(recipient_id),
            text: text(self.text),
            name: text(self.name),
            locale: text(self.locale),
            timestamp: text(self.timestamp),
            action: text(self.action),
            value: span(null_is_absent(self.value)),
            entities: span(self.entities),
            members_added: span(self.members_added),
            members_removed: span(self.members_removed),
            attachments: span(self.attachments),
            channel_data: span(channel_data),
            event_type: text(event_type),
            attachments_hidden: false,
            body: body.into(),
        })
    }
}

/// Turns what the parse borrowed from a body into positions in that body (and so in its copy).
struct Positions {
    start: usize,
    end: usize,
}

impl Positions {
    fn of(body: &str) -> Self {
        let start = body.as_ptr() as usize;
        Self {
            start,
            end: start + body.len(),
        }
    }

    fn span(&self, piece: &str) -> Option<Span> {
        let from = piece.as_ptr() as usize;
        let to = from + piece.len();
        (from >= self.start && to <= self.end && to - self.start <= u32::MAX as usize).then(|| {
            Span {
                start: (from - self.start) as u32,
                end: (to - self.start) as u32,
            }
        })
    }

    fn text(&self, value: Cow<'_, str>) -> Text {
        match value {
            Cow::Borrowed(piece) => match self.span(piece) {
                Some(span) => Text::At(span),
                None => Text::Unescaped(piece.into()),
            },
            Cow::Owned(text) => Text::Unescaped(text.into_boxed_str()),
        }
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an activity object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut fields = Fields::default();
        let mut checked_seen = 0u8;
        while let Some(Name(key)) = map.next_key::<Name>()? {
            if let Some(bit) = CHECKED_FIELDS.iter().position(|f| *f == key) {
                if checked_seen & (1 << bit) != 0 {
                    return Err(A::Error::duplicate_field(CHECKED_FIELDS[bit]));
                }
                checked_seen |= 1 << bit;
            }
            let strict = |map: &mut A| map.next_value::<Str>().map(|s| Some(s.0));
            let lenient = |map: &mut A| map.next_value::<Lenient>().map(|s| s.0);
            let raw = |map: &mut A| map.next_value::<&RawValue>().map(Some);
            match key.as_ref() {
                "type" => fields.kind = strict(&mut map)?,
                "id" => fields.id = strict(&mut map)?,
                "serviceUrl" => fields.service_url = strict(&mut map)?,
                "channelId" => fields.channel_id = strict(&mut map)?,
                "conversation" => fields.conversation = raw(&mut map)?,
                "from" => fields.from = raw(&mut map)?,
                "channelData" => fields.channel_data = raw(&mut map)?,
                "name" => fields.name = lenient(&mut map)?,
                "recipient" => fields.recipient = raw(&mut map)?,
                "value" => fields.value = raw(&mut map)?,
                "text" => fields.text = lenient(&mut map)?,
                "locale" => fields.locale = lenient(&mut map)?,
                "timestamp" => fields.timestamp = lenient(&mut map)?,
                "action" => fields.action = lenient(&mut map)?,
                "entities" => fields.entities = raw(&mut map)?,
                "membersAdded" => fields.members_added = raw(&mut map)?,
                "membersRemoved" => fields.members_removed = raw(&mut map)?,
                "attachments" => fields.attachments = raw(&mut map)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// String fields picked out of an object by name (a value of another type reads as absent);
/// those named `unique` may be given once only. Anything but an object has none of them.
struct Picked<'n, const N: usize> {
    names: [&'n str; N],
    unique: &'n [&'n str],
}

impl<'n, const N: usize> Picked<'n, N> {
    fn of<'a>(
        raw: &'a RawValue,
        names: [&'n str; N],
        unique: &'n [&'n str],
    ) -> Result<[Option<Cow<'a, str>>; N], serde_json::Error> {
        if !raw.get().starts_with('{') {
            return Ok(std::array::from_fn(|_| None));
        }
        Self { names, unique }.deserialize(&mut serde_json::Deserializer::from_str(raw.get()))
    }
}

impl<'de, const N: usize> DeserializeSeed<'de> for Picked<'_, N> {
    type Value = [Option<Cow<'de, str>>; N];

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for Picked<'_, N> {
    type Value = [Option<Cow<'de, str>>; N];

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut picked: Self::Value = std::array::from_fn(|_| None);
        let mut seen = [false; N];
        while let Some(Name(key)) = map.next_key::<Name>()? {
            match self.names.iter().position(|name| *name == key) {
                Some(index) => {
                    if seen[index] && self.unique.contains(&self.names[index]) {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    seen[index] = true;
                    picked[index] = map.next_value::<Lenient>()?.0;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(picked)
    }
}

/// `channelData`'s `tenant.id` (each given once at most) and `eventType`.
struct ChannelData;

impl ChannelData {
    /// Reads `channelData`: its tenant's id and its event type.
    #[allow(clippy::type_complexity)]
    fn of(
        raw: &RawValue,
    ) -> Result<(Option<Cow<'_, str>>, Option<Cow<'_, str>>), serde_json::Error> {
        /// Serde's derive refuses a field given twice.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields<'a> {
            #[serde(borrow)]
            tenant: Option<&'a RawValue>,
            #[serde(default, borrow)]
            event_type: Lenient<'a>,
        }
        if !raw.get().starts_with('{') {
            return Ok((None, None));
        }
        let fields = serde_json::from_str::<Fields>(raw.get())?;
        let tenant = match fields.tenant {
            Some(tenant) => {
                let [id] = Picked::of(tenant, ["id"], &["id"])?;
                id
            }
            None => None,
        };
        Ok((tenant, fields.event_type.0))
    }
}

/// Removes every occurrence of each mention text whose `mentioned.id` is the bot, then trims
/// spaces, `&nbsp;` and newlines. Identity comes from the entity id, never the display name.
/// `entities` is the activity's `entities` list as JSON.
pub fn strip_mentions(text: &str, entities: Option<&str>, bot_id: Option<&str>) -> String {
    let mut out = Cow::Borrowed(text);
    if let (Some(bot_id), Some(entities)) = (bot_id, entities) {
        for mention in bot_mentions(entities, bot_id) {
            if out.contains(mention.as_ref()) {
                out = Cow::Owned(out.replace(mention.as_ref(), ""));
            }
        }
    }
    let out = match out.contains("&nbsp;") {
        true => Cow::Owned(out.replace("&nbsp;", " ")),
        false => out,
    };
    out.trim_matches(|c: char| c.is_whitespace() || c == '\u{a0}')
        .to_owned()
}

/// The texts of the mentions of `bot_id` in an `entities` list (anything else is skipped).
fn bot_mentions<'a>(entities: &'a str, bot_id: &str) -> Vec<Cow<'a, str>> {
    // Most messages mention nobody (a `clientInfo` entity only): a list that has neither the
    // word nor the bot's id, and no escape that could spell them, has no mention of the bot.
    // The searcher for the word is built once (building one costs about what a short search does).
    static MENTION: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"mention\""));
    let may_mention_bot = MENTION.find(entities.as_bytes()).is_some()
        && memchr::memmem::find(entities.as_bytes(), bot_id.as_bytes()).is_some();
    if !(may_mention_bot || entities.contains('\\')) {
        return Vec::new();
    }
    #[derive(Deserialize)]
    struct Entity<'a> {
        #[serde(rename = "type", default, borrow)]
        kind: Lenient<'a>,
        #[serde(default, borrow)]
        mentioned: Option<&'a RawValue>,
        #[serde(default, borrow)]
        text: Lenient<'a>,
    }
    let Ok(entities) = serde_json::from_str::<Vec<&RawValue>>(entities) else {
        return Vec::new();
    };
    entities
        .into_iter()
        .filter_map(|entity| serde_json::from_str::<Entity>(entity.get()).ok())
        .filter(|entity| entity.kind.0.as_deref() == Some("mention"))
        .filter(|entity| {
            entity
                .mentioned
                .and_then(|m| Picked::of(m, ["id"], &[]).ok())
                .is_some_and(|[id]| id.as_deref() == Some(bot_id))
        })
        .filter_map(|entity| entity.text.0.filter(|text| !text.is_empty()))
        .collect()
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
        let body = br#"{"type":"message","id":"1","serviceUrl":"https://x/","channelId":"msteams","conversation":{"id":"a"},"te\u0078t":"hi","locale":"en","timestamp":"2026-11-30T04:15:07.1234567Z","x-custom":{"k":1}}"#;
        let activity = parse_turn(body).expect("parses");
        assert_eq!(activity.text_field(), Some("hi"));
        assert_eq!(activity.locale(), Some("en"));
        assert_eq!(activity.timestamp(), Some("2026-11-30T04:15:07.1234567Z"));
        let whole = serde_json::to_value(&activity).expect("serializes");
        assert_eq!(whole["x-custom"], serde_json::json!({"k": 1}));
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
            r#","text":5,"locale":[],"name":{},"action":true,"timestamp":7"#,
            r#","entities":{"type":"mention"},"membersAdded":"x","attachments":1"#,
        ] {
            let body = format!("{base}{extra}}}");
            let routable = with_envelope(body.as_bytes(), |e| e.is_ok());
            assert!(routable && admissible(body.as_bytes()).is_ok(), "{body}");
            let turn = parse_turn(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(turn.id(), "1");
        }
        let twice = format!("{base},\"text\":\"first\",\"text\":\"second\"}}");
        let turn = parse_turn(twice.as_bytes()).unwrap();
        assert_eq!(turn.text_field(), Some("second"));
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
    fn escaped_strings_are_read_unescaped_and_the_rest_where_it_is() {
        let body = fixture("channel-message-mention.json");
        with_envelope(&body, |env| {
            let env = env.unwrap();
            assert_eq!(
                env.conversation_id,
                "19:6848757105754c8981c67612732d9aa7@thread.tacv2;messageid=1759881511856"
            );
            assert_eq!(env.tenant_id, Some("50612dbb-0237-4969-b378-8d42590f9c00"));
        });
        let body = br#"{"type":"mess\u0061ge","id":"1\"2","serviceUrl":"https://x/","channelId":"msteams",
            "conversation":{"id":"a\/b","tenantId":"t\u00e9"},"from":{"id":"29:u","name":"Ann \"A\""},
            "recipient":{"id":"28:b\u006ft"},"text":"line\nnext \u2713","locale":"en"}"#;
        let activity = parse_turn(body).expect("parses");
        let envelope = activity.envelope().expect("routable");
        assert_eq!(
            (
                envelope.kind,
                envelope.id,
                envelope.conversation_id,
                envelope.tenant_id
            ),
            ("message", "1\"2", "a/b", Some("t\u{e9}"))
        );
        assert_eq!(activity.from_name(), Some("Ann \"A\""));
        assert_eq!(activity.recipient_id(), Some("28:bot"));
        assert_eq!(activity.text_field(), Some("line\nnext \u{2713}"));
        assert_eq!(
            (activity.from_id(), activity.locale()),
            (Some("29:u"), Some("en"))
        );
        // The objects are kept as sent, escapes and all.
        assert_eq!(
            activity.conversation_json(),
            Some(r#"{"id":"a\/b","tenantId":"t\u00e9"}"#)
        );
        let sent: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(serde_json::to_value(&activity).unwrap(), sent);
        let mut hidden = parse_turn(
            br#"{"type":"message","id":"1","attachments":[{"contentType":"x"}],"text":"t"}"#,
        )
        .unwrap();
        assert_eq!(hidden.attachment_count(), 1);
        hidden.hide_attachments();
        assert_eq!(hidden.attachment_count(), 0);
        let seen = serde_json::to_value(&hidden).unwrap();
        assert_eq!(
            seen,
            serde_json::json!({"type": "message", "id": "1", "text": "t"})
        );
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
        assert_eq!(activity.locale(), Some("y"));
        assert_eq!(activity.channel_data(), Some(serde_json::json!({"a": 2})));
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

        let entities = r#"[
            {"type":"mention","mentioned":{"id":"28:bot"},"text":"<at>Bot</at>"},
            {"type":"clientInfo","locale":"en-US"},
            "not an entity",
            {"type":"mention","mentioned":"28:bot","text":"<at>Ann</at>"},
            {"type":"mention","mentioned":{"id":"29:user"},"text":"<at>Ann</at>"}
        ]"#;
        let text = "<at>Bot</at>&nbsp;hi <at>Ann</at> <at>Bot</at>\n";
        assert_eq!(
            strip_mentions(text, Some(entities), Some("28:bot")),
            "hi <at>Ann</at>"
        );
        assert_eq!(
            strip_mentions(text, Some("{}"), Some("28:bot")),
            text.replace("&nbsp;", " ").trim()
        );
        assert_eq!(strip_mentions(" plain ", None, None), "plain");
        // Spelled with escapes, a mention of the bot is still one.
        let escaped =
            r#"[{"type":"ment\u0069on","mentioned":{"id":"28:b\u006ft"},"text":"<at>Bot</at>"}]"#;
        assert_eq!(
            strip_mentions(text, Some(escaped), Some("28:bot")),
            "hi <at>Ann</at>"
        );
        let others = r#"[{"type":"clientInfo"},{"type":"mention","mentioned":{"id":"29:x"},"text":"<at>Bot</at>"}]"#;
        assert_eq!(
            strip_mentions("<at>Bot</at> hi", Some(others), Some("28:bot")),
            "<at>Bot</at> hi"
        );
    }

    #[test]
    fn bot_added_is_detected_from_members_added() {
        let body = fixture("conversationupdate-membersadded-personal.json");
        let activity = parse_turn(&body).unwrap();
        assert!(
            !activity.bot_was_added(),
            "placeholder ids differ in the fixture"
        );
        let mut sent: Value = serde_json::from_slice(&body).unwrap();
        sent["recipient"] = serde_json::json!({"id": "28:f5d48856-5b42-41a0-8c3a-c5f944b679b0"});
        assert!(TurnActivity::of_json(&sent).bot_was_added());
    }
}
