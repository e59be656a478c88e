//! The management API's documents: request bodies (strict: an unknown field or a wrong type is
//! a 400 naming the field), the records as stored (secrets sealed), and the views returned
//! (write-only fields never present).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value, json};

use crate::records::{
    BackendSpec, BotRecord, IntegrationRecord, MAX_SESSION_DURATION_MS, TenantPolicy, TextFormat,
};
use crate::registry::{Owner, SetupResult, SetupStatus};

/// A 400: what is wrong, and with which field when one is to blame.
#[derive(Debug)]
pub struct Invalid {
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl Invalid {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_field",
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }
}

/// Parses a JSON body into `T`, naming the offending field on failure.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Invalid> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = parsed.map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return Invalid {
                code: "malformed_json",
                message: format!("malformed JSON: {inner}"),
                field: None,
            };
        }
        let message = inner.to_string();
        // "unknown field `x`, ..." and "missing field `x`" name the field in the message.
        let unknown = message
            .strip_prefix("unknown field `")
            .or_else(|| message.strip_prefix("missing field `"))
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned());
        // serde_path_to_error already ends the path with an unknown field's name.
        let field = match unknown {
            Some(name) if path == "." => Some(name),
            _ if path == "." => None,
            _ => Some(path),
        };
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        Invalid {
            code: if field.is_some() {
                "invalid_field"
            } else {
                "invalid_body"
            },
            message: match &field {
                Some(f) => format!("{f}: {message}"),
                None => message,
            },
            field,
        }
    })?;
    deserializer.end().map_err(|e| Invalid {
        code: "malformed_json",
        message: format!("malformed JSON: {e}"),
        field: None,
    })?;
    Ok(value)
}

/// `null` → `Some(None)`, a value → `Some(Some(v))`, absent (with `#[serde(default)]`) → `None`.
pub(crate) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The body of `POST /api/v1/bot/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateBot {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub backend: BackendSpec,
    #[serde(default)]
    pub text_format: Option<TextFormat>,
}

/// The body of `POST /api/v1/bot/{id}/update`. A backend of the same kind without `secret` or
/// `apiKey` keeps the stored one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateBot {
    #[serde(default, deserialize_with = "nullable")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    #[serde(default)]
    pub backend: Option<BackendSpec>,
    /// `null` goes back to the backend's default.
    #[serde(default, deserialize_with = "nullable")]
    pub text_format: Option<Option<TextFormat>>,
}

/// The body of `POST /api/v1/integration/teams/create`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateIntegration {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub blueprint_id: Option<String>,
    pub bot_id: String,
    #[serde(default)]
    pub bot_framework_app_id: Option<String>,
    #[serde(default)]
    pub bot_framework_app_secret: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub app_tenant_id: Option<String>,
    #[serde(default)]
    pub tenant_policy: Option<TenantPolicy>,
    #[serde(default)]
    pub consent_redirect_url: Option<String>,
    #[serde(default)]
    pub session_duration: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub contact_collection: Option<bool>,
    #[serde(default)]
    pub attachments: Option<bool>,
    #[serde(default)]
    pub allow_from: Option<String>,
    #[serde(default)]
    pub meta: Option<Map<String, Value>>,
    #[serde(default)]
    pub cloud: Option<String>,
    #[serde(default)]
    pub channels: Option<Vec<String>>,
}

/// The body of `POST /api/v1/integration/teams/{id}/update`: only the fields present change;
/// `null` clears the nullable ones; `meta` is merged (a `null` value removes that key).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateIntegration {
    #[serde(default, deserialize_with = "nullable")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub blueprint_id: Option<Option<String>>,
    #[serde(default)]
    pub bot_id: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub bot_framework_app_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub bot_framework_app_secret: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub tenant_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub app_tenant_id: Option<Option<String>>,
    /// `null` restores the default (`any`).
    #[serde(default, deserialize_with = "nullable")]
    pub tenant_policy: Option<Option<TenantPolicy>>,
    #[serde(default, deserialize_with = "nullable")]
    pub consent_redirect_url: Option<Option<String>>,
    /// `null` restores the default (one day).
    #[serde(default, deserialize_with = "nullable")]
    pub session_duration: Option<Option<u64>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub contact_collection: Option<bool>,
    #[serde(default)]
    pub attachments: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub allow_from: Option<Option<String>>,
    #[serde(default)]
    pub meta: Option<Map<String, Value>>,
    /// `null`: the router's default endpoints.
    #[serde(default, deserialize_with = "nullable")]
    pub cloud: Option<Option<String>>,
    /// `null`: `msteams` only.
    #[serde(default, deserialize_with = "nullable")]
    pub channels: Option<Option<Vec<String>>>,
}

/// `{}` (or no body): setup and delete take nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

const MAX_TEXT: usize = 4096;
const MAX_META_KEYS: usize = 64;
const MAX_META_KEY_LEN: usize = 128;

/// Length and shape limits of free-text fields.
pub fn check_text(field: &str, value: Option<&str>, max: usize) -> Result<(), Invalid> {
    match value {
        Some(v) if v.len() > max => Err(Invalid::field(
            field,
            format!("{field}: at most {max} bytes"),
        )),
        Some(v) if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') => {
            Err(Invalid::field(
                field,
                format!("{field}: control characters are not allowed"),
            ))
        }
        _ => Ok(()),
    }
}

pub fn check_session_duration(value: u64) -> Result<(), Invalid> {
    if value == 0 || value > MAX_SESSION_DURATION_MS {
        return Err(Invalid::field(
            "sessionDuration",
            format!(
                "sessionDuration: between 1 and {MAX_SESSION_DURATION_MS} ms (30 days), got {value}"
            ),
        ));
    }
    Ok(())
}

pub fn check_meta(meta: &BTreeMap<String, Value>) -> Result<(), Invalid> {
    if meta.len() > MAX_META_KEYS {
        return Err(Invalid::field(
            "meta",
            format!("meta: at most {MAX_META_KEYS} keys"),
        ));
    }
    for key in meta.keys() {
        if key.is_empty() || key.len() > MAX_META_KEY_LEN {
            return Err(Invalid::field(
                "meta",
                format!("meta: keys are 1 to {MAX_META_KEY_LEN} bytes"),
            ));
        }
    }
    Ok(())
}

/// JSON merge of `patch` into `meta`: a `null` value removes its key.
pub fn merge_meta(meta: &mut BTreeMap<String, Value>, patch: Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            meta.remove(&key);
        } else {
            meta.insert(key, value);
        }
    }
}

pub fn check_backend(backend: &BackendSpec) -> Result<(), Invalid> {
    let http_url = |field: &str, value: &str| match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        _ => Err(Invalid::field(
            field,
            format!("{field}: {value:?} is not an http(s) URL"),
        )),
    };
    match backend {
        BackendSpec::Echo { word_delay_ms } => match word_delay_ms {
            Some(ms) if *ms > 10_000 => Err(Invalid::field(
                "backend.wordDelayMs",
                format!("backend.wordDelayMs: {ms} is over 10000"),
            )),
            _ => Ok(()),
        },
        BackendSpec::Webhook { url, secret } => {
            http_url("backend.url", url)?;
            check_text("backend.secret", secret.as_deref(), MAX_TEXT)
        }
        BackendSpec::Openai {
            base_url,
            api_key,
            model,
            system_prompt,
        } => {
            http_url("backend.baseUrl", base_url)?;
            if model.trim().is_empty() {
                return Err(Invalid::field("backend.model", "backend.model: required"));
            }
            check_text("backend.model", Some(model), 256)?;
            check_text("backend.apiKey", api_key.as_deref(), MAX_TEXT)?;
            check_text("backend.systemPrompt", system_prompt.as_deref(), 32 * 1024)
        }
    }
}

/// A URL the admin-consent callback may send a browser to: absolute http(s), no credentials,
/// no fragment (the router appends `tenant` and `state` to its query).
pub fn check_redirect_url(field: &'static str, url: Option<&str>) -> Result<(), Invalid> {
    let Some(url) = url else { return Ok(()) };
    check_text(field, Some(url), 2048)?;
    let parsed = url::Url::parse(url)
        .map_err(|e| Invalid::field(field, format!("{field}: not an absolute URL ({e})")))?;
    if !matches!(parsed.scheme(), "https" | "http")
        || parsed.host_str().is_none()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.fragment().is_some()
    {
        return Err(Invalid::field(
            field,
            format!("{field}: an http(s) URL with a host, without credentials or a fragment"),
        ));
    }
    Ok(())
}

pub fn check_integration_texts(record: &IntegrationRecord) -> Result<(), Invalid> {
    check_text("name", record.name.as_deref(), 256)?;
    check_text("description", record.description.as_deref(), MAX_TEXT)?;
    check_text("blueprintId", record.blueprint_id.as_deref(), 256)?;
    check_text(
        "botFrameworkAppId",
        record.bot_framework_app_id.as_deref(),
        256,
    )?;
    check_text(
        "botFrameworkAppSecret",
        record.bot_framework_app_secret.as_deref(),
        MAX_TEXT,
    )?;
    check_text("tenantId", record.tenant_id.as_deref(), 256)?;
    check_text("appTenantId", record.app_tenant_id.as_deref(), 256)?;
    check_redirect_url("consentRedirectUrl", record.consent_redirect_url.as_deref())?;
    check_text("allowFrom", record.allow_from.as_deref(), MAX_TEXT)?;
    check_session_duration(record.session_duration)?;
    if let Err(why) =
        crate::auth::cloud::resolve(record.cloud.as_deref(), record.cloud_settings.as_ref())
    {
        return Err(Invalid::field("cloud", format!("cloud: {why}")));
    }
    if let Some(channels) = &record.channels {
        if channels.len() > 16 {
            return Err(Invalid::field("channels", "channels: 16 at most"));
        }
        for channel in channels {
            check_text("channels", Some(channel), 64)?;
        }
    }
    check_meta(&record.meta)
}

/// Where a backend's secret may be sent: the origin (scheme, host, port) of its URL.
pub fn backend_origin(backend: &BackendSpec) -> Option<String> {
    let url = match backend {
        BackendSpec::Echo { .. } => return None,
        BackendSpec::Webhook { url, .. } => url,
        BackendSpec::Openai { base_url, .. } => base_url,
    };
    url::Url::parse(url)
        .ok()
        .map(|u| u.origin().ascii_serialization())
}

/// The secret of a backend, if it has one.
pub fn backend_secret(backend: &BackendSpec) -> Option<&str> {
    match backend {
        BackendSpec::Echo { .. } => None,
        BackendSpec::Webhook { secret, .. } => secret.as_deref(),
        BackendSpec::Openai { api_key, .. } => api_key.as_deref(),
    }
}

pub fn set_backend_secret(backend: &mut BackendSpec, value: Option<String>) {
    match backend {
        BackendSpec::Echo { .. } => {}
        BackendSpec::Webhook { secret, .. } => *secret = value,
        BackendSpec::Openai { api_key, .. } => *api_key = value,
    }
}

/// A bot as stored: the record without its secret, the secret sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredBot {
    pub record: BotRecord,
    #[serde(default)]
    pub sealed_secret: Option<String>,
    pub owner: Owner,
    /// Digest of the config entry this record was seeded from (see `admin::load`).
    #[serde(default)]
    pub seed_digest: Option<String>,
}

/// An integration as stored: the record without its App Secret, the secret sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredIntegration {
    pub record: IntegrationRecord,
    #[serde(default)]
    pub sealed_secret: Option<String>,
    pub owner: Owner,
    #[serde(default)]
    pub setup: SetupResult,
    #[serde(default)]
    pub seed_digest: Option<String>,
}

pub fn iso_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn iso_or_null(ms: Option<u64>) -> Value {
    ms.map(|m| Value::String(iso_time(m)))
        .unwrap_or(Value::Null)
}

/// A bot as the API shows it: the backend without `secret`/`apiKey`.
pub fn bot_view(record: &BotRecord, owner: &Owner) -> Value {
    let mut backend = record.backend.clone();
    set_backend_secret(&mut backend, None);
    json!({
        "id": record.id,
        "name": record.name,
        "description": record.description,
        "backend": backend,
        "textFormat": record.text_format().as_str(),
        "createdAt": iso_time(owner.created_at),
        "updatedAt": iso_time(owner.updated_at),
    })
}

/// An integration as the API shows it: never `botFrameworkAppSecret` or `tenantId`.
pub fn integration_view(record: &IntegrationRecord, owner: &Owner, setup: &SetupResult) -> Value {
    json!({
        "id": record.id,
        "name": record.name,
        "description": record.description,
        "blueprintId": record.blueprint_id,
        "botId": record.bot_id,
        "botFrameworkAppId": record.bot_framework_app_id,
        "appTenantId": record.app_tenant_id,
        "tenantPolicy": record.tenant_policy.as_str(),
        "consentRedirectUrl": record.consent_redirect_url,
        "sessionDuration": record.session_duration,
        "stream": record.stream,
        "contactCollection": record.contact_collection,
        "attachments": record.attachments,
        "allowFrom": record.allow_from,
        "meta": record.meta,
        "cloud": record.cloud,
        "channels": record.channels,
        "createdAt": iso_time(owner.created_at),
        "updatedAt": iso_time(owner.updated_at),
        "setupStatus": match setup.status {
            SetupStatus::Unchecked => Value::Null,
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        },
        "setupCheckedAt": iso_or_null(setup.checked_at),
        "setupError": setup.code.as_ref().map(|code| json!({
            "code": code,
            "message": setup.message,
        })),
    })
}

pub fn contact_view(contact: &crate::ledger::contacts::Contact) -> Value {
    json!({
        "id": contact.id,
        "integrationId": contact.integration_id,
        "teamsUserId": contact.teams_user_id,
        "aadObjectId": contact.aad_object_id,
        "name": contact.name,
        "tenantId": contact.tenant_id,
        "firstSeenAt": iso_time(contact.first_seen_at),
        "lastSeenAt": iso_time(contact.last_seen_at),
        "createdAt": iso_time(contact.first_seen_at),
    })
}

pub fn event_view(event: &crate::ledger::events::Event) -> Value {
    let mut value = serde_json::to_value(event).unwrap_or_else(|_| json!({}));
    value["id"] = json!(event.seq.to_string());
    value["at"] = json!(iso_time(event.at));
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = parse_body::<UpdateIntegration>(br#"{"sessionDuration": "x"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sessionDuration"));
        let e = parse_body::<UpdateIntegration>(br#"{"bogus": 1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("bogus"));
        let e = parse_body::<CreateBot>(br#"{"backend": {"kind": "webhook"}}"#).unwrap_err();
        assert!(
            e.field.as_deref().unwrap_or("").starts_with("backend"),
            "{e:?}"
        );
        let e = parse_body::<CreateIntegration>(br#"{"botId": 5}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("botId"));
        let e = parse_body::<CreateIntegration>(br#"{"name": "x""#).unwrap_err();
        assert_eq!(e.code, "malformed_json");
        let e = parse_body::<CreateIntegration>(br#"[]"#).unwrap_err();
        assert_eq!(e.code, "invalid_body");
    }

    #[test]
    fn null_is_told_apart_from_absent() {
        let u = parse_body::<UpdateIntegration>(br#"{"tenantId": null}"#).unwrap();
        assert_eq!(u.tenant_id, Some(None));
        assert_eq!(u.allow_from, None);
        let u = parse_body::<UpdateIntegration>(br#"{"allowFrom": "a"}"#).unwrap();
        assert_eq!(u.allow_from, Some(Some("a".into())));
    }

    #[test]
    fn meta_merges() {
        let mut meta = BTreeMap::from([("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))]);
        let patch = json!({"b": null, "c": "x"}).as_object().cloned().unwrap();
        merge_meta(&mut meta, patch);
        assert_eq!(
            serde_json::to_value(&meta).unwrap(),
            json!({"a": 1, "c": "x"})
        );
    }
}
