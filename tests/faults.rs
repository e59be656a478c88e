//! Faults of the router's neighbours, injected under traffic: the Bot Connector failing or hanging,
//! Microsoft's OpenID metadata down past the key cache, Redis stalled (`CLIENT PAUSE`), the disk of the embedded
//! store full, and the router killed in the middle of a streamed answer. Each is survived with
//! nothing acknowledged lost. (Redis killed, a backend hanging, and kill -9 mid-burst are in
//! `tests/state.rs` and `tests/backends.rs`.)
//!
//! `TEAMS_ROUTER_LONG=1` (`bash .ci/run --long`) runs the outages for their full length (a
//! minute); the default is a shorter outage of the same shape.

mod common;

use std::time::{Duration, Instant};

use common::*;
use loadtest::keys::{SigningKey, connector_claims, now_secs};
use loadtest::mock::{ConnectorFault, MockMicrosoft};
use loadtest::redis::RedisServer;
use loadtest::router::RouterProcess;
use serde_json::json;

/// How long an outage lasts: a minute in long mode.
fn outage() -> Duration {
    if long_mode() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(8)
    }
}

/// Posts a message until the router takes it, as the Bot Connector redelivers refused ones.
async fn deliver(
    router: &RouterProcess,
    mock: &MockMicrosoft,
    conversation: &str,
    id: &str,
) -> u32 {
    let client = http();
    let activity = personal_message(mock, conversation, id, id);
    for attempt in 1..=200 {
        let response = client
            .post(router.callback_url("teams_prod"))
            .bearer_auth(mock.token_for(APP_ID))
            .json(&activity)
            .send()
            .await;
        if response.is_ok_and(|r| r.status().as_u16() == 200) {
            return attempt;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} was never acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_failing_with_5xx_then_429_loses_no_answer() {
    let (mock, router) = start_process("").await;
    let outage = outage();
    mock.set_periodic_fault(Some((1, ConnectorFault::Status(503))));
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut n = 0;
    while started.elapsed() < outage {
        if started.elapsed() > outage / 2 {
            // Second half: Teams throttling instead of failing.
            mock.set_periodic_fault(Some((
                1,
                ConnectorFault::Throttle {
                    retry_after_secs: 1,
                },
            )));
        }
        let id = format!("outage-{n}");
        deliver(&router, &mock, &format!("a:outage-{}", n % 5), &id).await;
        ids.push(id);
        n += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        replies_by_id(&mock).is_empty(),
        "nothing got through during the outage"
    );
    mock.set_periodic_fault(None);
    let recovered = Instant::now();
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(60)).await;
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "answers lost: {missing:?}");
    assert!(
        counts.values().all(|&c| c == 1),
        "answered once each: {counts:?}"
    );
    let scrape = metrics(&router).await;
    eprintln!(
        "connector outage {outage:?}: {} activities acknowledged during it, all {} answered once within {:?} of recovery; {} retries",
        ids.len(),
        counts.len(),
        recovered.elapsed(),
        metric_sum(&scrape, "teams_router_connector_retries_total", &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_connector_is_timed_out_and_answered_when_it_recovers() {
    let (mock, router) =
        start_process_with_env(&[("TEAMS_ROUTER__CONNECTOR__REQUEST_TIMEOUT_MS", "500")]).await;
    mock.set_connector_latency(Duration::from_secs(3600));
    let ids: Vec<String> = (0..6).map(|i| format!("hang-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        deliver(&router, &mock, &format!("a:hang-{}", i % 3), id).await;
    }
    tokio::time::sleep(outage() / 2).await;
    assert!(mock.activities().is_empty());
    mock.set_connector_latency(Duration::ZERO);
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(60)).await;
    assert_eq!(counts.len(), ids.len(), "every answer arrived: {counts:?}");
    let scrape = metrics(&router).await;
    let timeouts = metric_sum(
        &scrape,
        "teams_router_connector_retries_total",
        &["reason=\"ambiguous_timeout\""],
    );
    assert!(timeouts >= 1.0, "timeouts counted apart");
    eprintln!(
        "hanging connector: {} answers delivered after recovery, {} timed-out attempts retried, duplicates {}",
        counts.len(),
        timeouts,
        counts.values().filter(|&&c| c > 1).count()
    );
}

/// Discovery down for 61 s with a 1 s refresh interval, in virtual time (a router in this
/// process, its runtime paused): the whole outage costs the test a second or two.
#[tokio::test]
async fn openid_metadata_down_longer_than_the_key_cache_keeps_verifying_with_known_keys() {
    tokio::time::pause();
    let (mock, router) = start_with_env(&[
        ("TEAMS_ROUTER__MICROSOFT__KEY_REFRESH_INTERVAL_SECS", "1"),
        ("TEAMS_ROUTER__MICROSOFT__UNKNOWN_KID_REFRESH_BURST", "10"),
    ])
    .await;
    let client = http();
    let url = router.callback_url("teams_prod");
    let key = mock.signing_key();
    // A token signed now, not one the verified-token cache has seen.
    let fresh_token = |key: &SigningKey, n: u32| {
        let mut claims = connector_claims(APP_ID, &mock.service_url());
        claims["exp"] = json!(now_secs() + 3600 + i64::from(n));
        key.sign(&claims)
    };
    let activity = |id: &str| personal_message(&mock, "a:openid", id, id);
    assert_eq!(
        post(&client, &url, Some(&fresh_token(&key, 0)), &activity("o-0"))
            .await
            .0,
        200
    );

    mock.set_openid_available(false);
    let down = tokio::time::Instant::now();
    let mut n = 1;
    while down.elapsed() < Duration::from_secs(61) {
        let (status, text) = post(
            &client,
            &url,
            Some(&fresh_token(&key, n)),
            &activity(&format!("o-{n}")),
        )
        .await;
        assert_eq!(
            status, 200,
            "known keys keep verifying while discovery is down: {text}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ready = client.get(router.ops_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "still ready with cached keys");
    // An unknown key cannot be looked up: refused, not let in.
    let stranger = SigningKey::generate("rotated-in", &["msteams"]);
    let (status, text) = post(
        &client,
        &url,
        Some(&fresh_token(&stranger, 0)),
        &activity("o-x"),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("unknown_key"), "{text}");

    // Discovery is back, with a rotated key: the router picks it up.
    let rotated = std::sync::Arc::new(SigningKey::generate("rotated-in-2", &["msteams"]));
    mock.rotate_to(std::sync::Arc::clone(&rotated));
    mock.set_openid_available(true);
    let (status, text) = post(
        &client,
        &url,
        Some(&fresh_token(&rotated, 0)),
        &activity("o-rotated"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let ids: Vec<String> = (0..n)
        .map(|i| format!("o-{i}"))
        .chain(["o-rotated".into()])
        .collect();
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(20)).await;
    assert_eq!(counts.len(), ids.len());
    eprintln!(
        "OpenID down {:?} (key refresh every 1 s): {} fresh tokens verified with cached keys, unknown kid 401, rotated key taken after recovery",
        down.elapsed(),
        n - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalling_for_seconds_loses_nothing_acknowledged() {
    let server = RedisServer::start().expect("redis-server");
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let storage = format!(
        "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\ninstance_id = \"stall\"\nredis_command_timeout_ms = 500\n",
        server.url()
    );
    let router = RouterProcess::spawn(&binary(), &config_with_storage(&mock, &storage, ""))
        .await
        .expect("router starts");
    let port = server.port();
    let stall_secs = if long_mode() { 20 } else { 3 };
    // CLIENT PAUSE ALL: every client's commands wait, as on a Redis that stopped answering.
    let stall = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        std::process::Command::new("redis-cli")
            .args([
                "-p",
                &port.to_string(),
                "CLIENT",
                "PAUSE",
                &(stall_secs * 1000).to_string(),
                "ALL",
            ])
            .output()
            .expect("redis-cli")
    });
    let started = Instant::now();
    let mut ids = Vec::new();
    let mut redelivered = 0;
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(stall_secs + 3) {
        let id = format!("stall-{n}");
        let sent = Instant::now();
        redelivered += deliver(&router, &mock, &format!("a:stall-{}", n % 4), &id).await - 1;
        slowest = slowest.max(sent.elapsed());
        ids.push(id);
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stalled = stall.join().expect("stall thread");
    // redis-cli exits 0 on an error reply too: the reply itself says whether Redis stalled.
    assert_eq!(
        String::from_utf8_lossy(&stalled.stdout).trim(),
        "OK",
        "{stalled:?}"
    );
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(30)).await;
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(counts.values().all(|&c| c == 1), "once each");
    let scrape = metrics(&router).await;
    eprintln!(
        "Redis stalled {stall_secs} s: {} acknowledged and answered once, {redelivered} refusals redelivered, slowest acknowledgement {slowest:?}, store errors {}",
        ids.len(),
        metric_sum(&scrape, "teams_router_store_errors_total", &[])
    );
}

/// A scratch directory on an 8 MB tmpfs of its own, unmounted when dropped; `None` where this
/// process cannot mount one (not root), except in CI, which must.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(what: &str) -> Option<Self> {
        let dir = scratch_dir(what);
        std::fs::create_dir_all(&dir).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted && std::env::var_os("CI").is_some() {
            panic!("CI must be able to mount a small tmpfs (root) to fill a disk");
        }
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root)");
        }
        mounted.then_some(Self(dir))
    }

    /// Writes until the file system is full; returns the file to remove to free it.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        // Large chunks, then page-sized ones: not a page is left.
        for size in [64 * 1024, 4096] {
            let chunk = vec![0u8; size];
            while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_503_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount("full-disk") else {
        return;
    };
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let storage = format!(
        "[storage]\npath = {:?}\ndurable_accept = true\n",
        disk.0.join("state")
    );
    let router = RouterProcess::spawn(&binary(), &config_with_storage(&mock, &storage, ""))
        .await
        .expect("router starts");
    let client = http();
    let send = |id: String| {
        let request = client
            .post(router.callback_url("teams_prod"))
            .bearer_auth(mock.token_for(APP_ID))
            .json(&personal_message(&mock, "a:disk", &id, &id));
        async move {
            request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(send("d-before".into()).await, 200);

    let filler = disk.fill();

    let mut acknowledged = vec!["d-before".to_owned()];
    let mut refused = 0;
    for i in 0..40 {
        let id = format!("d-full-{i}");
        match send(id.clone()).await {
            200 => acknowledged.push(id),
            503 => refused += 1,
            other => panic!("unexpected status {other} with a full disk"),
        }
    }
    assert!(refused > 0, "a full disk refuses durable accepts");
    let ready = client.get(router.ops_url("/readyz")).send().await.unwrap();
    let readiness = ready.status().as_u16();

    std::fs::remove_file(&filler).expect("free the disk");
    let freed = Instant::now();
    let mut back = None;
    for i in 0..100 {
        let id = format!("d-after-{i}");
        if send(id.clone()).await == 200 {
            acknowledged.push(id);
            back = Some(freed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(back) = back else {
        let logs = router.logs();
        let tail: Vec<&str> = logs.lines().rev().take(15).collect();
        panic!("not accepting again once space returned: {tail:#?}");
    };
    let counts = wait_for_replies(&mock, &acknowledged, Duration::from_secs(30)).await;
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "acknowledged and lost: {missing:?}");
    let scrape = metrics(&router).await;
    eprintln!(
        "disk full: {refused} of 40 refused with 503 (readyz {readiness}), {} acknowledged while full; accepting again {back:?} after space returned; all {} acknowledged answered; store errors {}",
        acknowledged.len() - 2,
        acknowledged.len(),
        metric_sum(&scrape, "teams_router_store_errors_total", &[])
    );
}

/// Sets a Redis server's `maxmemory`: `1` makes it refuse every write (OOM) while it answers
/// reads, as a full store does; `0` lifts the limit.
fn redis_maxmemory(server: &RedisServer, bytes: u64) {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &server.port().to_string(), "CONFIG", "SET"])
        .args(["maxmemory", &bytes.to_string()])
        .output()
        .expect("redis-cli");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "OK",
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_whose_snapshots_were_dropped_keep_their_history() {
    let server = RedisServer::start().expect("redis-server");
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    // Room for four snapshots (two conversations' session and record) while the store is full.
    let storage = format!(
        "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\ninstance_id = \"unsaved\"\ndurable_accept = false\nsnapshot_pending_max = 4\n",
        server.url()
    );
    let router = RouterProcess::spawn(
        &binary(),
        &config_with_storage(&mock, &storage, "[conversation]\nidle_timeout_ms = 300\n"),
    )
    .await
    .expect("router starts");
    // A disk-full store on the embedded backend may still find free pages inside its file;
    // a Redis at its memory limit refuses every write until the limit is lifted.
    redis_maxmemory(&server, 1);

    let client = http();
    let token = mock.token_for(APP_ID);
    let url = router.callback_url("teams_prod");
    let conversations = 6;
    let mut ids = Vec::new();
    for i in 0..conversations {
        let id = format!("keep-{i}");
        let mut message =
            personal_message(&mock, &format!("a:keep-{i}"), &id, &format!("note {i}"));
        // One user per personal chat, as in Teams: each has its own session.
        message["from"]["id"] = format!("29:keep-{i}").into();
        assert_eq!(post(&client, &url, Some(&token), &message).await.0, 200);
        ids.push(id);
    }
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(20)).await;
    assert_eq!(counts.len(), conversations, "every conversation answered");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scrape = metrics(&router).await;
    let live = metric_value(&scrape, "teams_router_conversations_active").unwrap_or(0.0);
    let dropped = metric_sum(&scrape, "teams_router_snapshot_failures_total", &[]);
    assert!(
        dropped > 0.0,
        "snapshots were dropped or failed, and counted"
    );
    assert!(
        live > 0.0,
        "conversations whose snapshots were dropped stay in memory after five idle timeouts"
    );
    // Passivating would lose a dropped snapshot: such conversations wait in memory, and pass
    // once their snapshots are written, with their history.
    redis_maxmemory(&server, 0);
    let freed = Instant::now();
    let until = freed + Duration::from_secs(30);
    while metric_value(&metrics(&router).await, "teams_router_conversations_active") != Some(0.0)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let passivated_in = freed.elapsed();
    assert_eq!(
        metric_value(&metrics(&router).await, "teams_router_conversations_active"),
        Some(0.0),
        "every conversation passivates once its snapshots are written"
    );
    for i in 0..conversations {
        let id = format!("keep-{i}-session");
        let mut command = personal_message(&mock, &format!("a:keep-{i}"), &id, "///session");
        command["from"]["id"] = format!("29:keep-{i}").into();
        assert_eq!(post(&client, &url, Some(&token), &command).await.0, 200);
        wait_for_replies(&mock, std::slice::from_ref(&id), Duration::from_secs(10)).await;
        let answer = mock
            .activities()
            .into_iter()
            .find(|a| a.reply_to_id.as_deref() == Some(id.as_str()))
            .map(|a| a.text().to_owned())
            .unwrap_or_default();
        assert!(
            answer.contains(&format!("note {i}")),
            "conversation a:keep-{i} resumed without its history: {answer}"
        );
    }
    eprintln!(
        "snapshots with the store full (Redis at its memory limit): {dropped} dropped (queue full) or failed, {live} of {conversations} conversations still live after 5 idle timeouts; \
         none live {passivated_in:?} after the store took writes again; all resumed with their history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_sends_the_final_message_after_restart() {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    let dir = scratch_dir("mid-stream");
    let storage = format!("[storage]\npath = {dir:?}\ndurable_accept = true\n");
    let bots = streaming_bot(150);
    let config = config_with_storage(&mock, &storage, &bots);
    let mut router = RouterProcess::spawn(&binary(), &config)
        .await
        .expect("router starts");
    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let (status, _) = post(
        &http(),
        &router.callback_url("teams_stream"),
        Some(&mock.token_for(APP_ID)),
        &personal_message(&mock, "a:stream-kill", "sk-1", &text),
    )
    .await;
    assert_eq!(status, 200);
    // Wait until the stream is open and has shown some text, then kill the router.
    let until = Instant::now() + Duration::from_secs(10);
    let stream_updates = |mock: &MockMicrosoft| {
        mock.activities()
            .iter()
            .filter(|a| a.conversation_id == "a:stream-kill" && a.kind() == "typing")
            .count()
    };
    while stream_updates(&mock) < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stream_updates(&mock) >= 2, "the stream started");
    router.kill().await;
    let final_before = mock
        .activities()
        .iter()
        .filter(|a| a.kind() == "message" && a.conversation_id == "a:stream-kill")
        .count();
    assert_eq!(final_before, 0, "killed before the final message");

    let restarted = Instant::now();
    let _router = RouterProcess::spawn(&binary(), &config)
        .await
        .expect("router restarts");
    let until = Instant::now() + Duration::from_secs(30);
    let final_message = loop {
        let found = mock
            .activities()
            .into_iter()
            .find(|a| a.kind() == "message" && a.conversation_id == "a:stream-kill");
        if found.is_some() || Instant::now() > until {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let final_message = final_message.expect("a final message after the restart");
    assert_eq!(final_message.text(), format!("echo: {text}"));
    eprintln!(
        "kill -9 mid-stream: final message with the whole answer {:?} after the restart",
        restarted.elapsed()
    );
}
