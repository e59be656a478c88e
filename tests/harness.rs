//! The harness drives any Bot Framework messaging endpoint (`--target-cmd`/`--target-url`): here
//! its own bare reference endpoint, in process, against the mock Microsoft side.

use std::time::Duration;

use loadtest::harness::{self, Target};
use loadtest::mock::MockMicrosoft;
use loadtest::reference::{self, Settings};
use loadtest::scenario::Scenario;

const APP_ID: &str = "reference-app";
const APP_PASSWORD: &str = "reference-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_drives_the_bare_reference_endpoint_and_it_verifies_what_it_answers() {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_PASSWORD, None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let settings = Settings {
        port,
        app_id: APP_ID.into(),
        app_password: APP_PASSWORD.into(),
        openid_url: mock.openid_metadata_url(),
        token_url: format!("{}/botframework.com/oauth2/v2.0/token", mock.login_url()),
        scope: "https://api.botframework.com/.default".into(),
    };
    let server = tokio::spawn(reference::serve(settings));
    let url = format!("http://127.0.0.1:{port}/api/messages");
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < until, "the endpoint listens");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Unsigned and wrongly signed activities are refused.
    let client = reqwest::Client::new();
    let body = serde_json::json!({"type": "message", "id": "1", "serviceUrl": mock.service_url(),
        "channelId": "msteams", "conversation": {"id": "a:1"}, "text": "hi"});
    let unsigned = client.post(&url).json(&body).send().await.expect("answer");
    assert_eq!(unsigned.status(), 401);
    let other_app = mock.token_for("another-app");
    let forged = client
        .post(&url)
        .bearer_auth(other_app)
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(forged.status(), 401, "a token for another app");

    let mut scenario = Scenario::load("peak").expect("bundled");
    scenario.ramp = None;
    scenario.rate = 100.0;
    scenario.duration_secs = 3.0;
    scenario.drain_secs = 10.0;
    scenario.conversations = 20;
    let target = Target {
        base_url: format!("http://127.0.0.1:{port}"),
        integrations: vec![("endpoint".into(), APP_ID.into())],
        management: None,
        messaging_url: Some(url),
        pid: None,
    };
    let report = harness::run(&scenario, &mock, target, Vec::new(), false)
        .await
        .expect("run");
    server.abort();
    assert!(report.offered >= 250, "{}", report.summary());
    assert_eq!(
        report.statuses.keys().collect::<Vec<_>>(),
        ["200"],
        "{}",
        report.summary()
    );
    assert_eq!(report.lost, 0, "{}", report.summary());
    assert_eq!(
        report.answered,
        report.replies_expected,
        "{}",
        report.summary()
    );
    assert_eq!(report.duplicate_replies, 0, "{}", report.summary());
}
