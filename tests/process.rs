//! The process as a user runs it: `check-config`, TLS, connection limits, idle passivation,
//! overload shedding, health endpoints, the README walk-through on the shipped config.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn check_config(config_text: &str, env: &[(&str, &str)]) -> std::process::Output {
    let path = std::env::temp_dir().join(format!(
        "teams-router-check-{}-{}.toml",
        std::process::id(),
        config_text.len()
    ));
    std::fs::write(&path, config_text).unwrap();
    let mut command = std::process::Command::new(binary());
    command.args(["check-config", "--config"]).arg(&path);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    let _ = std::fs::remove_file(&path);
    output
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let text = r#"
[[bots]]
id = "echo"
backend = { kind = "echo" }
[[integrations]]
id = "prod"
botId = "echo"
botFrameworkAppId = "app"
botFrameworkAppSecretEnv = "PROD_SECRET"
tenantId = "tenant-guid"
"#;
    let output = check_config(
        text,
        &[
            ("PROD_SECRET", "very-secret-value"),
            ("TEAMS_ROUTER__SERVER__LISTEN", "127.0.0.1:4321"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("listen = \"127.0.0.1:4321\""),
        "env override applied: {stdout}"
    );
    assert!(
        !stdout.contains("very-secret-value") && !stdout.contains("tenant-guid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("botFrameworkAppSecret = \"***\""),
        "{stdout}"
    );
}

#[test]
fn check_config_exits_2_with_the_reason_on_an_invalid_config() {
    for (text, needle) in [
        ("[server]\nlisten = \"not an address\"\n", "server.listen"),
        ("[server\n", "TOML"),
        (
            "[[integrations]]\nid = \"x\"\nbotId = \"nobody\"\n",
            "names no bot",
        ),
        ("[server]\nlisten_typo = \"127.0.0.1:1\"\n", "unknown field"),
    ] {
        let output = check_config(text, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(stderr.contains(needle), "{text:?}: {stderr}");
    }
}

#[test]
fn the_default_config_is_valid() {
    let output = std::process::Command::new(binary())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("id = \"teams_dev\""), "{stdout}");
}

#[tokio::test]
async fn tls_serves_http2_and_http1_with_the_configured_certificate() {
    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("teams-router-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let config = config(&mock, "").replace(
        "body_limit_bytes = 65536",
        &format!(
            "body_limit_bytes = 65536\ntls_cert = {:?}\ntls_key = {:?}",
            cert_path, key_path
        ),
    );
    let router = loadtest::router::RouterProcess::spawn(&binary(), &config)
        .await
        .unwrap();
    let ca = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap();
    let url = format!(
        "https://localhost:{}/api/v1/integration/teams/teams_prod/callback",
        router.addr.port()
    );
    for (i, http1_only) in [false, true].into_iter().enumerate() {
        let mut builder = reqwest::Client::builder().tls_certs_only([ca.clone()]);
        if http1_only {
            builder = builder.http1_only();
        }
        let client = builder.build().unwrap();
        let response = client
            .post(&url)
            .bearer_auth(mock.token_for(APP_ID))
            .json(&personal_message(&mock, "tls", &i.to_string(), "secure"))
            .send()
            .await
            .unwrap();
        let expected = if http1_only {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status().as_u16(), 200);
    }
    assert_eq!(
        mock.wait_for_activities(2, Duration::from_secs(10))
            .await
            .len(),
        2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let mock = loadtest::mock::MockMicrosoft::start().await;
    let config = config(&mock, "").replace(
        "body_limit_bytes = 65536",
        "body_limit_bytes = 65536\nheader_read_timeout_ms = 300",
    );
    let router = loadtest::router::RouterProcess::spawn(&binary(), &config)
        .await
        .unwrap();
    let mut socket = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    socket
        .write_all(b"POST /api/v1/integration/teams/teams_prod/callback HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
    assert!(read.is_ok(), "the router closed the slow connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after the header timeout"
    );
}

/// In this process with the runtime paused: the 200 ms idle timeout passes in virtual time, so a
/// loaded machine cannot passivate the conversation before the first check. The live count is
/// read from the router itself (the metrics recorder is shared by this process's routers).
#[tokio::test]
async fn idle_conversations_passivate_and_come_back_on_the_next_activity() {
    tokio::time::pause();
    let (mock, router) = start("[conversation]\nidle_timeout_ms = 200\n").await;
    let live = || router.router().map_or(0, |r| r.directory.active());
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "idle", "1", "before"),
    )
    .await;
    mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(live(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(live(), 0, "passivated after its idle timeout");
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "idle", "2", "after"),
    )
    .await;
    let replies = mock.wait_for_activities(2, Duration::from_secs(10)).await;
    assert_eq!(replies[1].text(), "echo: after");
    assert_eq!(live(), 1, "back in memory");
}

#[tokio::test]
async fn too_many_conversations_are_shed_with_503_and_retry_after() {
    let (mock, router) = start("[conversation]\nmax_active = 2\nretry_after_secs = 3\n").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    for c in ["a", "b"] {
        assert_eq!(
            post(
                &client,
                &url,
                Some(&token),
                &personal_message(&mock, c, "1", "x")
            )
            .await
            .0,
            200
        );
    }
    let response = client
        .post(&url)
        .bearer_auth(&token)
        .json(&personal_message(&mock, "c", "1", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers().get("retry-after").unwrap(), "3");
    // Existing conversations keep working.
    assert_eq!(
        post(
            &client,
            &url,
            Some(&token),
            &personal_message(&mock, "a", "2", "x")
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let (_mock, router) = start("").await;
    let client = http();
    let health = client.get(router.ops_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // Signing keys load in the background right after the listener is bound.
    let mut ready = 0;
    for _ in 0..50 {
        ready = client
            .get(router.ops_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200, "ready once keys are loaded");
    let missing = client.get(router.ops_url("/nope")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

#[tokio::test]
async fn routers_sharing_one_data_directory_still_start_unless_durable() {
    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let dir = scratch_dir("shared-data");
    let storage = format!("[storage]\npath = {dir:?}\n");
    let first = loadtest::router::RouterProcess::spawn(
        &binary(),
        &config_with_storage(&mock, &storage, ""),
    )
    .await
    .unwrap();
    // A second process on the same directory keeps its state in a file of its own and serves.
    let second = loadtest::router::RouterProcess::spawn(
        &binary(),
        &config_with_storage(&mock, &storage, ""),
    )
    .await
    .unwrap();
    for router in [&first, &second] {
        let (status, body) = post(
            &http(),
            &router.callback_url("teams_prod"),
            Some(&mock.token_for(APP_ID)),
            &personal_message(&mock, "shared-dir", &router.addr.port().to_string(), "hi"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        second.logs().contains("in use by another process"),
        "{}",
        second.logs()
    );
    // Under durable accept that would break the guarantee: the second process refuses to start.
    let durable = format!("[storage]\npath = {dir:?}\ndurable_accept = true\n");
    let refused = loadtest::router::RouterProcess::spawn(
        &binary(),
        &config_with_storage(&mock, &durable, ""),
    )
    .await;
    let error = refused
        .err()
        .expect("a durable router must not share the file");
    assert!(error.contains("in use by another process"), "{error}");
}

/// The README's "Try it", as a newcomer runs it: the binary on the shipped `config/router.toml`
/// (only its ports and data directory moved aside), an unsigned activity to `teams_dev`, the echo
/// answer at the loopback serviceUrl, the counter on `/metrics`, and `/readyz`.
#[tokio::test]
async fn the_readme_walk_through_works_on_the_shipped_config() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/router.toml"))
            .expect("config/router.toml");
    let data = scratch_dir("walk-through");
    let router = loadtest::router::RouterProcess::spawn_with_env(
        &binary(),
        &shipped,
        &[
            ("TEAMS_ROUTER__SERVER__LISTEN", "127.0.0.1:0"),
            ("TEAMS_ROUTER__SERVER__OPS_LISTEN", "127.0.0.1:0"),
            (
                "TEAMS_ROUTER__STORAGE__PATH",
                data.to_str().expect("utf-8 path"),
            ),
        ],
    )
    .await
    .expect("the router starts on the shipped config");
    // The stand-in for `nc -l 8080`: a Bot Connector that takes unauthenticated requests.
    let connector = loadtest::mock::MockMicrosoft::start().await;
    connector.set_connector_requires_auth(false);
    let client = http();
    let activity = json!({
        "type": "message", "id": "1", "channelId": "msteams",
        "serviceUrl": connector.service_url(),
        "conversation": {"id": "a:dev-chat", "conversationType": "personal"},
        "from": {"id": "29:user", "name": "Ann"}, "recipient": {"id": "28:bot", "name": "Echo"},
        "text": "hello"
    });
    let (status, body) = post(&client, &router.callback_url("teams_dev"), None, &activity).await;
    assert_eq!(status, 200, "{body}");
    let replies = connector
        .wait_for_activities(1, Duration::from_secs(10))
        .await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text(), "echo: hello");
    assert_eq!(replies[0].reply_to_id.as_deref(), Some("1"));
    let scrape = metrics(&router).await;
    assert!(
        metric_sum(
            &scrape,
            "teams_router_activities_received_total",
            &["integration=\"teams_dev\""]
        ) >= 1.0,
        "{scrape}"
    );
    let ready = client.get(router.ops_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}
