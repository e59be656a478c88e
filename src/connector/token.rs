//! Outbound tokens: OAuth 2.0 client credentials against
//! `{login_url}/{tenant or botframework.com}/oauth2/v2.0/token`, one token per (authority, app,
//! scope), cached until five minutes before it expires, one request in flight per key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Instant;

use metrics::counter;
use serde::Deserialize;

use crate::recent::{Owner, Recent};
use crate::registry::AppCredentials;
use crate::telemetry::CONNECTOR_REQUESTS;

/// Tokens are renewed this long before they expire (the SDKs use five minutes).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
const MULTI_TENANT_AUTHORITY: &str = "botframework.com";

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// `error` is the OAuth error and `aadsts` the Entra ID error number; the description is
    /// not kept, because it can quote the tenant.
    #[error("token endpoint refused the credentials: HTTP {status}: {error}{}", aadsts.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        status: u16,
        error: String,
        aadsts: Option<String>,
    },
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint answered an invalid document: {0}")]
    Invalid(String),
    /// Never asked with an empty secret (a stored one this process cannot open, or none).
    #[error("the integration has no App Secret this router can use")]
    NoSecret,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    authority: String,
    app_id: String,
    /// Part of the key so a rotated secret gets its own token at once.
    secret_digest: u64,
    /// Each cloud has its own tokens.
    cloud: Option<Arc<crate::auth::cloud::CloudAuth>>,
    /// Another scope than the cloud's Bot Framework one (Microsoft Graph).
    scope: Option<Arc<str>>,
}

#[derive(Clone)]
struct CachedToken {
    access_token: Arc<str>,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct TokenErrorResponse {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

pub struct TokenProvider {
    http: reqwest::Client,
    login_url: String,
    scope: String,
    cache: moka::future::Cache<TokenKey, CachedToken>,
    /// This provider's entries in each thread's [`RECENT_TOKENS`].
    recent: Owner,
    /// Moves on whenever a token leaves the shared cache or another takes its place: what a
    /// thread kept from before is not answered any more.
    generation: AtomicU64,
}

thread_local! {
    /// The Bot Framework tokens this thread used last, by App ID, in front of the shared cache:
    /// every send asks for one, and the shared cache's lookup (its key built and hashed, a read
    /// recorded) cost more than a microsecond of each.
    static RECENT_TOKENS: std::cell::RefCell<Recent<RecentToken>> =
        const { std::cell::RefCell::new(Recent::new()) };
}

/// A token a thread kept, with what it was issued for besides the App ID (two integrations of
/// one app may differ in the rest: each is looked at).
#[derive(Clone)]
struct RecentToken {
    generation: u64,
    secret_digest: u64,
    tenant_id: Option<Box<str>>,
    /// Kept alive by the entry, so that no other cloud's settings can take its address.
    cloud: Option<Arc<crate::auth::cloud::CloudAuth>>,
    token: CachedToken,
}

impl RecentToken {
    /// The token, while it was issued for these credentials, has not been dropped since, and
    /// is not due for renewal.
    fn answer(
        &self,
        credentials: &AppCredentials,
        generation: u64,
        now: Instant,
    ) -> Option<Arc<str>> {
        let same_cloud = match (&self.cloud, &credentials.cloud) {
            (Some(kept), Some(asked)) => Arc::ptr_eq(kept, asked),
            (None, None) => true,
            _ => false,
        };
        (self.generation == generation
            && same_cloud
            && self.tenant_id.as_deref() == credentials.tenant_id.as_deref()
            && self.secret_digest == secret_digest(&credentials.app_secret)
            && now < self.token.renew_at)
            .then(|| Arc::clone(&self.token.access_token))
    }
}

/// Part of a token's key, so that a rotated secret gets its own token at once.
fn secret_digest(secret: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    secret.hash(&mut h);
    h.finish()
}

impl TokenProvider {
    pub fn new(http: reqwest::Client, login_url: &str, scope: &str) -> Self {
        Self {
            http,
            login_url: login_url.trim_end_matches('/').to_owned(),
            scope: scope.to_owned(),
            cache: moka::future::Cache::builder().max_capacity(100_000).build(),
            recent: Owner::new(),
            generation: AtomicU64::new(0),
        }
    }

    fn key(credentials: &AppCredentials) -> TokenKey {
        let multi_tenant = credentials
            .cloud
            .as_ref()
            .map_or(MULTI_TENANT_AUTHORITY, |c| c.token_tenant.as_str());
        TokenKey {
            authority: credentials
                .tenant_id
                .clone()
                .unwrap_or_else(|| multi_tenant.to_owned()),
            app_id: credentials.app_id.clone(),
            secret_digest: secret_digest(&credentials.app_secret),
            cloud: credentials.cloud.clone(),
            scope: None,
        }
    }

    /// A valid access token for the app, fetched when none is cached or it is due for renewal.
    pub async fn token(&self, credentials: &AppCredentials) -> Result<Arc<str>, TokenError> {
        // Read before the shared cache is: a token dropped meanwhile is kept under the old
        // generation, which no lookup answers.
        let generation = self.generation.load(Ordering::Acquire);
        let now = crate::clock::now();
        let kept = RECENT_TOKENS.with_borrow(|recent| {
            recent.find_map(&self.recent, &credentials.app_id, |kept| {
                kept.answer(credentials, generation, now)
            })
        });
        if let Some(token) = kept {
            return Ok(token);
        }
        let token = self
            .cached_entry(credentials, Self::key(credentials), None)
            .await?;
        let access_token = Arc::clone(&token.access_token);
        RECENT_TOKENS.with_borrow_mut(|recent| {
            recent.put(
                &self.recent,
                &credentials.app_id,
                RecentToken {
                    generation,
                    secret_digest: secret_digest(&credentials.app_secret),
                    tenant_id: credentials.tenant_id.as_deref().map(Box::from),
                    cloud: credentials.cloud.clone(),
                    token,
                },
            );
        });
        Ok(access_token)
    }

    /// A token for the app issued by `tenant` (an organization that consented to it) for
    /// `scope` (Microsoft Graph's); cached like the others.
    pub async fn token_in_tenant(
        &self,
        credentials: &AppCredentials,
        tenant: &str,
        scope: &str,
    ) -> Result<Arc<str>, TokenError> {
        let key = TokenKey {
            authority: tenant.to_owned(),
            scope: Some(Arc::from(scope)),
            ..Self::key(credentials)
        };
        Ok(self
            .cached_entry(credentials, key, Some(scope))
            .await?
            .access_token)
    }

    /// The cached token of `key` while it is not due for renewal, else a fresh one (one request
    /// in flight per key).
    async fn cached_entry(
        &self,
        credentials: &AppCredentials,
        key: TokenKey,
        scope: Option<&str>,
    ) -> Result<CachedToken, TokenError> {
        if let Some(cached) = self.cache.get(&key).await {
            if crate::clock::now() < cached.renew_at {
                return Ok(cached);
            }
            self.forget(&key).await;
        }
        // Boxed: the fetch is rare, and inline it would make every send's future kilobytes
        // larger (copied whole wherever a turn's future is moved).
        Box::pin(self.fetch_once(credentials, key, scope)).await
    }

    /// Fetches the token of `key` and caches it, one request in flight per key.
    async fn fetch_once(
        &self,
        credentials: &AppCredentials,
        key: TokenKey,
        scope: Option<&str>,
    ) -> Result<CachedToken, TokenError> {
        self.cache
            .try_get_with(key.clone(), self.fetch(credentials, &key.authority, scope))
            .await
            .map_err(|e| (*e).clone())
    }

    /// Asks the token endpoint now, bypassing the cache (the setup check), and caches the token
    /// it gets.
    pub async fn check(&self, credentials: &AppCredentials) -> Result<(), TokenError> {
        let key = Self::key(credentials);
        let token = self.fetch(credentials, &key.authority, None).await?;
        self.cache.insert(key, token).await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops the cached token, after the Connector refused it.
    pub async fn invalidate(&self, credentials: &AppCredentials) {
        self.forget(&Self::key(credentials)).await;
    }

    /// Drops `key`'s token from the shared cache and from every thread's recent ones.
    async fn forget(&self, key: &TokenKey) {
        self.cache.invalidate(key).await;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn fetch(
        &self,
        credentials: &AppCredentials,
        authority: &str,
        scope: Option<&str>,
    ) -> Result<CachedToken, TokenError> {
        if credentials.app_secret.is_empty() {
            return Err(TokenError::NoSecret);
        }
        let (login_url, scope_of_cloud) = match &credentials.cloud {
            Some(cloud) => (
                cloud.login_url.trim_end_matches('/'),
                cloud.oauth_scope.as_str(),
            ),
            None => (self.login_url.as_str(), self.scope.as_str()),
        };
        let scope = scope.unwrap_or(scope_of_cloud);
        let url = format!("{login_url}/{authority}/oauth2/v2.0/token");
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", credentials.app_id.as_str()),
            ("client_secret", credentials.app_secret.as_str()),
            ("scope", scope),
        ];
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let result = self
            .http
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                counter!(CONNECTOR_REQUESTS, "op" => "token", "status" => "error").increment(1);
                return Err(TokenError::Unreachable(e.without_url().to_string()));
            }
        };
        let status = response.status();
        counter!(CONNECTOR_REQUESTS, "op" => "token", "status" => status.as_str().to_owned())
            .increment(1);
        if !status.is_success() {
            let (error, aadsts) = match response.json::<TokenErrorResponse>().await {
                Ok(body) => (
                    body.error.unwrap_or_else(|| "unknown".into()),
                    body.error_description.as_deref().and_then(aadsts_code),
                ),
                Err(_) => ("no error document".into(), None),
            };
            return Err(TokenError::Refused {
                status: status.as_u16(),
                error,
                aadsts,
            });
        }
        let body: TokenResponse = response
            .json()
            .await
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let lifetime = Duration::from_secs(body.expires_in);
        // Short-lived tokens are renewed at half their lifetime instead of the fixed margin.
        let renew_after = if lifetime > REFRESH_MARGIN * 2 {
            lifetime - REFRESH_MARGIN
        } else {
            lifetime / 2
        };
        Ok(CachedToken {
            access_token: body.access_token.into(),
            renew_at: crate::clock::now() + renew_after,
        })
    }
}

/// `AADSTS7000215` from an error description such as "AADSTS7000215: Invalid client secret...".
fn aadsts_code(description: &str) -> Option<String> {
    let start = description.find("AADSTS")?;
    let digits = description[start + 6..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    (digits > 0).then(|| description[start..start + 6 + digits].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_token_answers_only_its_credentials_in_its_generation_before_renewal() {
        let credentials = AppCredentials {
            app_id: "app".into(),
            app_secret: "secret".into(),
            tenant_id: None,
            cloud: None,
        };
        let now = crate::clock::now();
        let kept = RecentToken {
            generation: 3,
            secret_digest: secret_digest("secret"),
            tenant_id: None,
            cloud: None,
            token: CachedToken {
                access_token: Arc::from("token"),
                renew_at: now + Duration::from_secs(60),
            },
        };
        assert_eq!(kept.answer(&credentials, 3, now).as_deref(), Some("token"));
        // Dropped from the shared cache since (refused by the Connector, replaced).
        assert_eq!(kept.answer(&credentials, 4, now), None);
        // Due for renewal.
        assert_eq!(
            kept.answer(&credentials, 3, now + Duration::from_secs(60)),
            None
        );
        let rotated = AppCredentials {
            app_secret: "rotated".into(),
            ..credentials.clone()
        };
        assert_eq!(kept.answer(&rotated, 3, now), None);
        let single_tenant = AppCredentials {
            tenant_id: Some("tenant".into()),
            ..credentials
        };
        assert_eq!(kept.answer(&single_tenant, 3, now), None);
    }

    #[test]
    fn aadsts_codes_are_extracted_without_the_description() {
        assert_eq!(
            aadsts_code(
                "AADSTS700016: Application with identifier 'x' was not found in the directory 'y'."
            )
            .as_deref(),
            Some("AADSTS700016")
        );
        assert_eq!(aadsts_code("no code here"), None);
        assert_eq!(aadsts_code("AADSTS"), None);
    }
}
