//! Inbound verification of Bot Connector tokens (protocol.md §1.3), done as strictly as the
//! Bot Framework SDKs: RS256 only, issuer checked before any signature work, key by `kid` from
//! the OpenID key set (refreshed once on an unknown `kid`, rate-limited), signature, `exp`/`nbf`
//! with five minutes of skew, audience = the integration's App ID, then, once the body is parsed,
//! the key's endorsements and the `serviceurl` claim. A verified token is cached until it expires,
//! so the Connector's reused token costs a hash lookup instead of an RSA verification.

pub mod cloud;
pub(crate) mod keys;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use governor::{Quota, RateLimiter};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

pub use keys::{DiscoveryError, KeyStore};

use crate::clock::{DirectRateLimiter, RouterClock};
use crate::recent::{Owner, Recent};

/// The `[microsoft]` section: Microsoft's endpoints for the public cloud (or the mock's).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicrosoftConfig {
    pub openid_metadata_url: String,
    pub token_issuer: String,
    pub login_url: String,
    pub oauth_scope: String,
    /// Microsoft Graph's scope for app-only tokens (admin consent asks for it; tenant discovery
    /// uses it).
    pub graph_scope: String,
    /// Microsoft Graph's base URL.
    pub graph_url: String,
    /// Signing keys are refreshed this often even when no unknown `kid` shows up.
    pub key_refresh_interval_secs: u64,
    /// Unknown-`kid` refreshes: a burst of this many, then one per `unknown_kid_refresh_period_secs`.
    pub unknown_kid_refresh_burst: u32,
    pub unknown_kid_refresh_period_secs: u64,
    /// Allowed clock skew for `exp`/`nbf` (the SDKs use five minutes).
    pub clock_skew_secs: u64,
    /// Channel ids that every signing key must endorse, in addition to the activity's channel.
    pub required_endorsements: Vec<String>,
}

impl Default for MicrosoftConfig {
    fn default() -> Self {
        Self {
            openid_metadata_url:
                "https://login.botframework.com/v1/.well-known/openidconfiguration".into(),
            token_issuer: "https://api.botframework.com".into(),
            login_url: "https://login.microsoftonline.com".into(),
            oauth_scope: "https://api.botframework.com/.default".into(),
            graph_scope: "https://graph.microsoft.com/.default".into(),
            graph_url: "https://graph.microsoft.com".into(),
            key_refresh_interval_secs: 24 * 3600,
            unknown_kid_refresh_burst: 3,
            unknown_kid_refresh_period_secs: 60,
            clock_skew_secs: 300,
            required_endorsements: Vec::new(),
        }
    }
}

/// Why a request was not let in. `reason()` is the metric label and the body's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("the token is not a well-formed JWT: {0}")]
    MalformedToken(&'static str),
    #[error("only RS256-signed tokens are accepted")]
    UnsupportedAlgorithm,
    #[error("the token was signed with a key that is not published")]
    UnknownKey,
    #[error("the token signature is invalid")]
    BadSignature,
    #[error("the token issuer is not the Bot Connector")]
    BadIssuer,
    #[error("the token audience is not this bot's App ID")]
    BadAudience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the signing key does not endorse channel {0:?}")]
    MissingEndorsement(String),
    #[error("the token's serviceurl claim does not match the activity's serviceUrl")]
    ServiceUrlMismatch,
    #[error("development-mode integrations accept unsigned activities from loopback peers only")]
    NotLoopback,
    #[error(
        "the integration has no App ID: it accepts no activity until botFrameworkAppId and \
         botFrameworkAppSecret are set"
    )]
    NoCredentials,
    #[error("channel {0:?} is not one this integration takes (msteams, or its channels)")]
    ChannelNotAllowed(String),
    #[error("signing keys are unavailable: {0}")]
    DiscoveryUnavailable(String),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::MalformedToken(_) => "malformed_token",
            Self::UnsupportedAlgorithm => "unsupported_algorithm",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::BadIssuer => "bad_issuer",
            Self::BadAudience => "bad_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingEndorsement(_) => "missing_endorsement",
            Self::ServiceUrlMismatch => "serviceurl_mismatch",
            Self::NotLoopback => "not_loopback",
            Self::NoCredentials => "no_credentials",
            Self::ChannelNotAllowed(_) => "channel_not_allowed",
            Self::DiscoveryUnavailable(_) => "discovery_unavailable",
        }
    }
}

/// A token whose signature and claims were checked for one audience.
#[derive(Debug)]
pub struct VerifiedToken {
    pub audience: Box<str>,
    pub service_url: Option<Box<str>>,
    /// Seconds since the epoch.
    pub expires_at: u64,
    pub endorsements: Arc<[Box<str>]>,
    /// The signing key's id: a cached token is trusted only while its key is published.
    pub kid: Box<str>,
}

impl VerifiedToken {
    /// The checks that need the activity: endorsement of its channel and the `serviceurl` claim.
    pub fn check_activity(
        &self,
        channel_id: &str,
        service_url: &str,
        required_endorsements: &[String],
    ) -> Result<(), AuthError> {
        // A key without an endorsements list endorses no channel.
        if !self.endorsements.iter().any(|e| &**e == channel_id) {
            return Err(AuthError::MissingEndorsement(channel_id.to_owned()));
        }
        if let Some(missing) = required_endorsements
            .iter()
            .find(|r| !self.endorsements.iter().any(|e| **e == ***r))
        {
            return Err(AuthError::MissingEndorsement(missing.clone()));
        }
        match self.service_url.as_deref() {
            Some(claim) if claim == service_url => Ok(()),
            _ => Err(AuthError::ServiceUrlMismatch),
        }
    }
}

#[derive(Deserialize)]
struct UnverifiedHeader<'a> {
    #[serde(borrow)]
    alg: Option<&'a str>,
    #[serde(borrow, default)]
    kid: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    #[serde(default)]
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    serviceurl: Option<String>,
}

struct TokenExpiry;

impl moka::Expiry<Box<str>, Arc<VerifiedToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &Box<str>,
        value: &Arc<VerifiedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            value.expires_at.saturating_sub(now_secs()),
        ))
    }
}

thread_local! {
    /// The tokens this thread found verified last, in front of the shared cache.
    static RECENT_TOKENS: std::cell::RefCell<Recent<Arc<VerifiedToken>>> =
        const { std::cell::RefCell::new(Recent::new()) };
}

pub struct Verifier {
    keys: Arc<KeyStore>,
    cache: moka::sync::Cache<Box<str>, Arc<VerifiedToken>>,
    /// This verifier's entries in each thread's [`RECENT_TOKENS`].
    recent: Owner,
    issuer: String,
    clock_skew_secs: u64,
    unknown_kid_refreshes: DirectRateLimiter,
}

/// The verifier of each cloud: the `[microsoft]` section's, built at start, and those of
/// integrations that name another cloud, built at their first activity with keys of their own
/// (refreshed on the same schedule until the router is dropped).
pub struct Verifiers {
    default: Arc<Verifier>,
    microsoft: MicrosoftConfig,
    http: reqwest::Client,
    readiness: Arc<crate::telemetry::Readiness>,
    by_cloud: dashmap::DashMap<(String, String), Arc<Verifier>>,
    /// Dropped with the router: the clouds' refreshers then stop.
    _alive: tokio::sync::watch::Sender<bool>,
    alive: tokio::sync::watch::Receiver<bool>,
}

impl Verifiers {
    pub fn new(
        default: Arc<Verifier>,
        microsoft: &MicrosoftConfig,
        http: reqwest::Client,
        readiness: Arc<crate::telemetry::Readiness>,
    ) -> Self {
        let (alive_tx, alive) = tokio::sync::watch::channel(false);
        Self {
            default,
            microsoft: microsoft.clone(),
            http,
            readiness,
            by_cloud: dashmap::DashMap::new(),
            _alive: alive_tx,
            alive,
        }
    }

    /// The `[microsoft]` section's verifier.
    pub fn default_verifier(&self) -> &Arc<Verifier> {
        &self.default
    }

    /// The verifier of `cloud` (`None`: the `[microsoft]` section's).
    pub fn for_cloud(&self, cloud: Option<&Arc<cloud::CloudAuth>>) -> Arc<Verifier> {
        let Some(cloud) = cloud else {
            return Arc::clone(&self.default);
        };
        if cloud.openid_metadata_url == self.microsoft.openid_metadata_url
            && cloud.token_issuer == self.microsoft.token_issuer
        {
            return Arc::clone(&self.default);
        }
        let key = (
            cloud.openid_metadata_url.clone(),
            cloud.token_issuer.clone(),
        );
        if let Some(verifier) = self.by_cloud.get(&key) {
            return Arc::clone(&verifier);
        }
        self.by_cloud
            .entry(key)
            .or_insert_with(|| {
                let keys = Arc::new(KeyStore::new(
                    self.http.clone(),
                    cloud.openid_metadata_url.clone(),
                    Arc::clone(&self.readiness),
                ));
                let interval =
                    Duration::from_secs(self.microsoft.key_refresh_interval_secs.max(60));
                tokio::spawn(Arc::clone(&keys).run_refresher(interval, self.alive.clone()));
                let config = MicrosoftConfig {
                    openid_metadata_url: cloud.openid_metadata_url.clone(),
                    token_issuer: cloud.token_issuer.clone(),
                    ..self.microsoft.clone()
                };
                Arc::new(Verifier::new(keys, &config))
            })
            .clone()
    }
}

const VERIFIED_TOKEN_CACHE_ENTRIES: u64 = 100_000;
/// A token larger than this is refused before it is decoded.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

impl Verifier {
    pub fn new(keys: Arc<KeyStore>, config: &MicrosoftConfig) -> Self {
        let burst =
            NonZeroU32::new(config.unknown_kid_refresh_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs(config.unknown_kid_refresh_period_secs.max(1));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            keys,
            cache: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKEN_CACHE_ENTRIES)
                .expire_after(TokenExpiry)
                .build(),
            recent: Owner::new(),
            issuer: config.token_issuer.clone(),
            clock_skew_secs: config.clock_skew_secs,
            unknown_kid_refreshes: RateLimiter::direct_with_clock(quota, RouterClock),
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Verifies the `Authorization` header value for the bot `app_id`.
    pub async fn verify(
        &self,
        authorization: Option<&[u8]>,
        app_id: &str,
    ) -> Result<Arc<VerifiedToken>, AuthError> {
        let token = bearer_token(authorization)?;
        let cached = RECENT_TOKENS
            .with_borrow(|recent| recent.get(&self.recent, token))
            .or_else(|| {
                let verified = self.cache.get(token)?;
                RECENT_TOKENS.with_borrow_mut(|recent| {
                    recent.put(&self.recent, token, Arc::clone(&verified));
                });
                Some(verified)
            });
        if let Some(verified) = cached {
            // The lifetime is checked there, so a thread's copy outliving the shared cache's
            // entry answers nothing a fresh verification would not.
            if self.keys.has_key(&verified.kid) {
                return self.check_cached(verified, app_id);
            }
            // Its key has left the published set (rotated out, revoked): verified again, which
            // refuses it unless a refresh finds the key still published.
            self.cache.invalidate(token);
            RECENT_TOKENS.with_borrow_mut(|recent| recent.forget(&self.recent, token));
        }
        let verified = self.verify_uncached(token, app_id).await?;
        // Cached until expiry plus skew, the same window a fresh verification would allow.
        self.cache.insert(token.into(), Arc::clone(&verified));
        Ok(verified)
    }

    fn check_cached(
        &self,
        verified: Arc<VerifiedToken>,
        app_id: &str,
    ) -> Result<Arc<VerifiedToken>, AuthError> {
        if &*verified.audience != app_id {
            return Err(AuthError::BadAudience);
        }
        if verified.expires_at.saturating_add(self.clock_skew_secs) <= now_secs() {
            return Err(AuthError::Expired);
        }
        Ok(verified)
    }

    /// The full verification (RSA included), bypassing the verified-token cache.
    pub async fn verify_uncached(
        &self,
        token: &str,
        app_id: &str,
    ) -> Result<Arc<VerifiedToken>, AuthError> {
        let kid = inspect_unverified(token, &self.issuer)?;
        let key = self.signing_key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        // Lifetimes are checked below against the router's clock (virtual under a paused test
        // runtime); jsonwebtoken would read the system clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_audience(&[app_id]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidIssuer => AuthError::BadIssuer,
                ErrorKind::InvalidAudience => AuthError::BadAudience,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::UnsupportedAlgorithm
                }
                ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::MalformedToken("a required claim (exp, iss, aud) is missing")
                }
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::MalformedToken("the token could not be decoded"),
            },
        )?;
        let now = now_secs();
        if data.claims.exp.saturating_add(self.clock_skew_secs) <= now {
            return Err(AuthError::Expired);
        }
        if data
            .claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.clock_skew_secs))
        {
            return Err(AuthError::NotYetValid);
        }
        Ok(Arc::new(VerifiedToken {
            audience: app_id.into(),
            service_url: data.claims.serviceurl.map(Into::into),
            expires_at: data.claims.exp,
            endorsements: Arc::clone(&key.endorsements),
            kid: kid.into(),
        }))
    }

    /// The key for `kid`, loading the key set when none was ever loaded and refreshing it once
    /// (rate-limited, coalesced) when the `kid` is unknown.
    async fn signing_key(&self, kid: &str) -> Result<Arc<keys::SigningKey>, AuthError> {
        if !self.keys.has_keys() {
            self.keys
                .refresh()
                .await
                .map_err(|e| AuthError::DiscoveryUnavailable(e.to_string()))?;
        }
        if let Some(key) = self.keys.current().keys.get(kid) {
            return Ok(Arc::clone(key));
        }
        if self.unknown_kid_refreshes.check().is_ok() {
            tracing::info!(%kid, "unknown signing key id: refreshing the key set");
            // A failed refresh leaves the old keys; the kid is then still unknown.
            let _ = self.keys.refresh().await;
            if let Some(key) = self.keys.current().keys.get(kid) {
                return Ok(Arc::clone(key));
            }
        }
        Err(AuthError::UnknownKey)
    }
}

/// The checks made before any signature work, as the SDKs make them: three base64url parts, a
/// JSON header with `alg` RS256 and a `kid`, and a JSON payload whose `iss` is `issuer`. Returns
/// the `kid` to look the signing key up by. Nothing here trusts the token yet.
pub fn inspect_unverified(token: &str, issuer: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::MalformedToken(
            "expected three dot-separated parts",
        ));
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| AuthError::MalformedToken("header is not base64url"))?;
    let header: UnverifiedHeader<'_> = serde_json::from_slice(&header_json)
        .map_err(|_| AuthError::MalformedToken("header is not a JSON object"))?;
    if header.alg != Some("RS256") {
        return Err(AuthError::UnsupportedAlgorithm);
    }
    let kid = header
        .kid
        .ok_or(AuthError::MalformedToken("header has no kid"))?
        .into_owned();
    let payload_json = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| AuthError::MalformedToken("payload is not base64url"))?;
    let unverified: UnverifiedIssuer = serde_json::from_slice(&payload_json)
        .map_err(|_| AuthError::MalformedToken("payload is not a JSON object"))?;
    if unverified.iss.as_deref() != Some(issuer) {
        return Err(AuthError::BadIssuer);
    }
    Ok(kid)
}

/// The token of a `Bearer <token>` header (scheme compared case-insensitively).
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::MissingToken)?;
    let header = std::str::from_utf8(header)
        .map_err(|_| AuthError::MalformedToken("header is not UTF-8"))?;
    let mut parts = header.splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let token = parts.next().unwrap_or_default().trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::MalformedToken("token too large"));
    }
    Ok(token)
}

fn now_secs() -> u64 {
    crate::clock::unix_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_shapes() {
        assert_eq!(bearer_token(None), Err(AuthError::MissingToken));
        assert_eq!(bearer_token(Some(b"")), Err(AuthError::MissingToken));
        assert_eq!(bearer_token(Some(b"Bearer")), Err(AuthError::MissingToken));
        assert_eq!(
            bearer_token(Some(b"Basic abc")),
            Err(AuthError::MissingToken)
        );
        assert_eq!(bearer_token(Some(b"Bearer a.b.c")), Ok("a.b.c"));
        assert_eq!(bearer_token(Some(b"bearer a.b.c")), Ok("a.b.c"));
    }

    #[test]
    fn activity_checks_need_endorsement_and_matching_service_url() {
        let token = VerifiedToken {
            audience: "app".into(),
            service_url: Some("https://smba.trafficmanager.net/amer/".into()),
            expires_at: now_secs() + 60,
            endorsements: vec!["msteams".into()].into(),
            kid: "key-1".into(),
        };
        let url = "https://smba.trafficmanager.net/amer/";
        assert_eq!(token.check_activity("msteams", url, &[]), Ok(()));
        assert!(matches!(
            token.check_activity("webchat", url, &[]),
            Err(AuthError::MissingEndorsement(_))
        ));
        assert_eq!(
            token.check_activity("msteams", "https://evil.example/", &[]),
            Err(AuthError::ServiceUrlMismatch)
        );
        let unendorsed = VerifiedToken {
            audience: "app".into(),
            service_url: Some(url.into()),
            expires_at: now_secs() + 60,
            endorsements: Vec::new().into(),
            kid: "key-2".into(),
        };
        assert!(matches!(
            unendorsed.check_activity("msteams", url, &[]),
            Err(AuthError::MissingEndorsement(_))
        ));
        assert!(matches!(
            token.check_activity("msteams", url, &["other".into()]),
            Err(AuthError::MissingEndorsement(_))
        ));
    }
}
