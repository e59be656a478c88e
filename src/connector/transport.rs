//! The HTTP exchange of one Bot Connector call: a request out, its status, headers and body back.
//!
//! Every reply of every turn goes through here, so the usual path is hyper's pooled client given
//! a URI string built from a service URL checked once (`allowed_service_url`): reqwest on the same
//! path parsed each URL three more times (its own request, its redirect policy, its proxy
//! matcher), several microseconds per reply. When the environment names an HTTP proxy, the
//! exchange goes through reqwest, which speaks to proxies, as it always did.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::ConnectorConfig;

/// The most of an answer's body that is read: a roster page is the largest the Connector gives.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// The environment variables through which reqwest (and curl) take a proxy.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

pub const USER_AGENT_VALUE: &str = concat!(
    "Microsoft-BotFramework/3.1 teams-router/",
    env!("CARGO_PKG_VERSION")
);

/// What came back: the body is empty when it could not be read in time.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why no answer came back.
#[derive(Debug)]
pub enum Failure {
    /// No connection was made: the request was not sent.
    Connect(String),
    /// The request may have reached the Connector (a timeout, a connection lost mid-way).
    Ambiguous(String),
}

pub struct Transport {
    client: Inner,
    request_timeout: Duration,
}

enum Inner {
    Direct(Box<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>),
    Proxied(reqwest::Client),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS for the Bot Connector: {0}")]
pub struct SetupError(#[from] rustls::Error);

impl Transport {
    /// hyper's client, or `proxied` (reqwest with the process's proxy settings) when one of the
    /// proxy variables is set in `env`.
    pub fn new(
        config: &ConnectorConfig,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        proxied: reqwest::Client,
    ) -> Result<Self, SetupError> {
        let request_timeout = Duration::from_millis(config.request_timeout_ms);
        let proxy_set = PROXY_VARIABLES
            .iter()
            .any(|name| env(name).is_some_and(|value| !value.trim().is_empty()));
        if proxy_set {
            tracing::info!("a proxy is set in the environment: Bot Connector calls go through it");
            return Ok(Self {
                client: Inner::Proxied(proxied),
                request_timeout,
            });
        }
        use rustls_platform_verifier::BuilderVerifierExt;
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_platform_verifier()?
            .with_no_client_auth();
        Ok(Self::direct(config, tls))
    }

    /// hyper's client with `tls` for https service URLs.
    pub fn direct(config: &ConnectorConfig, tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(https);
        Self {
            client: Inner::Direct(Box::new(client)),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        }
    }

    /// One exchange with `uri` (absolute, built from a checked service URL), within the request
    /// timeout, body read included.
    pub async fn exchange(
        &self,
        method: Method,
        uri: String,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> Result<Answer, Failure> {
        match &self.client {
            Inner::Direct(client) => {
                let request = direct_request(method, uri, token, body)
                    .map_err(|e| Failure::Connect(format!("invalid request: {e}")))?;
                // A status received is an answer: a body that stalls or is cut short after it
                // reads as empty (the message was posted; sending it again would post it twice).
                let deadline = tokio::time::Instant::now() + self.request_timeout;
                let response =
                    match tokio::time::timeout_at(deadline, client.request(request)).await {
                        Ok(Ok(response)) => response,
                        Ok(Err(e)) if e.is_connect() => return Err(Failure::Connect(describe(&e))),
                        Ok(Err(e)) => return Err(Failure::Ambiguous(describe(&e))),
                        Err(_) => {
                            return Err(Failure::Ambiguous(format!(
                                "no answer within {} ms",
                                self.request_timeout.as_millis()
                            )));
                        }
                    };
                let (parts, body) = response.into_parts();
                let body =
                    tokio::time::timeout_at(deadline, Limited::new(body, MAX_BODY).collect())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|collected| collected.to_bytes())
                        .unwrap_or_default();
                Ok(Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            }
            Inner::Proxied(client) => {
                let mut request = client
                    .request(method, uri)
                    .timeout(self.request_timeout)
                    .header(ACCEPT, "application/json");
                if let Some(body) = body {
                    request = request.header(CONTENT_TYPE, "application/json").body(body);
                }
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.map_err(|e| {
                    let connect = e.is_connect();
                    let text = e.without_url().to_string();
                    if connect {
                        Failure::Connect(text)
                    } else {
                        Failure::Ambiguous(text)
                    }
                })?;
                let status = response.status();
                let headers = response.headers().clone();
                let body = response.bytes().await.unwrap_or_default();
                Ok(Answer {
                    status,
                    headers,
                    body,
                })
            }
        }
    }
}

fn direct_request(
    method: Method,
    uri: String,
    token: Option<&str>,
    body: Option<Bytes>,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let uri = Uri::try_from(uri)?;
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(ACCEPT, HeaderValue::from_static("application/json"))
        .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    if body.is_some() {
        request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(token) = token {
        let mut value = HeaderValue::try_from(format!("Bearer {token}"))?;
        value.set_sensitive(true);
        request = request.header(AUTHORIZATION, value);
    }
    request.body(Full::new(body.unwrap_or_default()))
}

/// hyper's error with its causes (the outer one alone says only "client error (Connect)").
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_in_the_environment_sends_through_reqwest() {
        let config = ConnectorConfig::default();
        let with_proxy = |name: &str| (name == "https_proxy").then(|| "http://proxy:3128".into());
        let transport = Transport::new(&config, &with_proxy, reqwest::Client::new());
        assert!(matches!(transport.map(|t| t.client), Ok(Inner::Proxied(_))));
        let blank = |name: &str| (name == "HTTP_PROXY").then(|| " ".into());
        let transport = Transport::new(&config, &blank, reqwest::Client::new());
        assert!(matches!(transport.map(|t| t.client), Ok(Inner::Direct(_))));
    }

    #[test]
    fn the_token_header_is_sensitive_and_the_body_typed() {
        let request = direct_request(
            Method::POST,
            "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1/activities".into(),
            Some("tok"),
            Some(Bytes::from_static(b"{}")),
        );
        let Ok(request) = request else {
            panic!("the request builds");
        };
        let auth = request.headers().get(AUTHORIZATION);
        assert_eq!(auth.map(HeaderValue::as_bytes), Some(&b"Bearer tok"[..]));
        assert!(auth.is_some_and(HeaderValue::is_sensitive));
        assert_eq!(
            request
                .headers()
                .get(CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(&b"application/json"[..])
        );
        assert_eq!(request.uri().host(), Some("smba.trafficmanager.net"));
        assert_eq!(
            request.uri().path(),
            "/amer/v3/conversations/a%3A1/activities"
        );
    }

    /// An exchange without token or body.
    async fn bare(transport: &Transport, method: Method, uri: String) -> Result<Answer, Failure> {
        transport.exchange(method, uri, None, None).await
    }

    /// A listener on a free loopback port.
    async fn loopback_listener() -> (tokio::net::TcpListener, u16) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        (listener, port)
    }

    /// A client configuration that trusts no certificate (for plain-http servers, and to see
    /// an untrusted one refused).
    fn trusting_nobody() -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|e| panic!("client config: {e}"))
    }

    /// A TLS server for `localhost` answering 201 with the request's protocol and
    /// authorization echoed in the body; its certificate is the only root the client trusts.
    async fn tls_server() -> (u16, rustls::ClientConfig) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .unwrap_or_else(|e| panic!("certificate: {e}"));
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.clone()], key)
            })
            .unwrap_or_else(|e| panic!("server config: {e}"));
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let (listener, port) = loopback_listener().await;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(|request: Request<_>| async move {
                        let seen = format!(
                            "{:?} {}",
                            request.version(),
                            request
                                .headers()
                                .get(AUTHORIZATION)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                        );
                        hyper::Response::builder()
                            .status(StatusCode::CREATED)
                            .body(Full::new(Bytes::from(seen)))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap_or_else(|e| panic!("root: {e}"));
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|e| panic!("client config: {e}"));
        (port, client)
    }

    #[tokio::test]
    async fn https_speaks_http2_with_the_token() {
        let (port, tls) = tls_server().await;
        let transport = Transport::direct(&ConnectorConfig::default(), tls);
        for _ in 0..2 {
            let answer = transport
                .exchange(
                    Method::POST,
                    format!("https://localhost:{port}/amer/v3/conversations/a/activities"),
                    Some("tok"),
                    Some(Bytes::from_static(b"{}")),
                )
                .await;
            let Ok(answer) = answer else {
                panic!("no answer");
            };
            assert_eq!(answer.status, StatusCode::CREATED);
            assert_eq!(&answer.body[..], b"HTTP/2.0 Bearer tok");
        }
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_connect_failure() {
        let (port, _) = tls_server().await;
        let tls = trusting_nobody();
        let transport = Transport::direct(&ConnectorConfig::default(), tls);
        let answer = bare(
            &transport,
            Method::GET,
            format!("https://localhost:{port}/v3"),
        )
        .await;
        assert!(
            matches!(answer, Err(Failure::Connect(_))),
            "{:?}",
            answer.err()
        );
    }

    #[tokio::test]
    async fn no_answer_in_time_is_ambiguous_and_a_closed_port_is_not() {
        let (listener, port) = loopback_listener().await;
        // Accepts and reads, never answers.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let config = ConnectorConfig {
            request_timeout_ms: 200,
            ..ConnectorConfig::default()
        };
        let tls = trusting_nobody();
        let transport = Transport::direct(&config, tls);
        let silent = bare(
            &transport,
            Method::POST,
            format!("http://127.0.0.1:{port}/v3"),
        )
        .await;
        assert!(
            matches!(silent, Err(Failure::Ambiguous(_))),
            "{:?}",
            silent.err()
        );
        let closed = {
            let probe =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
            probe.local_addr().map(|a| a.port()).unwrap_or_default()
        };
        let refused = bare(
            &transport,
            Method::POST,
            format!("http://127.0.0.1:{closed}/v3"),
        )
        .await;
        assert!(
            matches!(refused, Err(Failure::Connect(_))),
            "{:?}",
            refused.err()
        );
    }

    #[tokio::test]
    async fn a_status_whose_body_stalls_is_an_answer_with_an_empty_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, port) = loopback_listener().await;
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n{\"id\"")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let config = ConnectorConfig {
            request_timeout_ms: 300,
            ..ConnectorConfig::default()
        };
        let tls = trusting_nobody();
        let transport = Transport::direct(&config, tls);
        let answer = bare(
            &transport,
            Method::POST,
            format!("http://127.0.0.1:{port}/v3"),
        )
        .await;
        let Ok(answer) = answer else {
            panic!("a status came back: {:?}", answer.err());
        };
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.body.is_empty());
    }

    #[test]
    fn a_token_that_is_no_header_value_is_refused() {
        let request = direct_request(
            Method::POST,
            "http://127.0.0.1:1/v3".into(),
            Some("bad\ntoken"),
            None,
        );
        assert!(request.is_err());
    }
}
