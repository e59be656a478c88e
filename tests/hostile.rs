//! The bad-input catalogue (README, "Security"): every hostile input gets a clear status and
//! reason, never reaches a bot, and the router keeps serving. Each test is one row or a few.

mod common;

use std::time::{Duration, Instant};

use common::*;
use loadtest::keys::{connector_claims, now_secs};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn host_port(router: &impl Endpoint) -> String {
    router.base_url().trim_start_matches("http://").to_owned()
}

/// Writes `request` on a fresh connection and reads until the router closes it (or `wait`).
async fn exchange(addr: &str, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The router may answer and close before it has read everything (a 431, a 413): a write
    // error is part of the answer, not a test failure.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn dev_message(mock: &loadtest::mock::MockMicrosoft, conversation: &str, id: &str) -> Value {
    personal_message(mock, conversation, id, "hello")
}

async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// The router answers an ordinary activity at once: whatever came before did not hurt it.
async fn still_serving(router: &impl Endpoint, mock: &loadtest::mock::MockMicrosoft) {
    let started = Instant::now();
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_dev"),
        None,
        &dev_message(mock, "a:still-serving", &format!("s-{}", now_secs())),
    )
    .await;
    assert_eq!(status, 200, "the router still takes activities");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "and promptly: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bodies_that_parse_badly_are_refused_and_odd_but_valid_ones_answered() {
    let (mock, router) = start_process("").await;
    // Development mode replies unauthenticated.
    mock.set_connector_requires_auth(false);
    let client = http();
    let url = router.callback_url("teams_dev");
    let base = serde_json::to_string(&dev_message(&mock, "a:bodies", "b-1")).unwrap();
    let with = |field: &str| format!("{},{field}}}", base.trim_end_matches('}'));

    // Deep nesting: refused before any parser walks it.
    let deep = with(&format!(
        "\"value\":{}{}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    ));
    let (status, body) = post_raw(&client, &url, None, deep.into_bytes()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("too_deep"))
    );

    // A routing field given twice: which one would count is ambiguous, so neither does.
    let twice = with("\"serviceUrl\":\"https://169.254.169.254/\"");
    let (status, body) = post_raw(&client, &url, None, twice.into_bytes()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate")
    );

    // Invalid UTF-8 inside a string.
    let mut invalid = with("\"x\":\"AB\"").into_bytes();
    let at = invalid.len() - 3;
    invalid[at] = 0xff;
    let (status, body) = post_raw(&client, &url, None, invalid).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );

    // A non-routing key given twice is read as JSON parsers commonly do (the last one wins),
    // and the activity is answered.
    let mut repeated = dev_message(&mock, "a:repeated", "b-2");
    repeated.as_object_mut().unwrap().remove("text");
    let repeated = serde_json::to_string(&repeated).unwrap();
    let repeated = format!(
        "{},\"text\":\"first\",\"text\":\"second\"}}",
        repeated.trim_end_matches('}')
    );
    let (status, _) = post_raw(&client, &url, None, repeated.into_bytes()).await;
    assert_eq!(status, 200);

    // A huge string in a body under the limit (64 KiB here): taken and answered.
    let mut huge = dev_message(&mock, "a:huge", "b-3");
    huge["text"] = json!("é".repeat(25_000));
    let (status, _) = post(&client, &url, None, &huge).await;
    assert_eq!(status, 200);
    // A wrongly typed field the envelope does not read is treated as absent.
    let mut odd = dev_message(&mock, "a:odd", "b-4");
    odd["entities"] = json!({"not": "a list"});
    odd["text"] = json!("typed oddly");
    odd["locale"] = json!(42);
    let (status, _) = post(&client, &url, None, &odd).await;
    assert_eq!(status, 200);

    let replies = mock.wait_for_activities(3, Duration::from_secs(10)).await;
    let texts: Vec<&str> = replies.iter().map(|r| r.text()).collect();
    assert!(
        texts.contains(&"echo: second"),
        "{texts:?}\n{}",
        router.logs()
    );
    assert!(texts.contains(&"echo: typed oddly"), "{texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("echo: éé")), "{texts:?}");

    let scrape = metrics(&router).await;
    assert!(rejected(&scrape, "too_deep") >= 1.0);
    assert!(rejected(&scrape, "malformed_json") >= 2.0);
    still_serving(&router, &mock).await;
}

#[tokio::test]
async fn oversized_tokens_and_header_floods_are_refused() {
    let (mock, router) = start("").await;
    let addr = host_port(&router);
    let client = http();
    let body = dev_message(&mock, "a:tokens", "t-1");

    // A token over 16 KiB is refused before it is decoded.
    let big = format!(
        "{}.{}.{}",
        "e".repeat(8_000),
        "e".repeat(8_000),
        "e".repeat(1_000)
    );
    let (status, text) = post(
        &client,
        &router.callback_url("teams_prod"),
        Some(&big),
        &body,
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.contains("malformed_token") && text.contains("too large"),
        "{text}"
    );

    // A 1 MB token is over the header limit: 431 before the request reaches the router.
    let huge_token = "e".repeat(1 << 20);
    let request = format!(
        "POST /api/v1/integration/teams/teams_prod/callback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {huge_token}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let answer = exchange(&addr, request.as_bytes(), Duration::from_secs(5)).await;
    eprintln!("1 MB token: {:?}", answer.lines().next());
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // 10,000 headers: 431 as well.
    let mut request =
        String::from("POST /api/v1/integration/teams/teams_dev/callback HTTP/1.1\r\nHost: x\r\n");
    for i in 0..10_000 {
        request.push_str(&format!("X-Flood-{i}: {i}\r\n"));
    }
    request.push_str("Content-Length: 2\r\n\r\n{}");
    let answer = exchange(&addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    still_serving(&router, &mock).await;
}

#[tokio::test]
async fn slow_senders_are_cut_off_and_others_served_meanwhile() {
    let (mock, router) = start_counting_with_env(&[
        ("TEAMS_ROUTER__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
        ("TEAMS_ROUTER__SERVER__BODY_READ_TIMEOUT_MS", "500"),
    ])
    .await;
    let addr = host_port(&router);

    // Slowloris: 50 connections trickling header bytes.
    let mut trickles = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        trickles.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.expect("connect");
            let started = Instant::now();
            let _ = stream
                .write_all(b"POST /api/v1/integration/teams/teams_dev/callback HTTP/1.1\r\n")
                .await;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if stream.write_all(b"X").await.is_err() {
                    break;
                }
                let mut byte = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await
                {
                    break;
                }
            }
            started.elapsed()
        }));
    }
    still_serving(&router, &mock).await;
    for trickle in trickles {
        let held = trickle.await.unwrap();
        assert!(
            held < Duration::from_secs(5),
            "a trickling sender was cut off after {held:?}"
        );
    }

    // A body trickled after complete headers: 408 with its reason.
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    stream
        .write_all(b"POST /api/v1/integration/teams/teams_dev/callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let scrape = metrics(&router).await;
    assert!(rejected(&scrape, "body_timeout") >= 1.0);
    still_serving(&router, &mock).await;
}

#[tokio::test]
async fn pipelined_garbage_ends_the_connection_after_the_good_requests() {
    let (mock, router) = start("").await;
    mock.set_connector_requires_auth(false);
    let addr = host_port(&router);
    let body = serde_json::to_string(&dev_message(&mock, "a:pipelined", "p-1")).unwrap();
    let mut request = format!(
        "POST /api/v1/integration/teams/teams_dev/callback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(b"\x00\x01GARBAGE \xff\xfe / HTTP/9.9\r\n\r\n");
    let answer = exchange(&addr, &request, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("HTTP/1.1 400"),
        "the garbage gets a 400: {answer}"
    );
    mock.wait_for_activities(1, Duration::from_secs(10)).await;
    still_serving(&router, &mock).await;
}

#[tokio::test]
async fn odd_integration_ids_and_paths_reach_no_integration() {
    let (mock, router) = start("").await;
    let addr = host_port(&router);
    let body = serde_json::to_string(&dev_message(&mock, "a:paths", "x-1")).unwrap();
    let paths = [
        "/api/v1/integration/teams/../teams_dev/callback",
        "/api/v1/integration/teams/..%2Fteams_dev/callback",
        "/api/v1/integration/teams/%2e%2e%2fteams_dev/callback",
        "/api/v1/integration/teams/teams%5Fdev/callback",
        "/api/v1/integration/teams/teams_dev%00/callback",
        "/api/v1/integration/teams/teams_dev%2F..%2F..%2Fetc%2Fpasswd/callback",
        "/api/v1/integration/teams/%c0%ae%c0%ae/callback",
        "/api/v1/integration/teams/TEAMS_DEV/callback",
        "/api/v1/integration/teams//callback",
        "/api/v1/integration/teams/teams_dev/callback/../callback",
        "/api/v1/integration/teams/teams_dev/callback%2F",
    ];
    for path in paths {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(&addr, request.as_bytes(), Duration::from_secs(5)).await;
        let status = answer.get(9..12).unwrap_or("");
        assert!(
            matches!(status, "400" | "401" | "404"),
            "{path}: {}",
            &answer[..answer.len().min(300)]
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(mock.activities().is_empty(), "no odd path reached the bot");
    still_serving(&router, &mock).await;
}

#[tokio::test]
async fn service_urls_at_private_addresses_are_refused_even_with_a_valid_token() {
    let (mock, router) = start_counting_with_env(&[(
        "TEAMS_ROUTER__CONNECTOR__ALLOWED_SERVICE_HOSTS",
        r#"["botframework.com", "smba.trafficmanager.net", "10.0.0.8"]"#,
    )])
    .await;
    let client = http();
    let key = mock.signing_key();
    for (i, service_url) in [
        "https://169.254.169.254/",
        "https://10.0.0.9/",
        "https://192.168.1.1/",
        "https://[fd00::1]/",
        "https://smba.trafficmanager.net@10.0.0.9/",
        "https://smba.trafficmanager.net.attacker.example/",
        "http://10.0.0.8/",
        "https://metadata.google.internal/",
        "file:///etc/passwd",
        // A hand-split host reads botframework.com; the HTTP client would connect to
        // attacker.example.
        "https://attacker.example\\.botframework.com/",
    ]
    .into_iter()
    .enumerate()
    {
        // The token vouches for exactly this serviceUrl: the refusal is the router's own.
        let token = key.sign(&connector_claims(APP_ID, service_url));
        let mut activity = personal_message(&mock, "a:ssrf", &format!("ssrf-{i}"), "hi");
        activity["serviceUrl"] = json!(service_url);
        let (status, text) = post(
            &client,
            &router.callback_url("teams_prod"),
            Some(&token),
            &activity,
        )
        .await;
        assert_eq!(status, 400, "{service_url}: {text}");
        assert!(
            text.contains("service_url_not_allowed"),
            "{service_url}: {text}"
        );
    }
    // A private host the operator allowed (here one https address) is taken.
    let allowed = "https://10.0.0.8/";
    let token = key.sign(&connector_claims(APP_ID, allowed));
    let mut activity = personal_message(&mock, "a:ssrf", "ssrf-allowed", "hi");
    activity["serviceUrl"] = json!(allowed);
    let (status, text) = post(
        &client,
        &router.callback_url("teams_prod"),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let scrape = metrics(&router).await;
    assert!(rejected(&scrape, "service_url_not_allowed") >= 10.0);
}

#[tokio::test]
async fn a_replayed_token_is_refused_once_it_expired_even_for_a_known_activity() {
    let (mock, router) = start_with_env(&[("TEAMS_ROUTER__MICROSOFT__CLOCK_SKEW_SECS", "0")]).await;
    let client = http();
    let mut claims = connector_claims(APP_ID, &mock.service_url());
    claims["exp"] = json!(now_secs() + 2);
    let token = mock.signing_key().sign(&claims);
    let activity = personal_message(&mock, "a:replay", "r-1", "hi");
    let url = router.callback_url("teams_prod");
    assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    // Cached verified token, still valid: a redelivery is a duplicate.
    assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    for replayed in [
        activity.clone(),
        personal_message(&mock, "a:replay", "r-2", "again"),
    ] {
        let (status, text) = post(&client, &url, Some(&token), &replayed).await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("expired"), "{text}");
    }
    let replies = mock.wait_for_activities(1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.activities().len(), 1, "{replies:?}");
}

#[tokio::test]
async fn http2_rapid_reset_and_flow_control_abuse_leave_the_router_serving() {
    let (mock, router) = start("").await;
    let addr = host_port(&router);
    let uri = format!("http://{addr}/api/v1/integration/teams/teams_dev/callback");

    // Rapid reset (CVE-2023-44487): open streams and cancel them at once, as fast as possible.
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let started = Instant::now();
    let mut opened = 0;
    for _ in 0..20_000 {
        let request = http::Request::post(&uri).body(()).expect("request");
        match client.send_request(request, false) {
            Ok((_response, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
        if client.clone().ready().await.is_err() {
            break;
        }
    }
    // The client is kept: the connection may only end because the router ended it (GOAWAY
    // ENHANCE_YOUR_CALM once too many resets pile up, then close).
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    eprintln!(
        "rapid reset: {opened} streams opened and reset on one connection in {:?}, ended: {ended:?}",
        started.elapsed()
    );
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "the router ends an abusive connection with an error ({opened} streams reset in {:?}): {ended:?}",
        started.elapsed()
    );
    drop(client);
    still_serving(&router, &mock).await;

    // Flow-control abuse: a client that grants no window and never reads, on many streams.
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let stalled = tokio::spawn(connection);
    let mut responses = Vec::new();
    for i in 0..200 {
        let mut client = match client.clone().ready().await {
            Ok(c) => c,
            Err(_) => break,
        };
        let request = http::Request::get(format!(
            "http://{addr}/api/v1/integration/teams/x{i}/callback"
        ))
        .body(())
        .expect("request");
        match client.send_request(request, true) {
            Ok((response, _)) => responses.push(response),
            Err(_) => break,
        }
    }
    eprintln!(
        "flow control: {} streams stalled on a zero window",
        responses.len()
    );
    // The router has answers it cannot send; others must not notice.
    for _ in 0..5 {
        still_serving(&router, &mock).await;
    }
    drop(responses);
    drop(client);
    stalled.abort();
    still_serving(&router, &mock).await;
    let health = http()
        .get(router.ops_url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

/// Issue 15, point 5: the management API can live on its own listener, a wrong key is slowed per
/// client address (429 after `admin.failed_auth_per_minute` failures, while a right key from the
/// same address passes), and the published development key never guards a public listener.
#[tokio::test]
async fn the_management_api_can_be_kept_off_the_traffic_port_and_guessing_keys_is_slowed() {
    let key = "ops-key-of-its-own";
    let (mock, router) = start_counting(&format!(
        "[[accounts]]\nid = \"ops\"\napi_key = \"{key}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\nfailed_auth_per_minute = 3\n"
    ))
    .await;
    let admin = format!("http://{}", router.admin_addr.expect("an admin listener"));
    let client = http();
    let list = |base: &str, key: Option<&str>| {
        let mut request = client.get(format!("{base}/api/v1/bot/list"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    // Not on the traffic listener; there, only activities.
    let on_traffic = list(&router.base_url(), Some(key)).await.unwrap();
    assert_eq!(on_traffic.status().as_u16(), 404);
    let (status, body) = post(
        &client,
        &router.callback_url("teams_dev"),
        None,
        &dev_message(&mock, "adm-1", "1"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        list(&admin, Some(key)).await.unwrap().status().as_u16(),
        200
    );

    for attempt in 0..3 {
        let wrong = if attempt == 0 { None } else { Some("guess") };
        let refused = list(&admin, wrong).await.unwrap();
        assert_eq!(refused.status().as_u16(), 401, "attempt {attempt}");
    }
    let limited = list(&admin, Some("another-guess")).await.unwrap();
    assert_eq!(limited.status().as_u16(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_failed_attempts", "{body}");
    assert!(!body.to_string().contains("another-guess"));
    // The right key from the same address still gets in.
    assert_eq!(
        list(&admin, Some(key)).await.unwrap().status().as_u16(),
        200
    );
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(
            &scrape,
            "teams_router_admin_auth_failures_total{outcome=\"unauthorized\"}"
        ),
        Some(3.0),
        "{scrape}"
    );
    assert_eq!(
        metric_value(
            &scrape,
            "teams_router_admin_auth_failures_total{outcome=\"rate_limited\"}"
        ),
        Some(1.0)
    );

    // The shipped development key on a listener others can reach: a startup error.
    let public = config(
        &mock,
        "[[accounts]]\nid = \"default\"\napi_key = \"dev-api-key-change-me\"\n",
    )
    .replace("development = true\n", "")
    .replace(
        "listen = \"127.0.0.1:0\"\nops",
        "listen = \"0.0.0.0:0\"\nops",
    );
    let refused = teams_router::testkit::TestRouter::start(&public)
        .await
        .err()
        .expect("the development key is refused on 0.0.0.0");
    assert!(refused.contains("development API key"), "{refused}");
    // Behind a loopback admin listener, the same key is fine.
    let private_admin = public.replace(
        "[[accounts]]",
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[accounts]]",
    );
    let mut started = teams_router::testkit::TestRouter::start(&private_admin)
        .await
        .expect("starts with the API on loopback");
    started.terminate(Duration::from_secs(10)).await.unwrap();
}

/// Issue 15 ("Also"): forged traffic is summed up in the event log, once a second, so it cannot
/// push real events out of the bounded log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_requests_are_summed_up_in_the_event_log_not_logged_one_by_one() {
    let key = "event-log-test-key";
    let (mock, router) = start(&format!(
        "[[accounts]]\nid = \"ops\"\napi_key = \"{key}\"\n\n[admin]\nevent_log_size = 20\n"
    ))
    .await;
    let client = http();
    // A real event first: the integration's setup check.
    let setup = client
        .post(format!(
            "{}/api/v1/integration/teams/teams_prod/setup",
            router.base_url()
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(setup.status().as_u16(), 200);
    let forged = personal_message(&mock, "forged", "f", "hello");
    for n in 0..200 {
        let token = if n % 2 == 0 { "not-a-jwt" } else { "a.b.c" };
        let (status, _) = post(
            &client,
            &router.callback_url("teams_prod"),
            Some(token),
            &forged,
        )
        .await;
        assert_eq!(status, 401);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let items = event_list(&router, "teams_prod", key).await;
    assert!(
        items.iter().any(|e| e["type"] == "setup.succeeded"),
        "the real event is still there: {items:#?}"
    );
    let rejected: Vec<&Value> = items
        .iter()
        .filter(|e| e["type"] == "callback.rejected")
        .collect();
    assert!((1..=3).contains(&rejected.len()), "summed up: {items:#?}");
    let total: u64 = rejected
        .iter()
        .map(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 200, "{items:#?}");
}
