//! The data path over real loopback HTTP: replies addressed as the SDKs address them, exactly
//! one answer per activity, ordering under load, supervision, connector faults, limits, metrics.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;
use futures_util::StreamExt;
use futures_util::stream;
use loadtest::mock::ConnectorFault;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_signed_personal_message_gets_exactly_one_reply_correctly_addressed() {
    let (mock, router) = start("").await;
    let mut activity = fixture("personal-message.json");
    activity["serviceUrl"] = mock.service_url().into();
    let (status, body) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body, "",
        "non-invoke activities are answered with an empty body"
    );

    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.activities().len(), 1, "exactly one reply");
    let reply = &replies[0];
    let conversation = activity["conversation"]["id"].as_str().unwrap();
    assert_eq!(reply.conversation_id, conversation);
    assert_eq!(reply.reply_to_id.as_deref(), Some("1485983408511"));
    assert!(
        reply.raw_path.starts_with("/amer/v3/conversations/"),
        "regional prefix kept: {}",
        reply.raw_path
    );
    assert_eq!(reply.body["type"], "message");
    assert_eq!(
        reply.body["text"],
        "echo: Hello Teams TestBot.Sending bold-italic rich text"
    );
    assert_eq!(reply.body["replyToId"], "1485983408511");
    assert_eq!(reply.body["from"], activity["recipient"], "from is the bot");
    assert_eq!(
        reply.body["recipient"], activity["from"],
        "recipient is the user"
    );
    assert_eq!(reply.body["conversation"], activity["conversation"]);
    assert!(
        reply
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer mock-access-token-")),
        "the connector token is sent: {:?}",
        reply.authorization
    );
}

#[tokio::test]
async fn a_channel_thread_reply_strips_the_mention_and_encodes_the_conversation_id() {
    let (mock, router) = start("").await;
    let mut activity = fixture("channel-message-mention.json");
    activity["serviceUrl"] = mock.service_url().into();
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies[0].text(), "echo: reply to thread");
    assert_eq!(
        replies[0].conversation_id,
        "19:6848757105754c8981c67612732d9aa7@thread.tacv2;messageid=1759881511856"
    );
    assert!(
        replies[0].raw_path.contains(
            "19%3A6848757105754c8981c67612732d9aa7%40thread.tacv2%3Bmessageid%3D1759881511856"
        ),
        "{}",
        replies[0].raw_path
    );
}

#[tokio::test]
async fn events_without_an_answer_are_accepted_and_counted() {
    let (mock, router) = start_counting("").await;
    let client = http();
    let token = mock.token_for(APP_ID);
    for name in [
        "conversationupdate-membersadded-team.json",
        "conversationupdate-membersremoved-team.json",
        "conversationupdate-channelcreated.json",
        "installationupdate-add-team.json",
        "messagereaction-added.json",
        "messagereaction-removed.json",
    ] {
        let mut activity = fixture(name);
        activity["serviceUrl"] = mock.service_url().into();
        let (status, body) = post(
            &client,
            &router.callback_url("teams_prod"),
            Some(&token),
            &activity,
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(mock.activities().is_empty(), "no replies to events");
    let scrape = metrics(&router).await;
    let received = |t: &str| {
        metric_sum(
            &scrape,
            "teams_router_activities_received_total",
            &["integration=\"teams_prod\"", &format!("type=\"{t}\"")],
        )
    };
    assert_eq!(received("conversationUpdate"), 3.0);
    assert_eq!(received("installationUpdate"), 1.0);
    assert_eq!(received("messageReaction"), 2.0);
}

#[tokio::test]
async fn the_bot_added_to_a_chat_sends_the_configured_welcome() {
    // Set as an environment override, as an operator would override one key.
    let (mock, router) = start_with_env(&[(
        "TEAMS_ROUTER__CONNECTOR__WELCOME_MESSAGE",
        "Hi, I am the echo bot.",
    )])
    .await;
    let mut activity = fixture("conversationupdate-membersadded-personal.json");
    activity["serviceUrl"] = mock.service_url().into();
    activity["recipient"]["id"] = json!("28:f5d48856-5b42-41a0-8c3a-c5f944b679b0");
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies[0].text(), "Hi, I am the echo bot.");
    assert_eq!(
        replies[0].reply_to_id, None,
        "sent into the conversation, not as a reply"
    );
}

#[tokio::test]
async fn an_invoke_is_answered_synchronously_with_the_bots_invoke_response() {
    let (mock, router) = start("").await;
    let mut activity = fixture("invoke-adaptivecard-action.json");
    activity["serviceUrl"] = mock.service_url().into();
    let (status, body) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["statusCode"], 200);
    assert_eq!(body["type"], "application/vnd.microsoft.card.adaptive");
    let card = &body["value"];
    assert_eq!(card["type"], "AdaptiveCard");
    assert_eq!(card["version"], "1.4");
    assert_eq!(
        card["body"][0]["text"],
        "echo: {\"feedback\":\"test invokes\"}"
    );
}

/// An idle conversation's actor listens for its next activity in place, not in its mailbox:
/// the end of an invoke run beside the turn order (a message to the actor) must bring it back to
/// its mailbox at once, not when the conversation next rests.
#[tokio::test]
async fn an_invoke_beside_the_turn_order_ends_its_turn_while_the_conversation_listens() {
    let (mock, router) = start("[conversation]\nrest_after_ms = 60000\n").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    let message = personal_message(&mock, "a:listening", "m-1", "hello");
    assert_eq!(post(&client, &url, Some(&token), &message).await.0, 200);
    mock.wait_for_activities(1, Duration::from_secs(10)).await;
    let turns = |scrape: &str| {
        metric_value(scrape, "teams_router_turn_duration_seconds_count").unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while turns(&metrics(&router).await) < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut invoke = fixture("invoke-adaptivecard-action.json");
    invoke["serviceUrl"] = mock.service_url().into();
    invoke["conversation"] = message["conversation"].clone();
    invoke["from"] = message["from"].clone();
    invoke["id"] = "click-1".into();
    assert_eq!(post(&client, &url, Some(&token), &invoke).await.0, 200);
    // The invoke's turn is finished (and counted) by the actor, once it reads its mailbox.
    let deadline = Instant::now() + Duration::from_secs(5);
    while turns(&metrics(&router).await) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the invoke's turn was not finished within 5 s (the listening actor did not read \
             its mailbox)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_redelivered_invoke_gets_the_original_invoke_response_concurrently_and_later() {
    let (mock, router) = start_counting("").await;
    // A slow connector keeps the turn (and so the original request) busy a while.
    mock.set_connector_latency(Duration::from_millis(300));
    let mut activity = fixture("invoke-adaptivecard-action.json");
    activity["serviceUrl"] = mock.service_url().into();
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    let (original, concurrent) =
        tokio::join!(post(&client, &url, Some(&token), &activity), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            post(&client, &url, Some(&token), &activity).await
        });
    let later = post(&client, &url, Some(&token), &activity).await;
    for (what, (status, body)) in [
        ("original", original),
        ("concurrent", concurrent),
        ("later", later),
    ] {
        assert_eq!(status, 200, "{what}");
        let body: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{what}: not the InvokeResponse ({e}): {body:?}"));
        assert_eq!(
            body["value"]["body"][0]["text"], "echo: {\"feedback\":\"test invokes\"}",
            "{what}"
        );
    }
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_activities_duplicate_total"),
        Some(2.0)
    );
}

#[tokio::test]
async fn a_redelivered_activity_is_answered_once_also_when_concurrent() {
    let (mock, router) = start_counting("").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    let activity = personal_message(&mock, "dedup-1", "1700000000001", "once");
    for _ in 0..3 {
        assert_eq!(post(&client, &url, Some(&token), &activity).await.0, 200);
    }
    let concurrent = personal_message(&mock, "dedup-2", "1700000000002", "once, concurrently");
    let statuses: Vec<u16> = futures_util::future::join_all(
        (0..3).map(|_| post(&client, &url, Some(&token), &concurrent)),
    )
    .await
    .into_iter()
    .map(|(s, _)| s)
    .collect();
    assert_eq!(statuses, vec![200, 200, 200]);
    mock.wait_for_activities(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = mock.activities();
    assert_eq!(
        replies.len(),
        2,
        "{:?}",
        replies
            .iter()
            .map(|r| r.text().to_owned())
            .collect::<Vec<_>>()
    );
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_activities_duplicate_total"),
        Some(4.0)
    );
}

/// 200 × 50 in long mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_conversations_under_concurrency_are_answered_once_each_in_order() {
    let conversations = sized(100, 200);
    let messages = sized(20, 50);
    let (mock, router) = start("").await;
    let client = http();
    let url = Arc::new(router.callback_url("teams_prod"));
    let token = Arc::new(mock.token_for(APP_ID));
    let started = Instant::now();
    // Every conversation sends its messages one after another (each acknowledged before the
    // next), and 64 conversations are in flight at any time.
    let failures: Vec<String> = stream::iter(0..conversations)
        .map(|c| {
            let (client, url, token, mock) = (
                client.clone(),
                Arc::clone(&url),
                Arc::clone(&token),
                mock.clone(),
            );
            async move {
                let mut failures = Vec::new();
                for m in 0..messages {
                    let activity = personal_message(
                        &mock,
                        &format!("load-{c}"),
                        &format!("{c}-{m}"),
                        &format!("m{m}"),
                    );
                    let (status, body) = post(&client, &url, Some(&token), &activity).await;
                    if status != 200 {
                        failures.push(format!("load-{c}/{m}: {status} {body}"));
                    }
                }
                failures
            }
        })
        .buffer_unordered(64)
        .flat_map(stream::iter)
        .collect()
        .await;
    assert!(failures.is_empty(), "{failures:?}");
    let total = conversations * messages;
    let replies = mock
        .wait_for_activities(total, Duration::from_secs(120))
        .await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = if replies.len() >= total {
        mock.activities()
    } else {
        replies
    };
    assert_eq!(replies.len(), total, "every message answered exactly once");
    let mut per_conversation: HashMap<&str, Vec<usize>> = HashMap::new();
    for reply in &replies {
        let n = reply
            .text()
            .trim_start_matches("echo: m")
            .parse()
            .expect("echo of m<n>");
        per_conversation
            .entry(reply.conversation_id.as_str())
            .or_default()
            .push(n);
    }
    assert_eq!(per_conversation.len(), conversations);
    for (conversation, order) in per_conversation {
        assert_eq!(
            order,
            (0..messages).collect::<Vec<_>>(),
            "{conversation} out of order or duplicated"
        );
    }
    eprintln!("{total} activities answered in order in {elapsed:?}");
}

#[tokio::test]
async fn a_panicking_turn_is_restarted_without_losing_queued_activities() {
    let (mock, router) = start_counting("[testing]\npanic_trigger = \"boom\"\n").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    // Slow replies keep the first turn running while the next two activities queue behind it.
    mock.set_connector_latency(Duration::from_millis(400));
    for (id, text) in [("1", "first"), ("2", "boom"), ("3", "after the crash")] {
        let (status, body) = post(
            &client,
            &url,
            Some(&token),
            &personal_message(&mock, "crashy", id, text),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "calm", "1", "unaffected"),
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(3, Duration::from_secs(15)).await;
    let texts = |conversation: &str| -> Vec<String> {
        replies
            .iter()
            .filter(|r| r.conversation_id == conversation)
            .map(|r| r.text().to_owned())
            .collect()
    };
    assert_eq!(
        texts("crashy"),
        vec!["echo: first", "echo: after the crash"]
    );
    assert_eq!(texts("calm"), vec!["echo: unaffected"]);
    mock.set_connector_latency(Duration::ZERO);
    let (status, _) = post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "crashy", "4", "still here"),
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(4, Duration::from_secs(10)).await;
    assert_eq!(
        replies.last().map(|r| r.text().to_owned()).as_deref(),
        Some("echo: still here")
    );
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_actor_restarts_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn connector_throttling_is_retried_after_retry_after() {
    let (mock, router) = start_counting("").await;
    mock.push_connector_faults([ConnectorFault::Throttle {
        retry_after_secs: 1,
    }]);
    let started = Instant::now();
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &personal_message(&mock, "t", "1", "slowly"),
    )
    .await;
    assert_eq!(status, 200);
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    let waited = replies[0].received_at.duration_since(started);
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After honoured: replied after {waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.activities().len(), 1);
    assert_eq!(mock.connector_attempts(), 2);
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_retries_total",
            &["reason=\"throttled\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_requests_total",
            &["op=\"reply\"", "status=\"429\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn ambiguous_5xx_is_retried_and_counted_apart_and_other_4xx_is_not_retried() {
    let (mock, router) = start_counting("").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    mock.push_connector_faults([ConnectorFault::Status(502)]);
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "f", "1", "after a 502"),
    )
    .await;
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies[0].text(), "echo: after a 502");

    mock.push_connector_faults([ConnectorFault::Status(403)]);
    let attempts = mock.connector_attempts();
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "f", "2", "blocked"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(mock.connector_attempts() - attempts, 1, "a 403 is final");
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_retries_total",
            &["reason=\"ambiguous_5xx\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_requests_total",
            &["status=\"403\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_connector_401_refreshes_the_token_once_and_retries() {
    let (mock, router) = start_counting("").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "auth", "1", "first"),
    )
    .await;
    mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(mock.token_requests(), 1, "the outbound token is cached");
    mock.revoke_tokens();
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "auth", "2", "second"),
    )
    .await;
    let replies = mock.wait_for_activities(2, Duration::from_secs(10)).await;
    assert_eq!(replies[1].text(), "echo: second");
    assert_eq!(mock.token_requests(), 2, "one refresh");
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_retries_total",
            &["reason=\"unauthorized\""]
        ),
        1.0
    );
}

#[tokio::test]
async fn single_tenant_apps_ask_their_own_tenant_for_tokens() {
    let (mock, router) = start("").await;
    let token = loadtest::keys::SigningKey::sign(
        &mock.signing_key(),
        &loadtest::keys::connector_claims(SINGLE_APP_ID, &mock.service_url()),
    );
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_single"),
        Some(&token),
        &personal_message(&mock, "st", "1", "tenant"),
    )
    .await;
    assert_eq!(status, 200);
    // The mock only knows this app in its own tenant: a reply proves the authority was right.
    let replies = mock.wait_for_activities(1, Duration::from_secs(10)).await;
    assert_eq!(replies[0].text(), "echo: tenant");
}

#[tokio::test]
async fn bad_requests_get_their_status() {
    let (mock, router) = start("").await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);

    let response = client
        .post(&url)
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert!(response.text().await.unwrap().contains("malformed_json"));

    let mut missing = personal_message(&mock, "x", "1", "x");
    missing["conversation"]
        .as_object_mut()
        .unwrap()
        .remove("id");
    let (status, body) = post(&client, &url, Some(&token), &missing).await;
    assert_eq!(status, 400);
    assert!(body.contains("conversation.id"), "{body}");

    let (status, _) = post(
        &client,
        &router.callback_url("nobody"),
        Some(&token),
        &missing,
    )
    .await;
    assert_eq!(status, 404);

    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);

    // 64 KiB limit: a larger body is refused.
    let mut big = personal_message(&mock, "big", "1", "x");
    big["text"] = json!("a".repeat(70_000));
    let (status, body) = post(&client, &url, Some(&token), &big).await;
    assert_eq!(status, 413, "{body}");
}

#[tokio::test]
async fn an_oversized_body_is_refused_without_reading_it() {
    let (mock, router) = start("").await;
    let token = mock.token_for(APP_ID);
    // Announce 2 GiB and send only the headers: the answer must come without the body.
    let mut socket = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    let request = format!(
        "POST /api/v1/integration/teams/teams_prod/callback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2147483648\r\n\r\n{{\"type\":"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered at once")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // Chunked, with no length announced: stopped once the limit is crossed.
    let body = stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 16 * 1024])));
    let response = http()
        .post(router.callback_url("teams_prod"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    // The router may close the connection before the client finished sending.
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 413);
    }
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&token),
        &personal_message(&mock, "after", "1", "still serving"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_full_mailbox_answers_429_with_retry_after() {
    let (mock, router) = start("[conversation]\nmailbox_capacity = 2\n").await;
    mock.set_connector_latency(Duration::from_millis(500));
    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..6 {
        let response = client
            .post(&url)
            .bearer_auth(&token)
            .json(&personal_message(&mock, "hot", &i.to_string(), "busy"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status().as_u16() == 429 {
            retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    let replies = mock
        .wait_for_activities(accepted, Duration::from_secs(15))
        .await;
    assert_eq!(
        replies.len(),
        accepted,
        "every acknowledged activity is answered"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let (mock, router) = start("").await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .post(router.callback_url("teams_prod"))
        .bearer_auth(mock.token_for(APP_ID))
        .json(&personal_message(&mock, "h2", "1", "over h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        mock.wait_for_activities(1, Duration::from_secs(10)).await[0].text(),
        "echo: over h2"
    );
}

#[tokio::test]
async fn metrics_are_exported_from_the_first_scrape_and_count_traffic() {
    let (mock, router) = start_counting("").await;
    let first = metrics(&router).await;
    for name in [
        "teams_router_activities_received_total",
        "teams_router_activities_rejected_total",
        "teams_router_activities_duplicate_total",
        "teams_router_ingress_duration_seconds",
        "teams_router_turn_duration_seconds",
        "teams_router_first_reply_seconds",
        "teams_router_connector_requests_total",
        "teams_router_connector_retries_total",
        "teams_router_conversations_active",
        "teams_router_actor_restarts_total",
        "teams_router_snapshot_duration_seconds",
        "teams_router_snapshot_failures_total",
    ] {
        assert!(
            first.contains(&format!("# HELP {name} ")),
            "{name} has no HELP in the first scrape"
        );
    }
    assert!(
        first.contains("teams_router_ingress_duration_seconds_bucket{le=\"0.001\"}"),
        "histograms have buckets"
    );

    let client = http();
    let url = router.callback_url("teams_prod");
    let token = mock.token_for(APP_ID);
    for i in 0..5 {
        post(
            &client,
            &url,
            Some(&token),
            &personal_message(&mock, "metrics", &i.to_string(), "hi"),
        )
        .await;
    }
    post(
        &client,
        &url,
        Some(&token),
        &personal_message(&mock, "metrics", "0", "dup"),
    )
    .await;
    post(
        &client,
        &url,
        None,
        &personal_message(&mock, "metrics", "9", "no token"),
    )
    .await;
    mock.wait_for_activities(5, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let scrape = metrics(&router).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_activities_received_total",
            &["integration=\"teams_prod\"", "type=\"message\""]
        ),
        6.0
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_activities_duplicate_total"),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_activities_rejected_total",
            &["reason=\"missing_token\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &scrape,
            "teams_router_connector_requests_total",
            &["op=\"reply\"", "status=\"200\""]
        ),
        5.0
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_ingress_duration_seconds_count"),
        Some(7.0)
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_turn_duration_seconds_count"),
        Some(5.0)
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_first_reply_seconds_count"),
        Some(5.0)
    );
    assert_eq!(
        metric_value(&scrape, "teams_router_conversations_active"),
        Some(1.0)
    );
    assert!(
        !scrape.contains("metrics\""),
        "no conversation id in any label"
    );

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(scrape.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "skipped the promtool check: promtool is not installed ({e}); scripts/test.sh installs it"
            )
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    }
}

#[tokio::test]
async fn sigterm_finishes_running_turns_and_exits_cleanly() {
    let (mock, mut router) = start_process("").await;
    mock.set_connector_latency(Duration::from_millis(300));
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&mock.token_for(APP_ID)),
        &personal_message(&mock, "bye", "1", "last words"),
    )
    .await;
    assert_eq!(status, 200);
    let exit = router.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        mock.activities().len(),
        1,
        "the acknowledged turn finished before exit"
    );
}
