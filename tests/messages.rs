//! What Teams shows is what the bot meant (issue 15, points 12 and 13): answers larger than a
//! Teams message go as several, in order, none over `connector.max_message_bytes`; a throttled
//! streaming update does not end the stream. In a test binary of its own: the stream counters it
//! reads are process-wide.

mod common;

use std::time::{Duration, Instant};

use common::*;
use loadtest::mock::{ConnectorFault, MockMicrosoft, RecordedActivity};
use serde_json::Value;
use teams_router::testkit::TestRouter;

const API_KEY: &str = "messages-test-key";
const LIMIT: usize = 4_000;

/// Bytes of `body` as Teams counts them: the JSON document in UTF-16.
fn utf16_size(body: &Value) -> usize {
    serde_json::to_string(body).unwrap().encode_utf16().count() * 2
}

async fn start(word_delay_ms: u64, interval_ms: u64) -> (MockMicrosoft, TestRouter) {
    let mock = common::mock().await;
    let extra = format!(
        "[[accounts]]\nid = \"ops\"\napi_key = \"{API_KEY}\"\n\n[streaming]\ninterval_ms = {interval_ms}\n{}",
        streaming_bot(word_delay_ms)
    );
    let router = TestRouter::start_with_env(
        &config(&mock, &extra),
        &[(
            "TEAMS_ROUTER__CONNECTOR__MAX_MESSAGE_BYTES",
            &LIMIT.to_string(),
        )],
    )
    .await
    .expect("router starts");
    (mock, router)
}

/// The messages (not stream updates) of `conversation`, in order.
fn of_conversation(mock: &MockMicrosoft, conversation: &str) -> Vec<RecordedActivity> {
    mock.activities()
        .into_iter()
        .filter(|a| a.conversation_id == conversation && a.kind() == "message")
        .collect()
}

/// The streaming updates of `conversation`.
fn updates_of(mock: &MockMicrosoft, conversation: &str) -> Vec<RecordedActivity> {
    mock.activities()
        .into_iter()
        .filter(|a| a.conversation_id == conversation && a.kind() == "typing")
        .collect()
}

async fn wait_for_text(
    mock: &MockMicrosoft,
    conversation: &str,
    expected: &str,
) -> Vec<RecordedActivity> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = of_conversation(mock, conversation);
        let text: String = seen.iter().map(RecordedActivity::text).collect();
        if text == expected || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A long text of paragraphs, each of a few lines.
fn long_text(paragraphs: usize) -> String {
    (0..paragraphs)
        .map(|p| {
            (0..3)
                .map(|l| {
                    format!(
                        "Paragraph {p}, line {l}: the quick brown fox jumps over the lazy dög ✓"
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_larger_than_a_teams_message_goes_as_several_in_order() {
    let (mock, router) = start(1, 100).await;
    let token = mock.token_for(APP_ID);
    let said = long_text(24);
    let expected = format!("echo: {said}");
    assert!(utf16_size(&Value::String(expected.clone())) > 2 * LIMIT);

    // Not streamed: parts cut at paragraph boundaries, each within the limit.
    let activity = personal_message(&mock, "a:long-1", "l1", &said);
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_prod"),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let seen = wait_for_text(&mock, "a:long-1", &expected).await;
    let text: String = seen.iter().map(RecordedActivity::text).collect();
    assert_eq!(text, expected, "nothing lost, in order");
    assert!(seen.len() >= 3, "{}", seen.len());
    for part in &seen {
        assert!(
            utf16_size(&part.body) <= LIMIT,
            "{}",
            utf16_size(&part.body)
        );
        assert_eq!(part.reply_to_id.as_deref(), Some("l1"));
    }
    for part in &seen[..seen.len() - 1] {
        assert!(
            part.text().ends_with("\n\n"),
            "cut at a paragraph: {:?}",
            part.text()
        );
    }
    assert!(
        event_list(&router, "teams_prod", API_KEY)
            .await
            .iter()
            .any(|e| e["type"] == "reply.split"),
        "the split is in the event log"
    );

    // Streamed: the updates stop before the limit, the final message ends the stream with what
    // fits, and the rest follows in new messages.
    let activity = personal_message(&mock, "a:long-2", "l2", &said);
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_stream"),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let seen = wait_for_text(&mock, "a:long-2", &expected).await;
    let text: String = seen.iter().map(RecordedActivity::text).collect();
    assert_eq!(text, expected);
    let finals: Vec<_> = seen.iter().filter(|a| a.stream_info().is_some()).collect();
    assert_eq!(finals.len(), 1, "one final message closes the stream");
    assert!(
        seen[0].stream_info().is_some(),
        "the stream's final message comes first"
    );
    assert!(seen.len() >= 3);
    for part in &seen {
        assert!(utf16_size(&part.body) <= LIMIT);
    }
    let updates = updates_of(&mock, "a:long-2");
    assert!(updates.len() >= 2, "it did stream");
    for update in &updates {
        assert!(
            utf16_size(&update.body) <= LIMIT,
            "{}",
            utf16_size(&update.body)
        );
    }
}

/// Sends `said` into the personal chat `conversation` of the streaming integration and waits
/// until its stream has started (its first update reached the connector).
async fn start_stream(
    mock: &MockMicrosoft,
    router: &TestRouter,
    conversation: &str,
    activity_id: &str,
    said: &str,
) {
    let activity = personal_message(mock, conversation, activity_id, said);
    let token = mock.token_for(APP_ID);
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_stream"),
        Some(&token),
        &activity,
    )
    .await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while updates_of(mock, conversation).is_empty() {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_streaming_update_is_skipped_and_the_stream_goes_on() {
    let (mock, router) = start(60, 150).await;
    let said = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty";
    start_stream(&mock, &router, "a:throttled", "t1", said).await;
    // Once the stream has started, Teams throttles the next request (a streaming update).
    mock.push_connector_faults([ConnectorFault::Throttle {
        retry_after_secs: 1,
    }]);
    let expected = format!("echo: {said}");
    let seen = wait_for_text(&mock, "a:throttled", &expected).await;
    assert_eq!(
        seen.len(),
        1,
        "one message, the stream's final one: {seen:#?}"
    );
    assert!(
        seen[0].stream_info().is_some(),
        "the stream was closed by its final message"
    );
    assert_eq!(
        mock.connector_attempts(),
        mock.activities().len() + 1,
        "one request was answered 429"
    );
    let updates = updates_of(&mock, "a:throttled").len();
    assert!(updates >= 3, "updates went on after the 429: {updates}");

    // An update that fails otherwise stops the updates, but the stream that started is still
    // closed by its final message: no stream left open beside a second message.
    start_stream(&mock, &router, "a:failed-update", "t2", said).await;
    mock.push_connector_faults([ConnectorFault::Status(502)]);
    let seen = wait_for_text(&mock, "a:failed-update", &expected).await;
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(
        seen[0].stream_info().is_some(),
        "closed by its final message"
    );
    let scrape = metrics(&router).await;
    assert_eq!(
        metric_value(&scrape, "teams_router_streams_total{outcome=\"fallback\"}"),
        Some(0.0)
    );
}
