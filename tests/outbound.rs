//! What users see in Teams, checked at the mock Bot Connector: streamed answers in personal
//! chats (informative update, cumulative streaming updates, final message), typing + one message
//! elsewhere, the fallback when Teams refuses a stream, bursts paced within Teams' documented
//! rate limits (the mock enforces them), and proactive messages.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use loadtest::mock::{ConnectorFault, MockMicrosoft, RecordedActivity};
use loadtest::router::RouterProcess;
use serde_json::{Value, json};
use teams_router::testkit::TestRouter;

const API_KEY: &str = "outbound-test-api-key";

fn stream_bots() -> String {
    format!(
        r#"
[[accounts]]
id = "ops"
api_key = "{API_KEY}"
{}"#,
        streaming_bot(120)
    )
}

/// A router in this process with the streaming bots. Only the streaming test streams, so the
/// process-wide `streams_total` it asserts counts its own streams.
async fn start_streaming() -> (MockMicrosoft, TestRouter) {
    let mock = common::mock().await;
    let router = TestRouter::start(&config(&mock, &stream_bots()))
        .await
        .expect("router starts");
    (mock, router)
}

fn of_conversation(activities: &[RecordedActivity], conversation: &str) -> Vec<RecordedActivity> {
    activities
        .iter()
        .filter(|a| a.conversation_id == conversation)
        .cloned()
        .collect()
}

async fn wait_until<F: Fn(&MockMicrosoft) -> bool>(
    mock: &MockMicrosoft,
    timeout: Duration,
    done: F,
) {
    let deadline = Instant::now() + timeout;
    while !done(mock) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_final(mock: &MockMicrosoft, conversation: &str) -> bool {
    of_conversation(&mock.activities(), conversation)
        .iter()
        .any(|a| a.kind() == "message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_into_personal_chats_and_come_as_one_message_elsewhere() {
    let (mock, router) = start_streaming().await;
    let client = http();
    let token = mock.token_for(APP_ID);
    let url = router.callback_url("teams_stream");
    let words: Vec<String> = (1..=24).map(|i| format!("w{i}")).collect();
    let said = words.join(" ");

    // A personal chat: informative → streaming updates → final.
    let activity = personal_message(&mock, "a:stream-1", "s1", &said);
    assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    wait_until(&mock, Duration::from_secs(30), |m| {
        has_final(m, "a:stream-1")
    })
    .await;
    let seen = of_conversation(&mock.activities(), "a:stream-1");
    assert!(seen.len() >= 3, "informative, updates and final: {seen:#?}");
    let first = &seen[0];
    let info = first
        .stream_info()
        .expect("the first update carries streaminfo");
    assert_eq!(first.kind(), "typing");
    assert_eq!(info["streamType"], "informative");
    assert_eq!(info["streamSequence"], 1);
    assert!(info.get("streamId").is_none());
    assert!(!first.text().is_empty());
    let last = seen.last().unwrap();
    assert_eq!(last.kind(), "message");
    let final_info = last
        .stream_info()
        .expect("the final message carries streaminfo");
    assert_eq!(final_info["streamType"], "final");
    assert!(final_info.get("streamSequence").is_none());
    assert_eq!(last.text(), format!("echo: {said}"));
    assert_eq!(last.body["channelData"]["streamType"], "final");
    let stream_id = final_info["streamId"]
        .as_str()
        .expect("stream id")
        .to_owned();
    let updates = &seen[1..seen.len() - 1];
    assert!(!updates.is_empty(), "at least one streaming update");
    let mut previous_text = String::new();
    let mut previous_sequence = 1;
    for update in updates {
        let info = update.stream_info().expect("streaminfo");
        assert_eq!(update.kind(), "typing");
        assert_eq!(info["streamType"], "streaming");
        // The id Teams gave the first update (the mock checks it is the stream it opened).
        assert_eq!(info["streamId"], stream_id.as_str());
        assert_eq!(update.body["channelData"]["streamId"], stream_id.as_str());
        let sequence = info["streamSequence"].as_u64().unwrap();
        assert!(sequence > previous_sequence, "sequence increases");
        previous_sequence = sequence;
        assert!(
            update.text().starts_with(&previous_text) && update.text().len() > previous_text.len(),
            "cumulative text: {:?} after {previous_text:?}",
            update.text()
        );
        previous_text = update.text().to_owned();
    }
    // Never more than one update a second (Teams asks for 1.5 to 2 s of buffering).
    let stream_updates: Vec<&RecordedActivity> = seen[..seen.len() - 1].iter().collect();
    for pair in stream_updates.windows(2) {
        let gap = pair[1].received_at - pair[0].received_at;
        assert!(gap >= Duration::from_millis(1_000), "updates {gap:?} apart");
    }
    assert!(
        mock.typing()
            .iter()
            .all(|t| t.conversation_id != "a:stream-1"),
        "no plain typing inside a stream"
    );

    // A channel: typing, then one message, no stream.
    let mut channel = fixture("channel-message-mention.json");
    channel["serviceUrl"] = mock.service_url().into();
    channel["id"] = "c1".into();
    channel["text"] = format!("<at>Bot</at> {said}").into();
    let channel_conversation = channel["conversation"]["id"].as_str().unwrap().to_owned();
    assert_eq!(post(&client, &url, Some(&token), &channel).await.0, 200);
    wait_until(&mock, Duration::from_secs(30), |m| {
        has_final(m, &channel_conversation)
    })
    .await;
    let seen = of_conversation(&mock.activities(), &channel_conversation);
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].stream_info().is_none());
    assert!(seen[0].text().ends_with(&said));
    let typing: Vec<_> = mock
        .typing()
        .into_iter()
        .filter(|t| t.conversation_id == channel_conversation)
        .collect();
    assert!(
        !typing.is_empty(),
        "a typing indicator while the user waits"
    );
    assert!(typing[0].received_at < seen[0].received_at);

    // Teams refuses the stream: the user still gets one message.
    mock.refuse_streams(Some((
        403,
        "ContentStreamNotAllowed",
        "Content stream is not allowed",
    )));
    let activity = personal_message(&mock, "a:stream-2", "s2", "refused stream please");
    assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    wait_until(&mock, Duration::from_secs(30), |m| {
        has_final(m, "a:stream-2")
    })
    .await;
    let seen = of_conversation(&mock.activities(), "a:stream-2");
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(seen[0].kind(), "message");
    assert!(seen[0].stream_info().is_none());
    assert_eq!(seen[0].text(), "echo: refused stream please");
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_streams_total{outcome=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_streams_total{outcome=\"fallback\"}"),
        Some(1.0)
    );
    // The fallback is in the integration's event log.
    let events: Value = client
        .get(format!(
            "{}/api/v1/integration/teams/teams_stream/event/list?take=100",
            router.base_url()
        ))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "stream.fallback"),
        "{events:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proactive_messages_reach_known_conversations_new_personal_chats_and_channels() {
    let (mock, router) = start_streaming().await;
    let client = http();
    let token = mock.token_for(APP_ID);
    let callback = router.callback_url("teams_prod");
    let send = |body: Value| {
        let client = client.clone();
        let url = format!(
            "{}/api/v1/integration/teams/teams_prod/message",
            router.base_url()
        );
        async move {
            let response = client
                .post(url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    // Nothing seen yet: the router cannot address anything.
    let (status, body) = send(json!({"conversationId": "a:never", "text": "hi"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "conversation_unknown");
    let (status, body) = send(json!({"userId": "29:x", "channelId": "19:y", "text": "hi"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = send(json!({"conversationId": "a:never"})).await;
    assert_eq!(status, 400, "a message needs text");

    // Traffic teaches the router a personal chat, a team channel and the tenant.
    let personal = personal_message(&mock, "a:known-1", "k1", "hello");
    assert_eq!(
        post(&client, &callback, Some(&token), &personal).await.0,
        200
    );
    let mut channel = fixture("channel-message-mention.json");
    channel["serviceUrl"] = mock.service_url().into();
    assert_eq!(
        post(&client, &callback, Some(&token), &channel).await.0,
        200
    );
    mock.wait_for_activities(2, Duration::from_secs(10)).await;
    let tenant = personal["conversation"]["tenantId"]
        .as_str()
        .or_else(|| personal["channelData"]["tenant"]["id"].as_str())
        .unwrap()
        .to_owned();
    let user = personal["from"]["id"].as_str().unwrap().to_owned();
    let channel_id = channel["channelData"]["channel"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 1. Into the known conversation.
    let (status, body) =
        send(json!({"conversationId": "a:known-1", "text": "build finished"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["conversationId"], "a:known-1");
    // 2. By user id: their personal chat is known.
    let (status, body) = send(json!({"userId": user, "text": "by user"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["conversationId"], "a:known-1");
    // 3. A user never seen: a new personal conversation is created in the tenant. The create is
    // get-or-create, so an ambiguous 502 is retried.
    mock.push_connector_faults([ConnectorFault::Status(502)]);
    let (status, body) =
        send(json!({"userId": "29:new-user", "tenantId": tenant, "text": "welcome aboard"})).await;
    assert_eq!(status, 200, "{body}");
    let created_chat = body["conversationId"].as_str().unwrap().to_owned();
    // 4. A new thread in the team channel. Its create posts the first message: after an
    // ambiguous 502 it is not retried (it may have been posted) and the send fails clearly.
    mock.push_connector_faults([ConnectorFault::Status(502)]);
    let (status, body) = send(json!({"channelId": channel_id, "text": "new release thread"})).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not retried")),
        "{body}"
    );
    let (status, body) = send(json!({"channelId": channel_id, "text": "new release thread"})).await;
    assert_eq!(status, 200, "{body}");
    let thread = body["conversationId"].as_str().unwrap().to_owned();
    assert!(body["activityId"].is_string(), "{body}");

    let all = mock.wait_for_activities(6, Duration::from_secs(10)).await;
    let texts = |conversation: &str| -> Vec<String> {
        of_conversation(&all, conversation)
            .iter()
            .map(|a| a.text().to_owned())
            .collect()
    };
    assert_eq!(
        texts("a:known-1"),
        ["echo: hello", "build finished", "by user"]
    );
    assert_eq!(texts(&created_chat), ["welcome aboard"]);
    assert_eq!(texts(&thread), ["new release thread"]);
    for activity in all
        .iter()
        .filter(|a| a.text() == "build finished" || a.text() == "by user")
    {
        // Addressed as the bot, into the conversation, sent (not a reply), authenticated.
        assert_eq!(activity.method, "POST");
        assert_eq!(activity.reply_to_id, None);
        assert_eq!(activity.body["from"]["id"], personal["recipient"]["id"]);
        assert_eq!(activity.body["conversation"]["id"], "a:known-1");
        assert!(
            activity
                .authorization
                .as_deref()
                .unwrap_or("")
                .starts_with("Bearer ")
        );
    }
    let created = mock.created_conversations();
    assert_eq!(created.len(), 2, "{created:#?}");
    let chat = created.iter().find(|c| c.id == created_chat).unwrap();
    assert_eq!(chat.parameters["isGroup"], false);
    assert_eq!(chat.parameters["members"][0]["id"], "29:new-user");
    assert_eq!(
        chat.parameters["channelData"]["tenant"]["id"],
        tenant.as_str()
    );
    assert_eq!(chat.parameters["bot"]["id"], personal["recipient"]["id"]);
    let thread_params = &created.iter().find(|c| c.id == thread).unwrap().parameters;
    assert_eq!(thread_params["isGroup"], true);
    assert_eq!(
        thread_params["channelData"]["channel"]["id"],
        channel_id.as_str()
    );
    assert_eq!(thread_params["activity"]["text"], "new release thread");

    // The created chat is known from now on, by user.
    let (status, body) = send(json!({"userId": "29:new-user", "text": "again"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["conversationId"], created_chat.as_str());
    assert_eq!(
        mock.created_conversations().len(),
        2,
        "no second conversation"
    );
}

/// Sends `messages` into each conversation in order (one task per conversation).
async fn send_in_order(url: String, token: String, conversations: Vec<(String, Vec<Value>)>) {
    let client = http();
    let mut tasks = Vec::new();
    for (_, activities) in conversations {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            for activity in activities {
                let (status, body) = post(&client, &url, Some(&token), &activity).await;
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Teams' documented limits, enforced by the mock, with the router's defaults. In long mode
/// 500 messages in one conversation and 5,000 across 50, against the binary in real time (about
/// four minutes); by default 200 and 500 across 10, against a router in this process with the
/// runtime paused, so the pacing windows pass in virtual time.
#[tokio::test]
async fn bursts_are_paced_within_teams_limits_and_every_message_is_answered_once_in_order() {
    let (in_one, conversations, in_each) = if long_mode() {
        (500, 50, 100)
    } else {
        tokio::time::pause();
        (200, 10, 50)
    };
    let total = in_one + conversations * in_each;
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    mock.register_app(SINGLE_APP_ID, SINGLE_APP_SECRET, Some(TENANT));
    mock.enforce_teams_limits(true);
    // Teams' documented limits are the router's defaults: drop the test suite's raised ones.
    let config = config(&mock, "[conversation]\nmailbox_capacity = 1000\n")
        .replace("conversation_limits = [[1000, 100000]]\n", "")
        .replace("app_limits = [[1000, 1000000]]\n", "");
    let router: Box<dyn Endpoint> = if long_mode() {
        Box::new(
            RouterProcess::spawn(&binary(), &config)
                .await
                .expect("router starts"),
        )
    } else {
        Box::new(TestRouter::start(&config).await.expect("router starts"))
    };
    let started = Instant::now();

    // Messages in one conversation of one bot ...
    let one: Vec<Value> = (0..in_one)
        .map(|i| personal_message(&mock, "a:burst-one", &format!("b{i}"), &format!("m{i}")))
        .collect();
    // ... and many across conversations of another bot (single-tenant: its tenant).
    let many: Vec<(String, Vec<Value>)> = (0..conversations)
        .map(|c| {
            let conversation = format!("a:burst-{c}");
            let activities = (0..in_each)
                .map(|i| {
                    let mut a = personal_message(
                        &mock,
                        &conversation,
                        &format!("{c}-{i}"),
                        &format!("m{i}"),
                    );
                    a["conversation"]["tenantId"] = TENANT.into();
                    a["channelData"]["tenant"]["id"] = TENANT.into();
                    a
                })
                .collect();
            (conversation, activities)
        })
        .collect();
    let senders = tokio::spawn(send_in_order(
        router.callback_url("teams_prod"),
        mock.token_for(APP_ID),
        vec![("a:burst-one".into(), one)],
    ));
    let many_senders = tokio::spawn(send_in_order(
        router.callback_url("teams_single"),
        mock.token_for(SINGLE_APP_ID),
        many,
    ));
    senders.await.unwrap();
    many_senders.await.unwrap();

    // The queue waiting for the limits is visible while it drains.
    let mut deepest = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while mock.activities().len() < total && Instant::now() < deadline {
        let scrape = metrics(&*router).await;
        deepest =
            deepest.max(metric_value(&scrape, "teams_router_connector_queue_depth").unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all = mock.activities();
    let elapsed = started.elapsed();
    eprintln!(
        "{total} replies in {elapsed:?}; deepest outbound queue {deepest}; 429s {}",
        mock.throttled()
    );
    assert_eq!(mock.throttled(), 0, "no request over Teams' limits");
    assert_eq!(all.len(), total);
    let mut by_conversation: HashMap<String, Vec<String>> = HashMap::new();
    for activity in &all {
        by_conversation
            .entry(activity.conversation_id.clone())
            .or_default()
            .push(activity.text().to_owned());
    }
    let expected = |n: usize| -> Vec<String> { (0..n).map(|i| format!("echo: m{i}")).collect() };
    assert_eq!(by_conversation["a:burst-one"], expected(in_one));
    for c in 0..conversations {
        assert_eq!(
            by_conversation[&format!("a:burst-{c}")],
            expected(in_each),
            "conversation {c}"
        );
    }
    assert!(deepest >= 1.0, "sends waited for the limits");
    // No other test of this process sends over Teams' limits, so the shared count is this one's.
    let scrape = metrics(&*router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_retries_total",
            &["reason=\"throttled\""]
        ),
        0.0
    );
}

/// Router CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// The router's own time per turn, streamed or not (BENCHMARKS.md): the CPU the router process
/// spends per answered message with the echo backend (no backend wait) and a mock connector on
/// loopback, so what is counted is the router's work, not backend or connector latency.
/// `cargo test --release --test outbound streamed_turn_overhead -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement for BENCHMARKS.md"]
async fn streamed_turn_overhead() {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let extra = format!(
        "[[integrations]]\nid = \"teams_streamed\"\nbotId = \"echo\"\nbotFrameworkAppId = \"{APP_ID}\"\nbotFrameworkAppSecret = \"{APP_SECRET}\"\nstream = true\n\n[conversation]\nmailbox_capacity = 1000\n"
    );
    let router = RouterProcess::spawn(&binary(), &config(&mock, &extra))
        .await
        .expect("router starts");
    let pid = router.pid().expect("pid");
    let token = mock.token_for(APP_ID);
    let (conversations, per_conversation) = (50, 40);
    let mut expected = 0;
    for (integration, label) in [("teams_prod", "plain"), ("teams_streamed", "streamed")] {
        // Warm up (connections, token, actors), then measure.
        for round in ["warm", "measured"] {
            let batch: Vec<(String, Vec<Value>)> = (0..conversations)
                .map(|c| {
                    let conversation = format!("a:{label}-{round}-{c}");
                    let activities = (0..per_conversation)
                        .map(|i| {
                            personal_message(
                                &mock,
                                &conversation,
                                &format!("{c}-{i}"),
                                &format!("m{i}"),
                            )
                        })
                        .collect();
                    (conversation, activities)
                })
                .collect();
            let turns = conversations * per_conversation;
            let connector_before = mock.connector_attempts();
            let cpu_before = cpu_time(pid);
            let started = Instant::now();
            send_in_order(router.callback_url(integration), token.clone(), batch).await;
            expected += turns;
            // Each answer ends with one message activity.
            let deadline = Instant::now() + Duration::from_secs(120);
            while mock
                .activities()
                .iter()
                .filter(|a| a.kind() == "message")
                .count()
                < expected
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let wall = started.elapsed();
            let cpu = cpu_time(pid) - cpu_before;
            let requests = mock.connector_attempts() - connector_before;
            if round == "measured" {
                eprintln!(
                    "{label}: {turns} turns in {wall:?} ({:.0} turns/s), router CPU {:.1} us per turn, {:.2} connector requests per turn",
                    turns as f64 / wall.as_secs_f64(),
                    cpu.as_secs_f64() * 1e6 / turns as f64,
                    requests as f64 / turns as f64,
                );
            }
        }
    }
}
