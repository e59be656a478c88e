//! The domain records: bots, integrations and accounts as the config seeds them, the management
//! API writes them and the data path reads them (through the registry). Plain data with its
//! serde shape; it imports nothing of the router.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The longest session an integration may ask for (30 days), as the management API allows.
pub const MAX_SESSION_DURATION_MS: u64 = 30 * 24 * 3600 * 1000;
pub const DEFAULT_SESSION_DURATION_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

/// The brain a bot talks to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSpec {
    /// Says back what it is told; `wordDelayMs` streams the answer word by word (demos, tests).
    #[serde(rename_all = "camelCase")]
    Echo {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        word_delay_ms: Option<u64>,
    },
    Webhook {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Openai {
        base_url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_key: Option<String>,
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system_prompt: Option<String>,
    },
}

impl BackendSpec {
    /// Whether the backend is sent the session's id and history (echo answers from the turn
    /// alone).
    pub fn reads_history(&self) -> bool {
        !matches!(self, Self::Echo { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BotRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub backend: BackendSpec,
    /// How Teams renders the bot's answers; default: markdown for webhook and model answers,
    /// plain for echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_format: Option<TextFormat>,
}

/// The `textFormat` of a bot's messages (Bot Framework: markdown, plain or xml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextFormat {
    Markdown,
    Plain,
    Xml,
}

impl TextFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Markdown => "markdown",
            Self::Plain => "plain",
            Self::Xml => "xml",
        }
    }
}

impl BotRecord {
    /// The format its answers go out in: as set, else markdown for what a model or a webhook
    /// writes (models answer in Markdown) and plain for echo (it repeats what users typed).
    pub fn text_format(&self) -> TextFormat {
        self.text_format.unwrap_or(match self.backend {
            BackendSpec::Echo { .. } => TextFormat::Plain,
            BackendSpec::Webhook { .. } | BackendSpec::Openai { .. } => TextFormat::Markdown,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IntegrationRecord {
    pub id: String,
    pub bot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blueprint_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_framework_app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_framework_app_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_framework_app_secret_env: Option<String>,
    /// Single-tenant: the token authority and the only tenant let in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The tenant where the app is registered: the token authority, without restricting
    /// inbound traffic to it (a multi-tenant app serving other organizations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_tenant_id: Option<String>,
    /// Which tenants are let in besides a single-tenant integration's own.
    #[serde(default, skip_serializing_if = "TenantPolicy::is_any")]
    pub tenant_policy: TenantPolicy,
    /// Where the admin-consent callback sends the admin when the consent URL named none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_redirect_url: Option<String>,
    #[serde(default = "default_session_duration")]
    pub session_duration: u64,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub contact_collection: bool,
    #[serde(default)]
    pub attachments: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, serde_json::Value>,
    /// Development mode (config only, never through the API): no App ID, unsigned activities
    /// from loopback peers, replies only to loopback service URLs. Refused unless `server.listen`
    /// is a loopback address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub development: bool,
    /// Microsoft's cloud (`public`, `gcc`, `usgov-gcch`, `usgov-dod`, `china`); absent: the
    /// `[microsoft]` section's endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    /// Channels taken besides `msteams` (a Teams integration refuses others with 401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// Config only: the cloud's values given one by one (over `cloud`, or the public cloud).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_settings: Option<CloudOverrides>,
}

/// Which tenants an integration serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantPolicy {
    /// Every tenant (a single-tenant integration still only its own).
    #[default]
    Any,
    /// Only tenants with a connection (admin consent, or an installation of the app).
    Connected,
}

impl TenantPolicy {
    pub fn is_any(&self) -> bool {
        *self == Self::Any
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Connected => "connected",
        }
    }
}

fn default_session_duration() -> u64 {
    DEFAULT_SESSION_DURATION_MS
}

/// An integration's own cloud values (config only: they name hosts the router calls), each
/// overriding the named `cloud` (or the public cloud without one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openid_metadata_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_scope: Option<String>,
}

impl CloudOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
