//! OpenID metadata and signing keys of the Bot Connector. Readers load the current key set
//! lock-free; refreshes are single-flight (concurrent callers share one fetch and its result) and
//! a failed refresh keeps the last known good keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Instant;

use arc_swap::ArcSwap;
use jsonwebtoken::DecodingKey;
use metrics::counter;
use serde::Deserialize;

use crate::telemetry::{self, KEY_REFRESHES};

/// One RSA signing key and the channels it endorses.
pub struct SigningKey {
    pub decoding: DecodingKey,
    /// Channel ids (for example `msteams`) the key may sign for; empty means any.
    pub endorsements: Arc<[Box<str>]>,
}

#[derive(Default)]
pub struct KeySet {
    pub keys: HashMap<String, Arc<SigningKey>>,
    /// When the set was fetched; `None` until the first successful load.
    pub loaded_at: Option<Instant>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error("OpenID metadata: {0}")]
    Metadata(String),
    #[error("signing keys: {0}")]
    Keys(String),
}

#[derive(Deserialize)]
struct OpenIdMetadata {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct JwkSetDocument {
    keys: Vec<JwkDocument>,
}

/// A JWK as the Bot Framework publishes it: the usual RSA members plus `endorsements`.
#[derive(Deserialize)]
struct JwkDocument {
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    kty: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    endorsements: Vec<String>,
}

pub struct KeyStore {
    http: reqwest::Client,
    metadata_url: String,
    current: ArcSwap<KeySet>,
    /// Serializes refreshes; holders of a stale `attempts` value reuse the result in `last`.
    refresh_lock: tokio::sync::Mutex<Option<Result<(), DiscoveryError>>>,
    attempts: AtomicU64,
    readiness: Arc<telemetry::Readiness>,
}

impl KeyStore {
    pub fn new(
        http: reqwest::Client,
        metadata_url: String,
        readiness: Arc<telemetry::Readiness>,
    ) -> Self {
        Self {
            http,
            metadata_url,
            current: ArcSwap::from_pointee(KeySet::default()),
            refresh_lock: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            readiness,
        }
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// Whether the published set holds `kid` (no reference count taken: the hot path asks).
    pub fn has_key(&self, kid: &str) -> bool {
        self.current.load().keys.contains_key(kid)
    }

    pub fn has_keys(&self) -> bool {
        self.current.load().loaded_at.is_some()
    }

    /// Fetches metadata and keys unless another caller did so while this one waited, in which
    /// case that caller's result is returned.
    pub async fn refresh(&self) -> Result<(), DiscoveryError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut last = self.refresh_lock.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen
            && let Some(result) = last.as_ref()
        {
            return result.clone();
        }
        let result = self.fetch().await;
        match &result {
            Ok(set) => {
                tracing::info!(keys = set.keys.len(), "signing keys loaded");
                counter!(KEY_REFRESHES, "result" => "ok").increment(1);
                self.readiness.set_keys_loaded();
            }
            Err(e) => {
                tracing::warn!(error = %e, "signing key refresh failed; keeping the last known keys");
                counter!(KEY_REFRESHES, "result" => "error").increment(1);
            }
        }
        let result = result.map(|set| self.current.store(Arc::new(set)));
        *last = Some(result.clone());
        self.attempts.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn fetch(&self) -> Result<KeySet, DiscoveryError> {
        let metadata: OpenIdMetadata = self
            .get_json(&self.metadata_url)
            .await
            .map_err(DiscoveryError::Metadata)?;
        let jwks: JwkSetDocument = self
            .get_json(&metadata.jwks_uri)
            .await
            .map_err(DiscoveryError::Keys)?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            // Keys that are not RSA (no n/e) are ignored, as the SDKs do.
            let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else {
                continue;
            };
            if jwk.kty.as_deref().is_some_and(|k| k != "RSA") {
                continue;
            }
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(decoding) => {
                    let endorsements: Vec<Box<str>> =
                        jwk.endorsements.into_iter().map(Into::into).collect();
                    keys.insert(
                        kid,
                        Arc::new(SigningKey {
                            decoding,
                            endorsements: endorsements.into(),
                        }),
                    );
                }
                Err(err) => tracing::warn!(%kid, %err, "ignoring an unusable signing key"),
            }
        }
        if keys.is_empty() {
            return Err(DiscoveryError::Keys(
                "no usable RSA key in the key set".into(),
            ));
        }
        Ok(KeySet {
            keys,
            loaded_at: Some(crate::clock::now()),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| format!("GET {url}: invalid document: {e}"))
    }

    /// Loads the keys at start (retrying with backoff until it works) and then refreshes them on
    /// the configured schedule, until shutdown.
    pub async fn run_refresher(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut delay = Duration::from_millis(250);
        loop {
            let wait = match self.refresh().await {
                Ok(()) => {
                    delay = Duration::from_millis(250);
                    interval
                }
                Err(_) => {
                    delay = (delay * 2).min(Duration::from_secs(30));
                    // Keys that are still cached are good until the next scheduled refresh.
                    if self.has_keys() {
                        delay.max(Duration::from_secs(30))
                    } else {
                        delay
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
