//! Graceful shutdown and upgrades: SIGTERM stops accepting (readyz 503), finishes running turns
//! within `server.shutdown_timeout_ms`, leaves the rest to the journal for the next start, and
//! exits 0; a rolling restart of two instances behind one Redis under traffic loses nothing.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::*;
use loadtest::mock::MockMicrosoft;
use loadtest::redis::RedisServer;
use loadtest::router::RouterProcess;

fn sigterm(router: &RouterProcess) {
    let pid = router.pid().expect("running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn new_mock() -> MockMicrosoft {
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_SECRET, None);
    mock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_finishes_running_turns_and_exits_zero() {
    let mock = new_mock().await;
    mock.set_connector_latency(Duration::from_millis(800));
    let storage = format!(
        "[storage]\npath = {:?}\ndurable_accept = true\n",
        scratch_dir("sigterm")
    );
    let mut router = RouterProcess::spawn(&binary(), &config_with_storage(&mock, &storage, ""))
        .await
        .expect("router starts");
    let client = http();
    let token = mock.token_for(APP_ID);
    let ids: Vec<String> = (0..6).map(|i| format!("term-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let (status, _) = post(
            &client,
            &router.callback_url("teams_prod"),
            Some(&token),
            &personal_message(&mock, &format!("a:term-{}", i % 3), id, id),
        )
        .await;
        assert_eq!(status, 200);
    }
    let ops = router.ops_url("/readyz");
    let callback = router.callback_url("teams_prod");
    let signalled = Instant::now();
    sigterm(&router);

    // Draining: not ready, and no new activity is taken (a fresh connection is refused).
    let mut saw_draining = false;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Ok(response) = reqwest::get(&ops).await {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if status == 503 && body.contains("shutting down") {
                saw_draining = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_draining, "readyz says draining while turns finish");
    let fresh = reqwest::Client::builder().build().unwrap();
    let refused = fresh
        .post(&callback)
        .bearer_auth(&token)
        .json(&personal_message(&mock, "a:late", "late-1", "too late"))
        .send()
        .await;
    assert!(
        refused.is_err() || refused.as_ref().is_ok_and(|r| r.status().as_u16() == 503),
        "no new activity while draining: {refused:?}"
    );

    let exit = router
        .terminate(Duration::from_secs(20))
        .await
        .expect("exits");
    assert!(exit.success(), "exit status {exit:?}");
    let took = signalled.elapsed();
    let counts = replies_by_id(&mock);
    assert!(
        ids.iter().all(|id| counts.get(id) == Some(&1)),
        "every running and queued turn finished before exit: {counts:?}"
    );
    eprintln!(
        "SIGTERM: readyz 503 \"shutting down\" at once, 6 accepted turns (2 per conversation, 0.8 s connector latency) finished, exit 0 after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_past_the_shutdown_deadline_are_run_by_the_next_start() {
    let mock = new_mock().await;
    mock.set_connector_latency(Duration::from_millis(400));
    let dir = scratch_dir("deadline");
    let storage = format!("[storage]\npath = {dir:?}\ndurable_accept = true\n");
    let config = config_with_storage(&mock, &storage, "").replace(
        "body_limit_bytes = 65536",
        "body_limit_bytes = 65536\nshutdown_timeout_ms = 300",
    );
    let mut router = RouterProcess::spawn(&binary(), &config)
        .await
        .expect("router starts");
    let client = http();
    let token = mock.token_for(APP_ID);
    let ids: Vec<String> = (0..8).map(|i| format!("late-{i}")).collect();
    for id in &ids {
        let (status, _) = post(
            &client,
            &router.callback_url("teams_prod"),
            Some(&token),
            &personal_message(&mock, "a:deadline", id, id),
        )
        .await;
        assert_eq!(status, 200);
    }
    let exit = router
        .terminate(Duration::from_secs(20))
        .await
        .expect("exits");
    assert!(exit.success(), "{exit:?}");
    let answered_before = replies_by_id(&mock).len();
    assert!(
        answered_before < ids.len(),
        "the deadline cut the queue short"
    );

    let restarted = Instant::now();
    let _router = RouterProcess::spawn(&binary(), &config)
        .await
        .expect("router restarts");
    let counts = wait_for_replies(&mock, &ids, Duration::from_secs(30)).await;
    let missing: Vec<&String> = ids.iter().filter(|id| !counts.contains_key(*id)).collect();
    assert!(missing.is_empty(), "lost over the restart: {missing:?}");
    let twice = counts.values().filter(|&&c| c > 1).count();
    assert!(
        twice <= 1,
        "at most the turn cut at the deadline repeats: {counts:?}"
    );
    let order: Vec<String> = mock
        .activities()
        .iter()
        .filter_map(|a| a.reply_to_id.clone())
        .collect();
    let mut first_seen: Vec<&String> = Vec::new();
    for id in &order {
        if !first_seen.contains(&id) {
            first_seen.push(id);
        }
    }
    assert_eq!(
        first_seen,
        ids.iter().collect::<Vec<_>>(),
        "answered in order across the restart"
    );
    eprintln!(
        "shutdown deadline 300 ms: {answered_before} of 8 queued turns answered before exit 0, the other {} by the next start within {:?}, {twice} repeated",
        ids.len() - answered_before,
        restarted.elapsed()
    );
}

/// Sends to the instance that owns the conversation, or to the other one while it is away, until
/// an instance takes the activity: what a load balancer and the Bot Connector's redelivery do.
async fn deliver(
    instances: &RwLock<Vec<String>>,
    mock: &MockMicrosoft,
    client: &reqwest::Client,
    token: &str,
    conversation: usize,
    id: &str,
) -> bool {
    let activity = personal_message(mock, &format!("a:rolling-{conversation}"), id, id);
    for attempt in 0..400 {
        let base = {
            let instances = instances.read().unwrap();
            instances[(conversation + attempt) % instances.len()].clone()
        };
        let response = client
            .post(format!(
                "{base}/api/v1/integration/teams/teams_prod/callback"
            ))
            .bearer_auth(token)
            .json(&activity)
            .send()
            .await;
        if response.is_ok_and(|r| r.status().as_u16() == 200) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_two_instances_behind_one_redis_loses_nothing() {
    let redis = RedisServer::start().expect("redis-server");
    let mock = new_mock().await;
    mock.set_connector_latency(Duration::from_millis(10));
    let storage = |instance: &str| {
        format!(
            "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\ninstance_id = \"{instance}\"\n",
            redis.url()
        )
    };
    let config_a = config_with_storage(&mock, &storage("rolling-a"), "");
    let config_b = config_with_storage(&mock, &storage("rolling-b"), "");
    let mut a = RouterProcess::spawn(&binary(), &config_a)
        .await
        .expect("a starts");
    let mut b = RouterProcess::spawn(&binary(), &config_b)
        .await
        .expect("b starts");
    let instances = Arc::new(RwLock::new(vec![a.base_url(), b.base_url()]));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let token = mock.token_for(APP_ID);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    const SENDERS: usize = 8;
    const CONVERSATIONS: usize = 40;
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (instances, acked, mock, token, stop) = (
            Arc::clone(&instances),
            Arc::clone(&acked),
            mock.clone(),
            token.clone(),
            Arc::clone(&stop),
        );
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_idle_timeout(Duration::from_millis(500))
                .build()
                .unwrap();
            let mut n = 0usize;
            // Each sender owns its conversations, so each conversation's activities go in order.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let conversation = sender + SENDERS * (n % (CONVERSATIONS / SENDERS));
                let id = format!("roll-{conversation}-{n}");
                if deliver(&instances, &mock, &client, &token, conversation, &id).await {
                    acked.lock().unwrap().push(id);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }

    // Upgrade A, then B, one at a time, each drained with SIGTERM and started again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut exits = Vec::new();
    for which in ["a", "b"] {
        let (router, config, slot) = match which {
            "a" => (&mut a, &config_a, 0),
            _ => (&mut b, &config_b, 1),
        };
        let exit = router
            .terminate(Duration::from_secs(20))
            .await
            .expect("exits");
        exits.push(exit.success());
        *router = RouterProcess::spawn(&binary(), config)
            .await
            .expect("restarts");
        instances.write().unwrap()[slot] = router.base_url();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for sender in senders {
        sender.await.unwrap();
    }
    assert!(
        exits.iter().all(|ok| *ok),
        "both instances exit 0 on SIGTERM"
    );
    let acked = acked.lock().unwrap().clone();
    let counts = wait_for_replies(&mock, &acked, Duration::from_secs(30)).await;
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost in the rolling restart: {} of {}: {missing:?}",
        missing.len(),
        acked.len()
    );
    let duplicated = counts
        .iter()
        .filter(|(id, c)| **c > 1 && acked.contains(id))
        .count();
    assert_eq!(duplicated, 0, "answered twice");
    let unique: HashSet<&String> = acked.iter().collect();
    assert_eq!(unique.len(), acked.len());
    eprintln!(
        "rolling restart (2 instances, 1 Redis): {} activities acknowledged, all answered once; both instances drained and exited 0",
        acked.len()
    );
}
