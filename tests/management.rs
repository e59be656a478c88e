//! The management API over real HTTP against the router binary, with the embedded store and with
//! a real `redis-server`: bots, Teams integrations (partial update, meta merge, paging, setup
//! checks against the mock token endpoint), live effect on the callback, allowFrom, contacts,
//! event logs, write-only secrets, secrets sealed at rest and master key rotation, hostile
//! bodies, and the OpenAPI document against the live routes.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use loadtest::mock::MockMicrosoft;
use loadtest::redis::RedisServer;
use loadtest::router::RouterProcess;
use serde_json::{Value, json};
use teams_router::testkit::TestRouter;

const ACME_KEY: &str = "acme-api-key-6b1d0c";
const GLOBEX_KEY: &str = "globex-api-key-93fa2e";
const NEW_APP_ID: &str = "33333333-3333-3333-3333-333333333333";
const NEW_APP_SECRET: &str = "new-app-secret-5Rk2q";
const ROTATED_SECRET: &str = "rotated-app-secret-Zx81";
const NEW_TENANT: &str = "tenant-4e2f9c11-write-only";
const WEBHOOK_SECRET: &str = "webhook-hmac-secret-Qp7";
const MODEL_KEY: &str = "sk-model-api-key-Lm3";

enum Storage {
    Embedded,
    Redis(RedisServer),
}

impl Storage {
    fn redis() -> Self {
        Self::Redis(
            RedisServer::start().expect("redis-server starts (apt-get install redis-server)"),
        )
    }

    /// The `[storage]` table; `dir` also holds the master key file.
    fn table(&self, dir: &std::path::Path, prefix: &str) -> String {
        match self {
            Self::Embedded => format!("[storage]\npath = {dir:?}\n"),
            Self::Redis(server) => format!(
                "[storage]\nbackend = \"redis\"\npath = {dir:?}\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
                server.url()
            ),
        }
    }
}

fn accounts() -> String {
    format!(
        r#"
[[accounts]]
id = "acme"
api_key = "{ACME_KEY}"

[[accounts]]
id = "globex"
api_key = "{GLOBEX_KEY}"

[admin]
setup_debounce_ms = 300
"#
    )
}

async fn start_mock() -> MockMicrosoft {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    mock.register_app(SINGLE_APP_ID, SINGLE_APP_SECRET, Some(TENANT));
    mock.register_app(NEW_APP_ID, NEW_APP_SECRET, None);
    mock
}

/// A router in this process.
async fn start_in_process(
    mock: &MockMicrosoft,
    storage: &Storage,
    dir: &std::path::Path,
    prefix: &str,
) -> TestRouter {
    let config = config_with_storage(mock, &storage.table(dir, prefix), &accounts());
    TestRouter::start(&config).await.expect("router starts")
}

/// The binary, with debug logs: the tests that read its log (no secret in it) use this.
async fn spawn(
    mock: &MockMicrosoft,
    storage: &Storage,
    dir: &std::path::Path,
    prefix: &str,
) -> RouterProcess {
    let config = config_with_storage(mock, &storage.table(dir, prefix), &accounts());
    RouterProcess::spawn_with_env(&binary(), &config, &[("RUST_LOG", "debug")])
        .await
        .expect("router starts")
}

/// A management API client that keeps every response body it saw.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
    key: Option<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Api {
    fn new(router: &impl Endpoint, key: &str) -> Self {
        Self {
            client: http(),
            base: router.base_url(),
            key: Some(key.to_owned()),
            seen: Arc::default(),
        }
    }

    fn with_key(&self, key: Option<&str>) -> Self {
        Self {
            key: key.map(str::to_owned),
            ..self.clone()
        }
    }

    async fn send(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut request = match method {
            "GET" => self.client.get(&url),
            _ => self.client.post(&url),
        };
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        self.seen.lock().unwrap().push(text.clone());
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send("GET", path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send("POST", path, Some(&body)).await
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.send(method, path, body.as_ref()).await;
        assert_eq!(status, 200, "{method} {path}: {value}");
        value
    }

    async fn create_echo_bot(&self) -> String {
        let created = self
            .ok(
                "POST",
                "/api/v1/bot/create",
                Some(json!({"name": "Echo", "backend": {"kind": "echo"}})),
            )
            .await;
        created["id"].as_str().expect("id").to_owned()
    }

    async fn fetch_integration(&self, id: &str) -> Value {
        self.ok(
            "GET",
            &format!("/api/v1/integration/teams/{id}/fetch"),
            None,
        )
        .await
    }

    /// Waits until the integration's setup status is no longer pending.
    async fn settled_setup(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let fetched = self.fetch_integration(id).await;
            if fetched["setupStatus"] != "pending" || Instant::now() > deadline {
                return fetched;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The string field `field` of every item of a list answer, in order.
fn item_strings<'a>(list: &'a Value, field: &str) -> Vec<&'a str> {
    list["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|i| i[field].as_str()).collect())
        .unwrap_or_default()
}

fn message_from(
    mock: &MockMicrosoft,
    conversation: &str,
    id: &str,
    user: &str,
    aad: &str,
) -> Value {
    let mut a = personal_message(mock, conversation, id, "hello");
    a["from"]["id"] = user.into();
    a["from"]["aadObjectId"] = aad.into();
    a
}

async fn lifecycle(storage: Storage) {
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt");
    let prefix = format!("mgmt-life-{}", std::process::id());
    let router = spawn(&mock, &storage, &dir, &prefix).await;
    let api = Api::new(&router, ACME_KEY);
    let globex = api.with_key(Some(GLOBEX_KEY));

    // Keys.
    for key in [None, Some("wrong-key"), Some("")] {
        let (status, body) = api.with_key(key).get("/api/v1/bot/list").await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }

    // Bots: echo, webhook and openai, secrets write-only.
    let bot = api.create_echo_bot().await;
    let webhook = api
        .ok("POST", "/api/v1/bot/create", Some(json!({"backend": {"kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret": WEBHOOK_SECRET}})))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let model = api
        .ok("POST", "/api/v1/bot/create", Some(json!({"backend": {"kind": "openai", "baseUrl": "http://127.0.0.1:9/v1", "apiKey": MODEL_KEY, "model": "gpt-test", "systemPrompt": "Be brief."}})))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fetched = api
        .ok("GET", &format!("/api/v1/bot/{model}/fetch"), None)
        .await;
    assert_eq!(fetched["backend"]["model"], "gpt-test");
    assert!(fetched["backend"].get("apiKey").is_none(), "{fetched}");
    api.ok("POST", &format!("/api/v1/bot/{webhook}/update"), Some(json!({"name": "Hook", "backend": {"kind": "webhook", "url": "http://127.0.0.1:9/other"}})))
        .await;
    let fetched = api
        .ok("GET", &format!("/api/v1/bot/{webhook}/fetch"), None)
        .await;
    assert_eq!(
        (fetched["name"].as_str(), fetched["backend"]["url"].as_str()),
        (Some("Hook"), Some("http://127.0.0.1:9/other"))
    );
    let listed = api.ok("GET", "/api/v1/bot/list?order=asc", None).await;
    let ids: Vec<&str> = item_strings(&listed, "id").into_iter().collect();
    // The seeded echo bot belongs to the first account (acme), before the new ones.
    assert_eq!(
        ids,
        ["echo", bot.as_str(), webhook.as_str(), model.as_str()]
    );
    assert_eq!(globex.get(&format!("/api/v1/bot/{bot}/fetch")).await.0, 403);
    assert_eq!(api.get("/api/v1/bot/bot_missing/fetch").await.0, 404);
    let (status, body) = api
        .post(
            "/api/v1/bot/create",
            json!({"backend": {"kind": "webhook", "url": "ftp://x"}}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("backend.url")),
        "{body}"
    );

    // An integration, and its callback at once.
    let (status, body) = api
        .post("/api/v1/integration/teams/create", json!({"name": "x"}))
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("botId")),
        "{body}"
    );
    let globex_bot = globex.create_echo_bot().await;
    let (status, _) = api
        .post(
            "/api/v1/integration/teams/create",
            json!({"botId": globex_bot}),
        )
        .await;
    assert_eq!(status, 403);
    let created = api
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({
                "name": "Helpdesk", "botId": bot, "botFrameworkAppId": NEW_APP_ID,
                "botFrameworkAppSecret": NEW_APP_SECRET, "contactCollection": true,
                "meta": {"region": "us-east", "team": "it"},
            })),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let token = mock.token_for(NEW_APP_ID);
    let client = http();
    let (status, _) = post(
        &client,
        &router.callback_url(&id),
        Some(&token),
        &message_from(&mock, "conv-1", "m1", "29:user-a", "aad-a"),
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].text(), "echo: hello");

    // Automatic setup after create; fetch never shows the write-only fields.
    let fetched = api.settled_setup(&id).await;
    assert_eq!(fetched["setupStatus"], "succeeded", "{fetched}");
    assert!(fetched["setupCheckedAt"].is_string());
    for field in ["botFrameworkAppSecret", "tenantId"] {
        assert!(fetched.get(field).is_none(), "{field} in {fetched}");
    }
    assert_eq!(fetched["sessionDuration"], 86_400_000);
    assert_eq!(
        globex
            .get(&format!("/api/v1/integration/teams/{id}/fetch"))
            .await
            .0,
        403
    );
    assert_eq!(
        api.get("/api/v1/integration/teams/teams_missing/fetch")
            .await
            .0,
        404
    );

    // Partial update: meta merged, the rest unchanged; null clears; bad input names the field.
    api.ok("POST", &format!("/api/v1/integration/teams/{id}/update"), Some(json!({
        "description": "IT support", "meta": {"team": "helpdesk", "tier": 1}, "tenantId": NEW_TENANT, "allowFrom": "29:user-a",
    }))).await;
    let fetched = api.fetch_integration(&id).await;
    assert_eq!(fetched["name"], "Helpdesk");
    assert_eq!(fetched["description"], "IT support");
    assert_eq!(
        fetched["meta"],
        json!({"region": "us-east", "team": "helpdesk", "tier": 1})
    );
    assert_eq!(fetched["allowFrom"], "29:user-a");
    assert_eq!(fetched["contactCollection"], true);
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"tenantId": null, "meta": {"tier": null}})),
    )
    .await;
    assert_eq!(
        api.fetch_integration(&id).await["meta"],
        json!({"region": "us-east", "team": "helpdesk"})
    );
    for (body, field) in [
        (
            json!({"sessionDuration": 2_592_000_001u64}),
            "sessionDuration",
        ),
        (json!({"sessionDuration": "long"}), "sessionDuration"),
        (json!({"stream": "yes"}), "stream"),
        (json!({"colour": "blue"}), "colour"),
        (json!({"botId": "bot_missing"}), "botId"),
        (json!({"meta": [1, 2]}), "meta"),
    ] {
        let (status, error) = api
            .post(
                &format!("/api/v1/integration/teams/{id}/update"),
                body.clone(),
            )
            .await;
        assert_eq!(
            (status, error["error"]["field"].as_str()),
            (400, Some(field)),
            "{body}: {error}"
        );
    }
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"sessionDuration": 2_592_000_000u64})),
    )
    .await;

    // allowFrom applies to the next activity: user-a is answered, user-b is acknowledged only.
    let before = mock.activities().len();
    for (n, user) in ["29:user-b", "29:user-a"].iter().enumerate() {
        let (status, _) = post(
            &client,
            &router.callback_url(&id),
            Some(&token),
            &message_from(
                &mock,
                &format!("conv-allow-{n}"),
                &format!("a{n}"),
                user,
                "aad-x",
            ),
        )
        .await;
        assert_eq!(status, 200);
    }
    // Whatever else user-b causes is left out too: an edit, a deletion, an event.
    for (n, kind) in ["messageUpdate", "messageDelete", "event"]
        .iter()
        .enumerate()
    {
        let mut activity = message_from(
            &mock,
            "conv-allow-0",
            &format!("b{n}"),
            "29:user-b",
            "aad-x",
        );
        activity["type"] = json!(kind);
        let (status, _) = post(&client, &router.callback_url(&id), Some(&token), &activity).await;
        assert_eq!(status, 200);
    }
    let replies = mock
        .wait_for_activities(before + 1, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replies_now = mock.activities();
    assert_eq!(
        replies_now.len(),
        before + 1,
        "only the allowed sender is answered"
    );
    assert_eq!(replies[before].conversation_id, "conv-allow-1");
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_activities_ignored_total",
            &["reason=\"sender_not_allowed\""]
        ),
        4.0,
        "a message, an edit, a deletion and an event of user-b"
    );
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"allowFrom": null})),
    )
    .await;
    assert!(api.fetch_integration(&id).await["allowFrom"].is_null());

    // Contacts: one per user, whatever the number of messages.
    for (n, user) in ["29:user-a", "29:user-c", "29:user-c"].iter().enumerate() {
        post(
            &client,
            &router.callback_url(&id),
            Some(&token),
            &message_from(
                &mock,
                "conv-contacts",
                &format!("c{n}"),
                user,
                &format!("aad-{user}"),
            ),
        )
        .await;
    }
    mock.wait_for_activities(before + 4, Duration::from_secs(10))
        .await;
    let contacts = api
        .ok(
            "GET",
            &format!("/api/v1/contact/list?integrationId={id}&order=asc"),
            None,
        )
        .await;
    let users: Vec<&str> = item_strings(&contacts, "teamsUserId").into_iter().collect();
    assert_eq!(users, ["29:user-a", "29:user-c"], "{contacts}");
    let contact_id = contacts["items"][1]["id"].as_str().unwrap();
    let contact = api
        .ok("GET", &format!("/api/v1/contact/{contact_id}/fetch"), None)
        .await;
    assert_eq!(
        (contact["name"].as_str(), contact["integrationId"].as_str()),
        (Some("Megan Bowen"), Some(id.as_str()))
    );
    assert_eq!(
        globex
            .get(&format!("/api/v1/contact/{contact_id}/fetch"))
            .await
            .0,
        403
    );
    assert_eq!(
        globex.ok("GET", "/api/v1/contact/list", None).await["items"],
        json!([])
    );

    // attachments: off by default (the fixture's attachment never reaches the backend), on at once.
    let answered = mock.activities().len();
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"attachments": true})),
    )
    .await;
    post(
        &client,
        &router.callback_url(&id),
        Some(&token),
        &message_from(&mock, "conv-attach", "at1", "29:user-a", "aad-a"),
    )
    .await;
    let replies = mock
        .wait_for_activities(answered + 1, Duration::from_secs(10))
        .await;
    assert_eq!(replies[answered].text(), "echo: hello [1 attachment]");
    assert!(
        replies[..answered]
            .iter()
            .all(|r| !r.text().contains("attachment"))
    );

    // Membership and installation updates reach the event log.
    let mut installed = fixture("installationupdate-add-team.json");
    installed["serviceUrl"] = mock.service_url().into();
    let (status, _) = post(&client, &router.callback_url(&id), Some(&token), &installed).await;
    assert_eq!(status, 200);

    // Setup: a rotated secret is checked and used for the next outbound token; a bad secret and a
    // wrong tenant are 409 with their reason; quick updates cause one automatic check.
    mock.register_app(NEW_APP_ID, ROTATED_SECRET, None);
    let tokens_before = mock.token_requests();
    for n in 0..3 {
        api.ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/update"),
            Some(json!({"name": format!("Helpdesk {n}"), "botFrameworkAppSecret": ROTATED_SECRET})),
        )
        .await;
    }
    let fetched = api.settled_setup(&id).await;
    assert_eq!(fetched["setupStatus"], "succeeded", "{fetched}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mock.token_requests() - tokens_before,
        1,
        "three quick updates, one check"
    );
    let answered = mock.activities().len();
    post(
        &client,
        &router.callback_url(&id),
        Some(&token),
        &message_from(&mock, "conv-rotated", "r1", "29:user-a", "aad-a"),
    )
    .await;
    let replies = mock
        .wait_for_activities(answered + 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        replies.len(),
        answered + 1,
        "the rotated secret gets the reply's token"
    );
    assert_eq!(
        api.ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/setup"),
            Some(json!({}))
        )
        .await["id"],
        id.as_str()
    );

    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"botFrameworkAppSecret": "not-the-secret"})),
    )
    .await;
    let (status, body) = api
        .post(&format!("/api/v1/integration/teams/{id}/setup"), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("invalid_secret")),
        "{body}"
    );
    let fetched = api.settled_setup(&id).await;
    assert_eq!(
        (
            fetched["setupStatus"].as_str(),
            fetched["setupError"]["code"].as_str()
        ),
        (Some("failed"), Some("invalid_secret")),
        "{fetched}"
    );
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"botFrameworkAppSecret": ROTATED_SECRET, "tenantId": NEW_TENANT})),
    )
    .await;
    let (status, body) = api
        .post(&format!("/api/v1/integration/teams/{id}/setup"), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("wrong_tenant")),
        "{body}"
    );
    let (status, body) = api
        .post(
            &format!("/api/v1/integration/teams/{id}/setup"),
            json!({"force": true}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("force"))
    );
    let dev = api
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({"botId": bot})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = api
        .post(&format!("/api/v1/integration/teams/{dev}/setup"), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("missing_credentials")),
        "{body}"
    );
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/update"),
        Some(json!({"tenantId": null})),
    )
    .await;

    // Events: the log tells what happened, newest first, with paging.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let events = api
        .ok(
            "GET",
            &format!("/api/v1/integration/teams/{id}/event/list?take=500"),
            None,
        )
        .await;
    let kinds: HashSet<&str> = item_strings(&events, "type").into_iter().collect();
    for kind in [
        "integration.created",
        "integration.updated",
        "callback.accepted",
        "callback.ignored",
        "installationUpdate",
        "setup.succeeded",
        "setup.failed",
    ] {
        assert!(kinds.contains(kind), "{kind} missing from {kinds:?}");
    }
    let page = api
        .ok(
            "GET",
            &format!("/api/v1/integration/teams/{id}/event/list?take=2"),
            None,
        )
        .await;
    let seqs: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(seqs.len() == 2 && seqs[0] > seqs[1], "{page}");
    let cursor = page["cursor"].as_str().expect("more pages");
    let next = api
        .ok(
            "GET",
            &format!("/api/v1/integration/teams/{id}/event/list?take=2&cursor={cursor}"),
            None,
        )
        .await;
    assert!(next["items"][0]["seq"].as_u64().unwrap() < seqs[1]);
    let (status, _) = post(
        &client,
        &router.callback_url(&id),
        Some("not-a-token"),
        &message_from(&mock, "c", "bad", "29:user-a", "a"),
    )
    .await;
    assert_eq!(status, 401);

    // Delete: the callback answers 404, the bot stays, the event log stays readable.
    let (status, body) = api
        .post(&format!("/api/v1/bot/{bot}/delete"), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("bot_in_use"))
    );
    assert_eq!(
        globex
            .post(&format!("/api/v1/integration/teams/{id}/delete"), json!({}))
            .await
            .0,
        403
    );
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{id}/delete"),
        None,
    )
    .await;
    let (status, _) = post(
        &client,
        &router.callback_url(&id),
        Some(&token),
        &message_from(&mock, "conv-1", "after-delete", "29:user-a", "a"),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        api.get(&format!("/api/v1/integration/teams/{id}/fetch"))
            .await
            .0,
        404
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let events = api
        .ok(
            "GET",
            &format!("/api/v1/integration/teams/{id}/event/list?take=500"),
            None,
        )
        .await;
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "callback.rejected" && e["reason"] == "malformed_token"),
        "{events}"
    );
    assert_eq!(
        globex
            .get(&format!("/api/v1/integration/teams/{id}/event/list"))
            .await
            .0,
        403
    );
    api.ok(
        "POST",
        &format!("/api/v1/integration/teams/{dev}/delete"),
        None,
    )
    .await;
    api.ok(
        "POST",
        &format!("/api/v1/bot/{bot}/delete"),
        Some(json!({})),
    )
    .await;
    assert_eq!(api.get(&format!("/api/v1/bot/{bot}/fetch")).await.0, 404);

    // The write-only rule: no secret or tenant in any response or log line.
    // `globex` shares `api`'s record of responses.
    let seen = api.seen.lock().unwrap().join("\n");
    let logs = router.logs();
    for secret in [
        NEW_APP_SECRET,
        ROTATED_SECRET,
        "not-the-secret",
        NEW_TENANT,
        WEBHOOK_SECRET,
        MODEL_KEY,
        APP_SECRET,
        SINGLE_APP_SECRET,
        ACME_KEY,
        GLOBEX_KEY,
    ] {
        assert!(!seen.contains(secret), "{secret} in a response");
        assert!(!logs.contains(secret), "{secret} in the log");
    }
    assert!(!metrics(&router).await.contains(NEW_TENANT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_lifecycle_with_the_embedded_store() {
    lifecycle(Storage::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_lifecycle_with_redis() {
    lifecycle(Storage::redis()).await;
}

async fn paging(storage: Storage) {
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt-paging");
    let prefix = format!("mgmt-paging-{}", std::process::id());
    let router = start_in_process(&mock, &storage, &dir, &prefix).await;
    let api = Api::new(&router, ACME_KEY);
    let bot = api.create_echo_bot().await;
    let mut created = Vec::new();
    for chunk in 0..10 {
        let batch = (0..25).map(|n| {
            let api = api.clone();
            let bot = bot.clone();
            let n = chunk * 25 + n;
            async move {
                api.ok("POST", "/api/v1/integration/teams/create", Some(json!({"botId": bot, "name": format!("bulk {n}"), "meta": {"parity": if n % 2 == 0 { "even" } else { "odd" }}}))).await["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        });
        created.extend(futures_util::future::join_all(batch).await);
    }
    let created: HashSet<String> = created.into_iter().collect();
    assert_eq!(created.len(), 250);

    for order in ["asc", "desc"] {
        let mut seen: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut inserted = 0;
        loop {
            let path = format!(
                "/api/v1/integration/teams/list?order={order}&take=40&meta[parity]=odd{}",
                cursor
                    .as_ref()
                    .map(|c| format!("&cursor={c}"))
                    .unwrap_or_default()
            );
            // Another writer adds matching integrations while the listing runs.
            let insert = api.post(
                "/api/v1/integration/teams/create",
                json!({"botId": bot, "meta": {"parity": "odd", "late": true}}),
            );
            let (page, _) = tokio::join!(api.get(&path), insert);
            inserted += 1;
            let (status, page) = page;
            assert_eq!(status, 200, "{page}");
            seen.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
            assert!(inserted < 50, "paging does not end");
        }
        let original: Vec<&Value> = seen
            .iter()
            .filter(|i| created.contains(i["id"].as_str().unwrap()))
            .collect();
        let ids: HashSet<&str> = original.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(original.len(), 125, "{order}: every odd one exactly once");
        assert_eq!(ids.len(), 125);
        assert!(original.iter().all(|i| i["meta"]["parity"] == "odd"));
        let names: Vec<u64> = original
            .iter()
            .map(|i| i["name"].as_str().unwrap()[5..].parse().unwrap())
            .collect();
        let created_at: Vec<&str> = original
            .iter()
            .map(|i| i["createdAt"].as_str().unwrap())
            .collect();
        let mut sorted = created_at.clone();
        sorted.sort();
        if order == "desc" {
            sorted.reverse();
        }
        assert_eq!(created_at, sorted, "{order}: sorted by creation");
        // Creation order within a batch is the server's; batches are strictly ordered.
        let batches: Vec<u64> = names.iter().map(|n| n / 25).collect();
        let mut batches_sorted = batches.clone();
        batches_sorted.sort();
        if order == "desc" {
            batches_sorted.reverse();
        }
        assert_eq!(batches, batches_sorted, "{order}");
    }
    let (status, body) = api.get("/api/v1/integration/teams/list?take=0").await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("take"))
    );
    let big = api
        .ok("GET", "/api/v1/integration/teams/list?take=100000", None)
        .await;
    assert_eq!(
        big["items"].as_array().unwrap().len(),
        100,
        "take is capped"
    );
    let (status, _) = api
        .get("/api/v1/integration/teams/list?cursor=bm90LWEtY3Vyc29y%21")
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paging_across_250_integrations_with_the_embedded_store() {
    paging(Storage::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_paging_across_250_integrations_with_redis() {
    paging(Storage::redis()).await;
}

/// Creates an integration with a secret, restarts the router on the same store, and checks the
/// record survived with a usable secret.
async fn survives_restart(
    storage: &Storage,
    dir: &std::path::Path,
    prefix: &str,
    env: &[(&str, &str)],
    extra: &str,
) -> (MockMicrosoft, RouterProcess, String) {
    let mock = start_mock().await;
    let config = config_with_storage(
        &mock,
        &storage.table(dir, prefix),
        &format!("{}{extra}", accounts()),
    );
    let mut router = RouterProcess::spawn_with_env(&binary(), &config, env)
        .await
        .expect("router starts");
    let api = Api::new(&router, ACME_KEY);
    let bot = api.create_echo_bot().await;
    let id = api
        .ok("POST", "/api/v1/integration/teams/create", Some(json!({"botId": bot, "botFrameworkAppId": NEW_APP_ID, "botFrameworkAppSecret": NEW_APP_SECRET, "meta": {"k": "v"}})))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    api.settled_setup(&id).await;
    // A seeded record changed through the API keeps the change while its config entry is unchanged.
    api.ok(
        "POST",
        "/api/v1/integration/teams/teams_prod/update",
        Some(json!({"name": "renamed"})),
    )
    .await;
    router
        .terminate(Duration::from_secs(10))
        .await
        .expect("router stops");
    let router = RouterProcess::spawn_with_env(&binary(), &config, env)
        .await
        .expect("router restarts");
    let api = Api::new(&router, ACME_KEY);
    let fetched = api.fetch_integration(&id).await;
    assert_eq!(fetched["meta"]["k"], "v");
    assert_eq!(fetched["setupStatus"], "succeeded", "{fetched}");
    assert_eq!(api.fetch_integration("teams_prod").await["name"], "renamed");
    assert_eq!(
        api.ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/setup"),
            None
        )
        .await["id"],
        id.as_str()
    );
    (mock, router, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_restart_with_redis() {
    let storage = Storage::redis();
    let dir = scratch_dir("mgmt-restart-redis");
    let (mock, router, id) = survives_restart(
        &storage,
        &dir,
        &format!("mgmt-restart-{}", std::process::id()),
        &[],
        "",
    )
    .await;
    let (status, _) = post(
        &http(),
        &router.callback_url(&id),
        Some(&mock.token_for(NEW_APP_ID)),
        &message_from(&mock, "c", "m", "29:u", "a"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        mock.wait_for_activities(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_and_the_master_key_rotates() {
    use std::os::unix::fs::PermissionsExt;
    let storage = Storage::Embedded;
    let dir = scratch_dir("mgmt-sealed");
    let (_mock, mut router, id) = survives_restart(&storage, &dir, "", &[], "").await;
    router
        .terminate(Duration::from_secs(10))
        .await
        .expect("router stops");

    // Beside the data directory, not in it.
    let key_file = dir.with_file_name(format!(
        "{}.master.key",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(NEW_APP_SECRET),
            "plaintext secret in the store"
        );
    }

    // Rotation: the new key from the environment, the old one as the previous key.
    let old_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let new_key = "a".repeat(64);
    let mock = start_mock().await;
    let config = config_with_storage(&mock, &storage.table(&dir, ""), &accounts());
    let mut router = RouterProcess::spawn_with_env(
        &binary(),
        &config,
        &[
            ("TEAMS_ROUTER__SECURITY__MASTER_KEY_ENV", "TR_MASTER_KEY"),
            (
                "TEAMS_ROUTER__SECURITY__PREVIOUS_MASTER_KEY_ENV",
                "TR_OLD_MASTER_KEY",
            ),
            ("TR_MASTER_KEY", &new_key),
            ("TR_OLD_MASTER_KEY", &old_key),
        ],
    )
    .await
    .expect("router starts with the rotated key");
    let api = Api::new(&router, ACME_KEY);
    assert_eq!(
        api.ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/setup"),
            None
        )
        .await["id"],
        id.as_str()
    );
    router
        .terminate(Duration::from_secs(10))
        .await
        .expect("router stops");

    // Resealed at that start: the old key is no longer needed.
    let config = config_with_storage(&mock, &storage.table(&dir, ""), &accounts());
    let router = RouterProcess::spawn_with_env(
        &binary(),
        &config,
        &[
            ("TEAMS_ROUTER__SECURITY__MASTER_KEY_ENV", "TR_MASTER_KEY"),
            ("TR_MASTER_KEY", &new_key),
        ],
    )
    .await
    .expect("router starts");
    let api = Api::new(&router, ACME_KEY);
    assert_eq!(
        api.ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/setup"),
            None
        )
        .await["id"],
        id.as_str()
    );
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn hostile_body(rng: &mut Rng, valid: &[Value]) -> Vec<u8> {
    match rng.below(9) {
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut v = serde_json::to_vec(&valid[rng.below(valid.len() as u64) as usize]).unwrap();
            v.truncate(rng.below(v.len() as u64) as usize);
            v
        }
        2 => {
            let depth = 1 + rng.below(5000) as usize;
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        3 => {
            let mut v = valid[rng.below(valid.len() as u64) as usize].clone();
            let keys: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
            if let Some(key) = keys.get(rng.below(keys.len() as u64) as usize) {
                v[key] = [json!(null), json!(-1), json!(1e308), json!("x".repeat(rng.below(60_000) as usize)), json!([]), json!({"a": {"b": [1]}}), json!(true), json!(u64::MAX)][rng.below(8) as usize].clone();
            }
            serde_json::to_vec(&v).unwrap()
        }
        4 => br#"{"botId": "a", "botId": "b"}"#.to_vec(),
        5 => vec![0xff, 0xfe, b'{', b'"', 0xc3, 0x28, b'"', b'}'],
        6 => format!("{{\"name\": \"{}\"}}", "\\u0000".repeat(rng.below(100) as usize)).into_bytes(),
        7 => json!({"meta": (0..rng.below(200)).map(|i| (format!("k{i}"), json!(i))).collect::<serde_json::Map<_, _>>()}).to_string().into_bytes(),
        _ => serde_json::to_vec(&valid[rng.below(valid.len() as u64) as usize]).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_hostile_bodies_get_only_client_errors() {
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt-fuzz");
    let router = start_in_process(&mock, &Storage::Embedded, &dir, "").await;
    let api = Api::new(&router, ACME_KEY);
    let bot = api.create_echo_bot().await;
    let integration = api
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({"botId": bot})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let valid = [
        json!({"botId": bot, "name": "n", "meta": {"a": 1}}),
        json!({"backend": {"kind": "openai", "baseUrl": "http://127.0.0.1:1", "model": "m"}}),
        json!({"sessionDuration": 1000, "allowFrom": "*", "tenantId": null}),
        json!({}),
    ];
    let endpoints = [
        "/api/v1/bot/create".to_owned(),
        format!("/api/v1/bot/{bot}/update"),
        "/api/v1/integration/teams/create".to_owned(),
        format!("/api/v1/integration/teams/{integration}/update"),
        format!("/api/v1/integration/teams/{integration}/setup"),
        "/api/v1/bot/bot_nope/delete".to_owned(),
        "/api/v1/integration/teams/teams_nope/delete".to_owned(),
        "/api/v1/integration/teams/list?take=%ff&order=%00&meta[=1&cursor=%%".to_owned(),
        "/api/v1/contact/list?take=-1".to_owned(),
        "/api/v1/integration/teams/%2e%2e%2f/fetch".to_owned(),
    ];
    let client = http();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // 10,000 in long mode.
    let count = sized(2_000, 10_000);
    let bodies: Vec<(String, Vec<u8>)> = (0..count)
        .map(|n| {
            (
                endpoints[n % endpoints.len()].clone(),
                hostile_body(&mut rng, &valid),
            )
        })
        .collect();
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let base = router.base_url();
    futures_util::stream::iter(bodies)
        .for_each_concurrent(32, |(path, body)| {
            let (client, statuses, base) = (client.clone(), Arc::clone(&statuses), base.clone());
            async move {
                let response = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(ACME_KEY)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("the router answers");
                let status = response.status().as_u16();
                assert!(
                    status < 500,
                    "{status} for {path} with {:?}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                );
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        })
        .await;
    let statuses = statuses.lock().unwrap().clone();
    assert_eq!(statuses.values().sum::<usize>(), count);
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > count / 2,
        "{statuses:?}"
    );
    assert_eq!(api.get("/api/v1/bot/list").await.0, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_live_routes() {
    let mock = start_mock().await;
    let router =
        start_in_process(&mock, &Storage::Embedded, &scratch_dir("mgmt-openapi"), "").await;
    let api = Api::new(&router, ACME_KEY);
    let served = api
        .with_key(None)
        .ok("GET", "/api/v1/openapi.json", None)
        .await;
    let kept: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        served, kept,
        "the served document is the one in the repository"
    );
    assert_eq!(kept["openapi"], "3.1.0");
    let mut documented = HashSet::new();
    for (path, item) in kept["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routes: HashSet<(String, String)> = teams_router::admin::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        documented, routes,
        "every route documented, every documented route served"
    );
    for (method, path) in &routes {
        let concrete = path
            .replace("{botId}", "bot_x")
            .replace("{teamsIntegrationId}", "teams_x")
            .replace("{contactId}", "contact_x");
        let (status, body) = api.send(method, &concrete, Some(&json!({}))).await;
        assert!(
            status != 405 && body["error"]["message"] != "no such route",
            "{method} {path}: {status} {body}"
        );
        let other = if method == "GET" { "POST" } else { "GET" };
        let (status, _) = api.send(other, &concrete, None).await;
        assert_eq!(status, 405, "{other} {path}");
    }
}

/// Schemathesis (PyPI) generates requests from the OpenAPI document; no answer may be a server
/// error. Required when CI=true; skipped with a note where it is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let available = std::process::Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var("CI").is_err(),
            "schemathesis is required in CI (scripts/test.sh installs it)"
        );
        eprintln!("skipped: schemathesis is not installed (scripts/test.sh installs it)");
        return;
    }
    let mock = start_mock().await;
    let router = start_in_process(
        &mock,
        &Storage::Embedded,
        &scratch_dir("mgmt-schemathesis"),
        "",
    )
    .await;
    let api = Api::new(&router, ACME_KEY);
    let bot = api.create_echo_bot().await;
    api.ok(
        "POST",
        "/api/v1/integration/teams/create",
        Some(json!({"botId": bot})),
    )
    .await;
    let base = router.base_url();
    // Schemathesis keeps a cache in its working directory: a scratch one, not the repository.
    let workdir = scratch_dir("schemathesis-run");
    std::fs::create_dir_all(&workdir).expect("scratch directory");
    let output = tokio::process::Command::new("schemathesis")
        .current_dir(&workdir)
        .args([
            "run",
            &format!("{base}/api/v1/openapi.json"),
            "--url",
            &base,
            "--checks",
            "not_a_server_error",
            "--max-examples",
            // 40 in long mode.
            &sized(10, 40).to_string(),
            "--header",
        ])
        .arg(format!("Authorization: Bearer {ACME_KEY}"))
        .output()
        .await
        .expect("schemathesis runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found a problem:\n{report}"
    );
    assert!(!report.contains("Server error"), "{report}");
    assert_eq!(api.get("/api/v1/bot/list").await.0, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_instance_reaches_the_other_with_redis() {
    let storage = Storage::redis();
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt-two-instances");
    let prefix = format!("mgmt-sync-{}", std::process::id());
    let config = config_with_storage(
        &mock,
        &storage.table(&dir, &prefix),
        &format!("{}sync_interval_ms = 200\n", accounts()),
    );
    let start = |instance: &'static str| {
        let config = config.clone();
        async move {
            RouterProcess::spawn_with_env(
                &binary(),
                &config,
                &[("TEAMS_ROUTER__STORAGE__INSTANCE_ID", instance)],
            )
            .await
            .expect("router starts")
        }
    };
    let (a, b) = (start("a").await, start("b").await);
    let api_a = Api::new(&a, ACME_KEY);
    let api_b = Api::new(&b, ACME_KEY);
    let bot = api_a.create_echo_bot().await;
    let id = api_a
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({"botId": bot, "botFrameworkAppId": NEW_APP_ID, "botFrameworkAppSecret": NEW_APP_SECRET})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api_b
        .get(&format!("/api/v1/integration/teams/{id}/fetch"))
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "instance b never saw the integration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = mock.token_for(NEW_APP_ID);
    let (status, _) = post(
        &http(),
        &b.callback_url(&id),
        Some(&token),
        &message_from(&mock, "conv-b", "b1", "29:u", "a"),
    )
    .await;
    assert_eq!(
        status, 200,
        "the other instance's integration answers at once"
    );
    assert_eq!(
        mock.wait_for_activities(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    // A delete on b reaches a.
    api_b
        .ok(
            "POST",
            &format!("/api/v1/integration/teams/{id}/delete"),
            None,
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = post(
            &http(),
            &a.callback_url(&id),
            Some(&token),
            &message_from(&mock, "conv-a", "a1", "29:u", "a"),
        )
        .await;
        if status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance a still serves a deleted integration: {}",
            a.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_outlive_a_redis_that_restarts_empty() {
    let mut storage = Storage::redis();
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt-redis-empty");
    let prefix = format!("mgmt-empty-{}", std::process::id());
    let config = config_with_storage(
        &mock,
        &storage.table(&dir, &prefix),
        &format!("{}sync_interval_ms = 200\n", accounts()),
    );
    let router = RouterProcess::spawn(&binary(), &config)
        .await
        .expect("router starts");
    let api = Api::new(&router, ACME_KEY);
    let bot = api.create_echo_bot().await;
    let id = api
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({"botId": bot, "botFrameworkAppId": NEW_APP_ID, "botFrameworkAppSecret": NEW_APP_SECRET})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    if let Storage::Redis(server) = &mut storage {
        // No persistence: Redis comes back with nothing in it.
        server.resume().expect("redis restarts");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let token = mock.token_for(NEW_APP_ID);
    for (n, integration) in [id.as_str(), "teams_prod"].iter().enumerate() {
        let (status, _) = post(
            &http(),
            &router.callback_url(integration),
            Some(&token_for_integration(&mock, integration, &token)),
            &message_from(&mock, &format!("conv-{n}"), &format!("m{n}"), "29:u", "a"),
        )
        .await;
        assert_eq!(
            status, 200,
            "{integration} still served after Redis lost its data"
        );
    }
    assert_eq!(
        mock.wait_for_activities(2, Duration::from_secs(10))
            .await
            .len(),
        2
    );
    // Written back: a second instance started now finds them in Redis.
    let second = RouterProcess::spawn_with_env(
        &binary(),
        &config,
        &[("TEAMS_ROUTER__STORAGE__INSTANCE_ID", "second")],
    )
    .await
    .expect("second router starts");
    let fetched = Api::new(&second, ACME_KEY).fetch_integration(&id).await;
    assert_eq!(fetched["botId"], bot.as_str());
}

fn token_for_integration(mock: &MockMicrosoft, integration: &str, new_app_token: &str) -> String {
    if integration == "teams_prod" {
        mock.token_for(APP_ID)
    } else {
        new_app_token.to_owned()
    }
}

/// Issue 15, point 6: two routers on one Redis with different master keys. Neither overwrites the
/// other's sealed config secrets, each uses its config's value where it cannot open the stored one
/// (so no wrong secret goes on the wire), an API-created secret that cannot be opened shows on
/// `/readyz` and in a metric, and the mismatch is told at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_with_different_master_keys_on_one_store_never_send_a_wrong_secret() {
    let storage = Storage::redis();
    let mock = start_mock().await;
    let dir = scratch_dir("mgmt-two-keys");
    let prefix = format!("mgmt-keys-{}", std::process::id());
    let config = config_with_storage(
        &mock,
        &storage.table(&dir, &prefix),
        &format!("{}sync_interval_ms = 200\n", accounts()),
    );
    let start = |instance: &'static str, key: String| {
        let config = config.clone();
        async move {
            RouterProcess::spawn_with_env(
                &binary(),
                &config,
                &[
                    ("TEAMS_ROUTER__STORAGE__INSTANCE_ID", instance),
                    ("TEAMS_ROUTER__SECURITY__MASTER_KEY_ENV", "TR_KEY"),
                    ("TR_KEY", &key),
                ],
            )
            .await
            .expect("router starts")
        }
    };
    let a = start("a", "a".repeat(64)).await;
    let api_a = Api::new(&a, ACME_KEY);
    let bot = api_a.create_echo_bot().await;
    let created = api_a
        .ok(
            "POST",
            "/api/v1/integration/teams/create",
            Some(json!({"botId": bot, "botFrameworkAppId": NEW_APP_ID, "botFrameworkAppSecret": NEW_APP_SECRET})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = start("b", "b".repeat(64)).await;
    assert!(
        b.logs().contains("master key is not the one"),
        "the mismatch is told at start: {}",
        b.logs()
    );

    // Both serve the config's integration with the config's secret, also after syncing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let token = mock.token_for(APP_ID);
    for (n, router) in [&a, &b, &a].into_iter().enumerate() {
        let id = format!("k{n}");
        let (status, _) = post(
            &http(),
            &router.callback_url("teams_prod"),
            Some(&token),
            &message_from(&mock, &format!("conv-k{n}"), &id, "29:u", "hello"),
        )
        .await;
        assert_eq!(status, 200);
        let counts =
            wait_for_replies(&mock, std::slice::from_ref(&id), Duration::from_secs(15)).await;
        assert_eq!(
            counts.get(&id),
            Some(&1),
            "router {n}: {}\n{}",
            a.logs(),
            b.logs()
        );
    }

    // b cannot open the App Secret a sealed through the API: not used, and told.
    let ready = http().get(b.ops_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let why: Value = ready.json().await.unwrap();
    assert!(
        why["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("integration/{created}")),
        "{why}"
    );
    let scrape = metrics(&b).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_secrets_unreadable"),
        Some(1.0),
        "{scrape}"
    );
    // The activity b accepts runs where its conversation's partition is held: on a (which opens
    // the secret), or on b, which must not try a secret it cannot open.
    let before = mock.wrong_secret_requests();
    let (status, _) = post(
        &http(),
        &b.callback_url(&created),
        Some(&mock.token_for(NEW_APP_ID)),
        &message_from(&mock, "conv-kx", "kx", "29:u", "hello"),
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mock.wrong_secret_requests(),
        before,
        "no token request with a wrong secret"
    );
    // a is unaffected.
    assert_eq!(
        http()
            .get(a.ops_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}
