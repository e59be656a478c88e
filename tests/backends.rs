//! The webhook backend over real HTTP: a mock bot server written here checks the signature and
//! answers as JSON, NDJSON or SSE, or hangs; the mock Bot Connector records what the user sees.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};
use teams_router::testkit::TestRouter;

const HOOK_SECRET: &str = "webhook-signing-secret";

#[derive(Clone, Default)]
struct Hook {
    received: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    async fn start(&self) -> String {
        let hook = self.clone();
        let addr = serve(move |request| {
            let hook = hook.clone();
            async move { hook.answer(request).await }
        })
        .await;
        format!("http://{addr}/hook")
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (signature, timestamp) = (
            header("x-teams-router-signature"),
            header("x-teams-router-timestamp"),
        );
        let body = request.into_body().collect().await.unwrap().to_bytes();
        // Verified independently of the router's code: HMAC-SHA-256 of "<timestamp>.<body>".
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, HOOK_SECRET.as_bytes());
        let mut signed = format!("{timestamp}.").into_bytes();
        signed.extend_from_slice(&body);
        let tag: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(signature.get(7 + 2 * i..9 + 2 * i).unwrap_or("zz"), 16)
                    .unwrap_or(0)
            })
            .collect();
        if !signature.starts_with("sha256=")
            || aws_lc_rs::hmac::verify(&key, &signed, &tag).is_err()
        {
            return reply(401, "application/json", "{}".into());
        }
        let turn: Value = serde_json::from_slice(&body).unwrap();
        self.received.lock().unwrap().push(turn.clone());
        let text = turn["activity"]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match text.as_str() {
            "ndjson" => reply(
                200,
                "application/x-ndjson",
                "{\"delta\":\"streamed \"}\n{\"delta\":\"as \"}\n\n{\"delta\":\"lines\"}\n".into(),
            ),
            "sse" => reply(
                200,
                "text/event-stream",
                "data: {\"delta\":\"streamed \"}\n\n: a comment\n\ndata: {\"delta\":\"as events\"}\n\ndata: [DONE]\n\n"
                    .into(),
            ),
            "hang" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                reply(200, "application/json", "{\"text\":\"too late\"}".into())
            }
            "broken" => reply(200, "application/json", "{\"text\": ".into()),
            "revise" | "remove" => {
                // Change the bot's last message, known by the id in the session history.
                let last_bot_message = turn["session"]["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .rev()
                    .find(|e| e["role"] == "bot" && e["id"].is_string())
                    .map(|e| e["id"].clone())
                    .unwrap();
                let answer = if text == "revise" {
                    json!({
                        "update": [{"id": last_bot_message, "text": "json: after (revised)"}],
                        "activities": [{"type": "message", "attachments": [{
                            "contentType": "application/vnd.microsoft.card.adaptive",
                            "content": {"type": "AdaptiveCard", "version": "1.5", "body": []}
                        }]}],
                    })
                } else {
                    json!({"delete": [last_bot_message]})
                };
                reply(200, "application/json", answer.to_string())
            }
            // SSO: the bot exchanges the token; "good" ones succeed, others get no answer.
            _ if turn["activity"]["name"] == "signin/tokenExchange" => {
                if turn["activity"]["value"]["token"] == "good" {
                    reply(200, "application/json", json!({"invokeResponse": {"status": 200}}).to_string())
                } else {
                    reply(200, "application/json", "{}".into())
                }
            }
            // An invoke the bot does not handle: an answer without an invokeResponse.
            _ if turn["activity"]["name"] == "task/fetch" => {
                reply(200, "application/json", "{}".into())
            }
            _ if turn["activity"]["type"] == "invoke" => {
                let slow = turn["activity"]["value"]["action"]["data"]["slow"] == true;
                if slow {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                reply(
                    200,
                    "application/json",
                    json!({"invokeResponse": {"status": 200, "body": {"statusCode": 200, "type": "application/vnd.microsoft.activity.message", "value": "from the webhook"}}}).to_string(),
                )
            }
            _ if turn["activity"]["type"] != "message" => {
                reply(200, "application/json", "{}".into())
            }
            _ => {
                let turns = turn["session"]["history"].as_array().map_or(0, Vec::len);
                reply(
                    200,
                    "application/json",
                    json!({"text": format!("json: {text} (history {turns})")}).to_string(),
                )
            }
        }
    }
}

/// Serves `handle` on a free loopback port (HTTP/1.1).
async fn serve<F, Fut>(handle: F) -> std::net::SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A router whose integration `teams_{bot}` (the multi-tenant test app) uses the bot `bot` with
/// `backend` (a TOML inline table); `extra` is more config.
async fn start_with_bot(
    bot: &str,
    backend: &str,
    extra: &str,
) -> (loadtest::mock::MockMicrosoft, TestRouter) {
    let extra = format!(
        "[[bots]]\nid = \"{bot}\"\nbackend = {backend}\n\n[[integrations]]\nid = \"teams_{bot}\"\n\
         botId = \"{bot}\"\nbotFrameworkAppId = \"{APP_ID}\"\nbotFrameworkAppSecret = \"{APP_SECRET}\"\n\n{extra}\n"
    );
    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let router = TestRouter::start(&config(&mock, &extra))
        .await
        .expect("router starts");
    (mock, router)
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_backend_is_signed_and_answers_as_json_ndjson_or_sse() {
    let hook = Hook::default();
    let url = hook.start().await;
    let (mock, router) = start_with_bot(
        "hook",
        &format!(r#"{{ kind = "webhook", url = "{url}", secret = "{HOOK_SECRET}" }}"#),
        "[backend]\nwebhook_timeout_ms = 1500",
    )
    .await;
    let token = mock.token_for(APP_ID);
    let client = http();
    let url = router.callback_url("teams_hook");
    let texts = [
        "first", "second", "ndjson", "sse", "hang", "broken", "after",
    ];
    for (n, text) in texts.iter().enumerate() {
        let activity = personal_message(&mock, "conv-hook", &format!("h{n}"), text);
        let (status, _) = post(&client, &url, Some(&token), &activity).await;
        assert_eq!(status, 200);
    }
    let replies = mock
        .wait_for_activities(texts.len(), Duration::from_secs(20))
        .await;
    let said: Vec<&str> = replies.iter().map(|r| r.text()).collect();
    assert_eq!(
        said,
        [
            "json: first (history 1)",
            "json: second (history 3)",
            "streamed as lines",
            "streamed as events",
            "Sorry, I could not answer that just now. Please try again.",
            "Sorry, I could not answer that just now. Please try again.",
            "json: after (history 13)",
        ],
        "in order, the failures answered with the apology, the conversation alive"
    );
    // A webhook's text goes out as Markdown; its router-made apology too (one message format
    // per bot).
    assert!(replies.iter().all(|r| r.body["textFormat"] == "markdown"));
    let received = hook.received.lock().unwrap().clone();
    assert_eq!(received.len(), texts.len());
    let second = &received[1];
    assert_eq!(second["integrationId"], "teams_hook");
    assert_eq!(second["botId"], "hook");
    assert!(
        second["session"]["id"]
            .as_str()
            .unwrap()
            .starts_with("teams-session-teams_hook-")
    );
    let history: Vec<(&str, &str)> = second["session"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["role"].as_str().unwrap(), e["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        history,
        [
            ("user", "first"),
            ("bot", "json: first (history 1)"),
            ("user", "second")
        ]
    );
    // The activity arrives whole (fields the router does not model included).
    assert_eq!(second["activity"]["id"], "h1");
    assert!(second["activity"]["timestamp"].is_string(), "{second}");
    assert!(second["activity"]["channelData"]["tenant"]["id"].is_string());
    // Attachments are off for this integration.
    assert!(second["activity"].get("attachments").is_none());

    // A webhook answer may update an earlier message, add a card, and delete a message.
    for (n, text) in ["revise", "remove"].iter().enumerate() {
        let activity = personal_message(&mock, "conv-hook", &format!("r{n}"), text);
        assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    }
    let changes = mock
        .wait_for_activities(texts.len() + 3, Duration::from_secs(20))
        .await;
    let changes = &changes[texts.len()..];
    assert_eq!(changes.len(), 3, "{changes:#?}");
    // The answer's activities go first, then its updates.
    assert_eq!(changes[0].method, "POST");
    assert_eq!(
        changes[0].body["attachments"][0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(changes[0].reply_to_id.as_deref(), Some("r0"));
    assert_eq!(changes[1].method, "PUT");
    assert_eq!(changes[1].text(), "json: after (revised)");
    assert_eq!(changes[1].body["conversation"]["id"], "conv-hook");
    let after_id = changes[1].reply_to_id.clone().unwrap();
    // Only answers with text enter the history: "remove" deletes the same message.
    assert_eq!(changes[2].method, "DELETE");
    assert_eq!(changes[2].reply_to_id.as_deref(), Some(after_id.as_str()));
    // No other router of this test process panics a turn, so the shared count is this one's.
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_actor_restarts_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_backend_sends_the_system_prompt_and_history_and_reads_the_stream() {
    let requests_seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let seen = Arc::clone(&requests_seen);
    let addr = serve(move |request: Request<Incoming>| {
        let seen = Arc::clone(&seen);
        async move {
            let path = request.uri().path().to_owned();
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body: Value =
                serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            if path != "/v1/chat/completions" || authorization != "Bearer sk-test-key" {
                return reply(401, "application/json", "{\"error\":{\"message\":\"no\"}}".into());
            }
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push((authorization, body.clone()));
                seen.len()
            };
            // The answer in pieces, as a model streams it; one event split over two lines.
            let chunk = |content: &str| {
                format!(
                    "data: {}\n\n",
                    json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]})
                )
            };
            let sse = format!(
                "{}{}{}data: {}\n\ndata: [DONE]\n\n",
                chunk("Answer"),
                chunk(" number"),
                chunk(&format!(" {n}")),
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            );
            reply(200, "text/event-stream", sse)
        }
    })
    .await;
    let (mock, router) = start_with_bot(
        "model",
        &format!(r#"{{ kind = "openai", baseUrl = "http://{addr}/v1", apiKey = "sk-test-key", model = "test-model", systemPrompt = "You are terse." }}"#),
        "",
    )
    .await;
    let token = mock.token_for(APP_ID);
    let client = http();
    // Each message is answered before the next is sent.
    let say = |texts: &'static [&'static str]| {
        let (client, url, token, mock) = (
            client.clone(),
            router.callback_url("teams_model"),
            token.clone(),
            mock.clone(),
        );
        async move {
            for text in texts {
                let answered = mock.activities().len();
                let activity = personal_message(&mock, "conv-model", &format!("m-{text}"), text);
                let (status, _) = post(&client, &url, Some(&token), &activity).await;
                assert_eq!(status, 200);
                mock.wait_for_activities(answered + 1, Duration::from_secs(10))
                    .await;
            }
        }
    };
    // The chat messages a request to the model carried, as `role: content`.
    let messages = |request: &Value| -> Vec<String> {
        request["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    m["role"].as_str().unwrap(),
                    m["content"].as_str().unwrap()
                )
            })
            .collect()
    };
    say(&["one", "two", "three"]).await;
    let replies = mock.activities();
    let said: Vec<&str> = replies.iter().map(|r| r.text()).collect();
    assert_eq!(
        said,
        ["Answer number 1", "Answer number 2", "Answer number 3"]
    );
    // Models write Markdown: Teams is told so (issue 15, point 11).
    assert!(replies.iter().all(|r| r.body["textFormat"] == "markdown"));
    let requests = requests_seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    let third = &requests[2].1;
    assert_eq!(third["model"], "test-model");
    assert_eq!(third["stream"], true);
    assert_eq!(
        messages(third),
        [
            "system: You are terse.",
            "user: one",
            "assistant: Answer number 1",
            "user: two",
            "assistant: Answer number 2",
            "user: three",
        ]
    );

    // After ///reset the model starts from nothing: the router's confirmation is not a turn.
    say(&["///reset", "four"]).await;
    assert_eq!(mock.activities()[3].text(), "Started a new session.");
    let requests = requests_seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 4, "///reset is answered by the router");
    assert_eq!(
        messages(&requests[3].1),
        ["system: You are terse.", "user: four"],
        "nothing of the old session, not even the reset confirmation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_fixture_reaches_the_webhook_typed_and_in_order_and_invokes_get_its_answer() {
    let hook = Hook::default();
    let url = hook.start().await;
    let (mock, router) = start_with_bot(
        "hook",
        &format!(r#"{{ kind = "webhook", url = "{url}", secret = "{HOOK_SECRET}" }}"#),
        "[conversation]\ninvoke_timeout_ms = 1000",
    )
    .await;
    let token = mock.token_for(APP_ID);
    let client = http();
    let callback = router.callback_url("teams_hook");
    let fixtures = [
        "conversationupdate-channelcreated.json",
        "conversationupdate-membersadded-personal.json",
        "conversationupdate-membersadded-team.json",
        "conversationupdate-membersremoved-team.json",
        "installationupdate-add-team.json",
        "messagereaction-added.json",
        "messagereaction-removed.json",
    ];
    // Every event in one conversation, a message between each: the webhook sees them in order.
    let mut expected = Vec::new();
    for (n, name) in fixtures.iter().enumerate() {
        let mut event = fixture(name);
        event["serviceUrl"] = mock.service_url().into();
        event["conversation"]["id"] = "conv-events".into();
        event["id"] = format!("event-{n}").into();
        let (status, _) = post(&client, &callback, Some(&token), &event).await;
        assert_eq!(status, 200, "{name}");
        expected.push(format!("event-{n}"));
        let message = personal_message(&mock, "conv-events", &format!("msg-{n}"), &format!("m{n}"));
        let (status, _) = post(&client, &callback, Some(&token), &message).await;
        assert_eq!(status, 200);
        expected.push(format!("msg-{n}"));
    }
    mock.wait_for_activities(fixtures.len(), Duration::from_secs(20))
        .await;
    let received = hook.received.lock().unwrap().clone();
    let order: Vec<&str> = received
        .iter()
        .filter_map(|t| t["activity"]["id"].as_str())
        .collect();
    assert_eq!(order, expected, "each once, in order with the messages");
    let types: Vec<(String, String)> = received
        .iter()
        .step_by(2)
        .map(|t| {
            (
                t["event"]["type"].as_str().unwrap_or_default().to_owned(),
                t["event"]["eventType"]
                    .as_str()
                    .or(t["event"]["action"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("conversationUpdate", "channelCreated"),
            ("conversationUpdate", ""),
            ("conversationUpdate", "teamMemberAdded"),
            ("conversationUpdate", "teamMemberRemoved"),
            ("installationUpdate", "add"),
            ("messageReaction", ""),
            ("messageReaction", ""),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    // Events the webhook answers with nothing get no message: only the 7 messages are answered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.activities().len(), fixtures.len());

    // An invoke gets the webhook's InvokeResponse; a slow one gets the deadline answer.
    let mut invoke = fixture("invoke-adaptivecard-action.json");
    invoke["serviceUrl"] = mock.service_url().into();
    invoke["conversation"]["id"] = "conv-invoke".into();
    let (status, body) = post(&client, &callback, Some(&token), &invoke).await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["value"], "from the webhook", "{body}");
    invoke["id"] = "slow-invoke".into();
    invoke["value"]["action"]["data"] = json!({"slow": true});
    let started = std::time::Instant::now();
    let (status, body) = post(&client, &callback, Some(&token), &invoke).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(2500));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["value"]["code"], "Timeout", "{body}");

    // An invoke the bot leaves unanswered gets 501, as the SDKs answer; so does one whose
    // backend fails, and no apology message goes into the chat for it.
    let posted = mock.activities().len();
    let mut unanswered = invoke.clone();
    unanswered["id"] = "task-fetch".into();
    unanswered["name"] = "task/fetch".into();
    unanswered["conversation"]["id"] = "conv-invoke-2".into();
    let (status, body) = post(&client, &callback, Some(&token), &unanswered).await;
    assert_eq!(status, 501, "{body}");
    let mut failing = invoke.clone();
    failing["id"] = "broken-invoke".into();
    failing["text"] = "broken".into();
    failing["conversation"]["id"] = "conv-invoke-2".into();
    let (status, body) = post(&client, &callback, Some(&token), &failing).await;
    assert_eq!(status, 501, "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mock.activities().len(),
        posted,
        "no message for an unanswered or failed invoke"
    );

    // Past the deadline, only a card action gets the error card; any other invoke gets 501.
    let mut slow_query = invoke.clone();
    slow_query["id"] = "slow-query".into();
    slow_query["name"] = "composeExtension/query".into();
    slow_query["conversation"]["id"] = "conv-invoke-3".into();
    let (status, body) = post(&client, &callback, Some(&token), &slow_query).await;
    assert_eq!(status, 501, "{body}");
    assert!(body.is_empty(), "{body}");
}

/// Issue 15, point 8: `signin/tokenExchange` as botbuilder's token-exchange middleware answers it.
/// Teams sends one per signed-in client with the same `value.id`: a failed exchange is 412 with
/// `{id, connectionName, failureDetail}`; once one succeeded, the others get 200 with an empty
/// body and never reach the bot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchanges_are_answered_412_on_failure_and_deduplicated_by_value_id() {
    let hook = Hook::default();
    let url = hook.start().await;
    let (mock, router) = start_with_bot(
        "hook",
        &format!(r#"{{ kind = "webhook", url = "{url}", secret = "{HOOK_SECRET}" }}"#),
        "",
    )
    .await;
    let token = mock.token_for(APP_ID);
    let client = http();
    let callback = router.callback_url("teams_hook");
    let exchange = |activity_id: &str, exchange_id: &str, sso_token: &str| {
        let mut invoke = personal_message(&mock, "conv-sso", activity_id, "");
        invoke["type"] = "invoke".into();
        invoke["name"] = "signin/tokenExchange".into();
        invoke["value"] = json!({"id": exchange_id, "connectionName": "graph", "token": sso_token});
        invoke
    };
    let exchanges_seen = |hook: &Hook| {
        hook.received
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t["activity"]["name"] == "signin/tokenExchange")
            .count()
    };

    // A failed exchange: 412 with what botbuilder sends.
    let (status, body) = post(
        &client,
        &callback,
        Some(&token),
        &exchange("x1", "sso-1", "bad"),
    )
    .await;
    assert_eq!(status, 412, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["id"], "sso-1");
    assert_eq!(body["connectionName"], "graph");
    assert!(body["failureDetail"].is_string(), "{body}");
    // The next client's invoke of the same sign-in is exchanged, and succeeds.
    let (status, body) = post(
        &client,
        &callback,
        Some(&token),
        &exchange("x2", "sso-1", "good"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(exchanges_seen(&hook), 2);
    // Every later client's duplicate: 200, empty, and the bot never sees it.
    for (n, id) in ["x3", "x4"].iter().enumerate() {
        let (status, body) = post(
            &client,
            &callback,
            Some(&token),
            &exchange(id, "sso-1", "good"),
        )
        .await;
        assert_eq!((status, body.as_str()), (200, ""), "duplicate {n}");
    }
    assert_eq!(exchanges_seen(&hook), 2);
    // Another sign-in is its own.
    let (status, _) = post(
        &client,
        &callback,
        Some(&token),
        &exchange("x5", "sso-2", "good"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(exchanges_seen(&hook), 3);
    // No message went into the chat for any of it.
    assert!(
        mock.activities().is_empty(),
        "{:?}",
        mock.activities().len()
    );
}

const ACCOUNT_KEY: &str = "egress-test-key";
const LOOPBACK_ALLOWED: &str = "backend_allow = [\"127.0.0.0/8\"]";

/// Creates a bot through the management API; the status and the body.
async fn create_bot(router: &TestRouter, backend: Value) -> (u16, Value) {
    let response = http()
        .post(format!("{}/api/v1/bot/create", router.base_url()))
        .bearer_auth(ACCOUNT_KEY)
        .json(&json!({ "backend": backend }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Issue 15, point 1: a management API caller cannot point a backend into the router's own
/// network (loopback, metadata, private ranges), not with an address, a name, a redirect, nor a
/// record stored before the policy changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_cannot_reach_internal_addresses() {
    // An internal service whose answer must never reach Teams, and a backend that redirects to it.
    let internal_hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hits = Arc::clone(&internal_hits);
    let internal = serve(move |_request| {
        let hits = Arc::clone(&hits);
        async move {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            reply(200, "text/plain", "INTERNAL-SECRET".into())
        }
    })
    .await;
    let redirector = serve(move |_request| async move {
        let mut response = reply(302, "text/plain", String::new());
        response
            .headers_mut()
            .insert("location", format!("http://{internal}/").parse().unwrap());
        response
    })
    .await;

    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let state = scratch_dir("egress");
    let storage = format!("[storage]\npath = {state:?}\n");
    let account = format!("[[accounts]]\nid = \"ops\"\napi_key = \"{ACCOUNT_KEY}\"\n");

    // The default policy: https to public addresses only.
    let strict = config_with_storage(&mock, &storage, &account).replace(LOOPBACK_ALLOWED, "");
    let mut router = TestRouter::start(&strict).await.expect("router starts");
    for (backend, field) in [
        (
            json!({"kind": "webhook", "url": format!("http://{internal}/")}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": format!("https://{internal}/")}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": "https://169.254.169.254/latest/meta-data/"}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": "https://10.0.0.8/hook"}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": "https://[::ffff:192.168.0.1]/hook"}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": "https://100.64.0.1/hook"}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": format!("https://localhost:{}/", internal.port())}),
            "backend.url",
        ),
        (
            json!({"kind": "webhook", "url": "http://bots.example.com/hook"}),
            "backend.url",
        ),
        (
            json!({"kind": "openai", "baseUrl": "https://[fd00::1]/v1", "model": "m"}),
            "backend.baseUrl",
        ),
    ] {
        let (status, body) = create_bot(&router, backend.clone()).await;
        assert_eq!(status, 400, "{backend} was accepted: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    // A config entry is held to the same policy.
    let seeded = format!(
        "{account}[[bots]]\nid = \"internal\"\nbackend = {{ kind = \"webhook\", url = \"http://{internal}/\" }}\n"
    );
    let refused = TestRouter::start(
        &config_with_storage(&mock, &storage, &seeded).replace(LOOPBACK_ALLOWED, ""),
    )
    .await
    .err()
    .expect("a config bot pointing at loopback is refused");
    assert!(refused.to_string().contains("bot internal"), "{refused}");
    router.terminate(Duration::from_secs(10)).await.unwrap();

    // Loopback allowed: a backend there that redirects is not followed.
    let open = config_with_storage(&mock, &storage, &account);
    let mut router = TestRouter::start(&open).await.expect("router starts");
    let (status, body) = create_bot(
        &router,
        json!({"kind": "webhook", "url": format!("http://{redirector}/")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let redirecting = body["id"].as_str().unwrap().to_owned();
    let (status, body) = create_bot(
        &router,
        json!({"kind": "webhook", "url": format!("http://{internal}/")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let direct = body["id"].as_str().unwrap().to_owned();
    let mut integrations = Vec::new();
    for bot in [&redirecting, &direct] {
        let body: Value = http()
            .post(format!("{}/api/v1/integration/teams/create", router.base_url()))
            .bearer_auth(ACCOUNT_KEY)
            .json(&json!({"botId": bot, "botFrameworkAppId": APP_ID, "botFrameworkAppSecret": APP_SECRET}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        integrations.push(body["id"].as_str().unwrap().to_owned());
    }
    let token = mock.token_for(APP_ID);
    let activity = personal_message(&mock, "conv-redirect", "r1", "hello");
    let (status, _) = post(
        &http(),
        &router.callback_url(&integrations[0]),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let counts = wait_for_replies(&mock, &["r1".into()], Duration::from_secs(20)).await;
    assert_eq!(counts.get("r1"), Some(&1));
    router.terminate(Duration::from_secs(10)).await.unwrap();

    // The policy tightened after the bot was saved: the call is refused, and the log says why.
    let mut router = TestRouter::start(&strict).await.expect("router starts");
    let activity = personal_message(&mock, "conv-direct", "d1", "hello");
    let (status, _) = post(
        &http(),
        &router.callback_url(&integrations[1]),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let counts = wait_for_replies(&mock, &["d1".into()], Duration::from_secs(20)).await;
    assert_eq!(counts.get("d1"), Some(&1));
    let events = event_list(&router, &integrations[1], ACCOUNT_KEY).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "backend.error" && e.to_string().contains("outbound policy")),
        "{events:?}"
    );
    router.terminate(Duration::from_secs(10)).await.unwrap();

    assert_eq!(
        internal_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the internal service was reached"
    );
    for reply in mock.activities() {
        assert!(
            !reply.text().contains("INTERNAL-SECRET"),
            "the internal answer reached Teams"
        );
    }
}

/// Issue 15, point 2: a stored webhook secret is not sent to a new origin. Changing only the path
/// keeps it; changing the host or port drops it unless the same update gives one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_secret_never_follows_its_url_to_another_origin() {
    // Two servers that note whether each request came signed (i.e. with the secret).
    let seen: Arc<Mutex<Vec<(u16, bool)>>> = Arc::default();
    let recorder = |seen: Arc<Mutex<Vec<(u16, bool)>>>, port_label: u16| {
        move |request: Request<Incoming>| {
            let seen = Arc::clone(&seen);
            async move {
                let signed = request.headers().contains_key("x-teams-router-signature");
                seen.lock().unwrap().push((port_label, signed));
                reply(200, "application/json", json!({"text": "ok"}).to_string())
            }
        }
    };
    let first = serve(recorder(Arc::clone(&seen), 1)).await;
    let second = serve(recorder(Arc::clone(&seen), 2)).await;

    let mock = loadtest::mock::MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let account = format!("[[accounts]]\nid = \"ops\"\napi_key = \"{ACCOUNT_KEY}\"\n");
    let mut router = TestRouter::start(&config(&mock, &account))
        .await
        .expect("router starts");
    let (status, body) = create_bot(
        &router,
        json!({"kind": "webhook", "url": format!("http://{first}/hook"), "secret": "s3cret"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let bot = body["id"].as_str().unwrap().to_owned();
    let api = |path: String, body: Value| {
        http()
            .post(format!("{}{path}", router.base_url()))
            .bearer_auth(ACCOUNT_KEY)
            .json(&body)
            .send()
    };
    let created: Value = api(
        "/api/v1/integration/teams/create".into(),
        json!({"botId": bot, "botFrameworkAppId": APP_ID, "botFrameworkAppSecret": APP_SECRET}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let integration = created["id"].as_str().unwrap().to_owned();
    let token = mock.token_for(APP_ID);
    let mut said = 0;
    let mut say = async |router: &TestRouter| {
        said += 1;
        let id = format!("s{said}");
        let activity = personal_message(&mock, "conv-secret", &id, "hello");
        let (status, _) = post(
            &http(),
            &router.callback_url(&integration),
            Some(&token),
            &activity,
        )
        .await;
        assert_eq!(status, 200);
        wait_for_replies(&mock, &[id], Duration::from_secs(20)).await;
    };
    say(&router).await;
    // Same origin, another path: the secret stays.
    let update = |url: String| json!({"backend": {"kind": "webhook", "url": url}});
    let response = api(
        format!("/api/v1/bot/{bot}/update"),
        update(format!("http://{first}/other")),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    say(&router).await;
    // Another port: the secret does not go along.
    let response = api(
        format!("/api/v1/bot/{bot}/update"),
        update(format!("http://{second}/hook")),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    say(&router).await;
    assert_eq!(*seen.lock().unwrap(), [(1, true), (1, true), (2, false)]);
    // The answers' textFormat: markdown for a webhook unless the bot says otherwise.
    assert!(
        mock.activities()
            .iter()
            .all(|r| r.body["textFormat"] == "markdown")
    );
    let response = api(
        format!("/api/v1/bot/{bot}/update"),
        json!({"textFormat": "xml"}),
    )
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    say(&router).await;
    assert_eq!(mock.activities().last().unwrap().body["textFormat"], "xml");
    let response = api(
        format!("/api/v1/bot/{bot}/update"),
        json!({"textFormat": "html"}),
    )
    .await
    .unwrap();
    assert_eq!(
        response.status().as_u16(),
        400,
        "only markdown, plain or xml"
    );
    router.terminate(Duration::from_secs(10)).await.unwrap();
}

/// Issue 15, point 9: a card click is answered within Teams' seconds even while the
/// conversation's message turn waits on a slow backend: invokes run beside the turn order, and
/// still see the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_is_answered_while_a_slow_message_turn_runs() {
    let hook = Hook::default();
    let url = hook.start().await;
    let (mock, router) = start_with_bot(
        "hook",
        &format!(r#"{{ kind = "webhook", url = "{url}", secret = "{HOOK_SECRET}" }}"#),
        "",
    )
    .await;
    let token = mock.token_for(APP_ID);
    let client = http();
    let callback = router.callback_url("teams_hook");
    // The webhook takes 10 s over this message.
    let slow = personal_message(&mock, "conv-beside", "m1", "hang");
    assert_eq!(post(&client, &callback, Some(&token), &slow).await.0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while hook.received.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the message never reached the webhook"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut invoke = fixture("invoke-adaptivecard-action.json");
    invoke["serviceUrl"] = mock.service_url().into();
    invoke["conversation"] = slow["conversation"].clone();
    invoke["from"] = slow["from"].clone();
    invoke["id"] = "click-1".into();
    let started = std::time::Instant::now();
    let (status, body) = post(&client, &callback, Some(&token), &invoke).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["value"], "from the webhook",
        "the bot's own answer, not the deadline's: {body}"
    );
    assert!(
        took < Duration::from_secs(3),
        "answered beside the slow turn: {took:?}"
    );
    // The invoke saw the session, the slow message included.
    let received = hook.received.lock().unwrap().clone();
    let click = received
        .iter()
        .find(|t| t["activity"]["id"] == "click-1")
        .expect("the invoke reached the webhook");
    let history: Vec<&str> = click["session"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(history, ["hang"], "{click}");
}
