//! The harness's bare reference endpoint: the least work a Teams echo endpoint must do, and
//! nothing else. It verifies the channel JWT (RS256, key by `kid` from the OpenID metadata's key
//! set, `iss`/`aud`/`exp`/`nbf` with five minutes of leeway, the `serviceurl` claim equal to the
//! activity's `serviceUrl`, the key's endorsements holding its `channelId`), caches verified
//! tokens by their text, answers 200 at once, and POSTs the echo reply to
//! `{serviceUrl}v3/conversations/{id}/activities/{activityId}` with a pooled client and a cached
//! client-credentials token. No ordering, dedup, state, metrics or limits: whatever a router does
//! beyond this is its own cost, which `loadtest peak --reference` shows as a ratio.
//!
//! Configured like any Bot Framework endpoint the harness can drive (`--target-cmd`): `PORT`,
//! `APP_ID`, `APP_PASSWORD`, `OPENID_URL`, `TOKEN_URL`, `OAUTH_SCOPE`; it listens on
//! `127.0.0.1:PORT` at `/api/messages`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;
use serde_json::{Value, json};

const ISSUER: &str = "https://api.botframework.com";
const DEFAULT_SCOPE: &str = "https://api.botframework.com/.default";
const MAX_BODY: usize = 256 * 1024;

/// Where the endpoint listens and how it reaches Microsoft's side.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    pub app_id: String,
    pub app_password: String,
    pub openid_url: String,
    pub token_url: String,
    pub scope: String,
}

impl Settings {
    /// From the environment, as `--target-cmd` passes it.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        Ok(Self {
            port: var("PORT")?
                .parse()
                .map_err(|e| format!("PORT is not a port: {e}"))?,
            app_id: var("APP_ID")?,
            app_password: var("APP_PASSWORD")?,
            openid_url: var("OPENID_URL")?,
            token_url: var("TOKEN_URL")?,
            scope: std::env::var("OAUTH_SCOPE").unwrap_or_else(|_| DEFAULT_SCOPE.into()),
        })
    }
}

struct Key {
    decoding: DecodingKey,
    endorsements: Vec<String>,
}

/// A verified token: its expiry, its serviceurl claim, and its key's endorsements.
type Verified = (i64, String, Arc<[String]>);

struct Endpoint {
    settings: Settings,
    keys: HashMap<String, Key>,
    validation: Validation,
    /// Verified tokens by their text.
    verified: RwLock<HashMap<String, Verified>>,
    client: reqwest::Client,
    outbound: Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default)]
    serviceurl: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Activity {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    service_url: String,
    channel_id: String,
    conversation: Value,
    #[serde(default)]
    from: Value,
    #[serde(default)]
    recipient: Value,
    #[serde(default)]
    text: Option<String>,
}

/// Fetches the signing keys, binds `127.0.0.1:PORT`, and serves until the process is stopped.
pub async fn serve(settings: Settings) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let keys = fetch_keys(&client, &settings.openid_url).await?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[settings.app_id.as_str()]);
    validation.leeway = 300;
    validation.validate_nbf = true;
    let addr = SocketAddr::from(([127, 0, 0, 1], settings.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let endpoint = Arc::new(Endpoint {
        settings,
        keys,
        validation,
        verified: RwLock::new(HashMap::new()),
        client,
        outbound: Mutex::new(None),
    });
    println!("reference endpoint listening on http://{addr}/api/messages");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let endpoint = Arc::clone(&endpoint);
                async move { Ok::<_, Infallible>(endpoint.handle(request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn fetch_keys(
    client: &reqwest::Client,
    openid_url: &str,
) -> Result<HashMap<String, Key>, String> {
    let get = |url: String| async move {
        client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("GET {url}: {e}"))?
            .json::<Value>()
            .await
            .map_err(|e| format!("GET {url}: {e}"))
    };
    let metadata = get(openid_url.to_owned()).await?;
    let jwks_uri = metadata["jwks_uri"]
        .as_str()
        .ok_or("the OpenID metadata has no jwks_uri")?;
    let jwks = get(jwks_uri.to_owned()).await?;
    let mut keys = HashMap::new();
    for key in jwks["keys"].as_array().into_iter().flatten() {
        let (Some(kid), Some(n), Some(e)) =
            (key["kid"].as_str(), key["n"].as_str(), key["e"].as_str())
        else {
            continue;
        };
        let Ok(decoding) = DecodingKey::from_rsa_components(n, e) else {
            continue;
        };
        let endorsements = key["endorsements"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        keys.insert(
            kid.to_owned(),
            Key {
                decoding,
                endorsements,
            },
        );
    }
    if keys.is_empty() {
        return Err(format!("no RSA keys at {jwks_uri}"));
    }
    Ok(keys)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

impl Endpoint {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != hyper::Method::POST || request.uri().path() != "/api/messages" {
            return status(StatusCode::NOT_FOUND);
        }
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let Some(token) = token else {
            return status(StatusCode::UNAUTHORIZED);
        };
        let body = match http_body_util::Limited::new(request.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return status(StatusCode::PAYLOAD_TOO_LARGE),
        };
        let Some((service_url, endorsements)) = self.verify(&token) else {
            return status(StatusCode::UNAUTHORIZED);
        };
        let Ok(activity) = serde_json::from_slice::<Activity>(&body) else {
            return status(StatusCode::BAD_REQUEST);
        };
        if activity.service_url != service_url || !endorsements.contains(&activity.channel_id) {
            return status(StatusCode::UNAUTHORIZED);
        }
        if activity.kind == "message" {
            tokio::spawn(async move { self.reply(activity).await });
        }
        status(StatusCode::OK)
    }

    /// The token's serviceurl claim and its key's endorsements, from the cache or verified now.
    fn verify(&self, token: &str) -> Option<(String, Arc<[String]>)> {
        let now = crate::keys::now_secs();
        if let Some((exp, service_url, endorsements)) = self.verified.read().get(token)
            && *exp + 300 > now
        {
            return Some((service_url.clone(), Arc::clone(endorsements)));
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        let key = self.keys.get(header.kid.as_deref()?)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .ok()?
            .claims;
        let endorsements: Arc<[String]> = key.endorsements.clone().into();
        let mut verified = self.verified.write();
        if verified.len() > 10_000 {
            verified.retain(|_, (exp, _, _)| *exp + 300 > now);
        }
        verified.insert(
            token.to_owned(),
            (
                claims.exp,
                claims.serviceurl.clone(),
                Arc::clone(&endorsements),
            ),
        );
        Some((claims.serviceurl, endorsements))
    }

    async fn outbound_token(&self) -> Option<String> {
        if let Some((token, until)) = self.outbound.lock().as_ref()
            && Instant::now() < *until
        {
            return Some(token.clone());
        }
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.settings.app_id)
            .append_pair("client_secret", &self.settings.app_password)
            .append_pair("scope", &self.settings.scope)
            .finish();
        let answer: Value = self
            .client
            .post(&self.settings.token_url)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let token = answer["access_token"].as_str()?.to_owned();
        let lifetime = answer["expires_in"].as_u64().unwrap_or(3600);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(300).max(60));
        *self.outbound.lock() = Some((token.clone(), until));
        Some(token)
    }

    async fn reply(&self, activity: Activity) {
        let Some(token) = self.outbound_token().await else {
            return;
        };
        let conversation_id = activity.conversation["id"].as_str().unwrap_or_default();
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let base = activity.service_url.trim_end_matches('/');
        let url = format!(
            "{base}/v3/conversations/{}/activities/{}",
            encode(conversation_id),
            encode(&activity.id)
        );
        let reply = json!({
            "type": "message",
            "text": format!("echo: {}", activity.text.as_deref().unwrap_or_default()),
            "from": activity.recipient,
            "recipient": activity.from,
            "conversation": activity.conversation,
            "replyToId": activity.id,
        });
        let _ = self
            .client
            .post(&url)
            .bearer_auth(token)
            .json(&reply)
            .send()
            .await;
    }
}
