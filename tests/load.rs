//! The bundled harness's scenarios against the router binary the tests build. `smoke`, whole: 10 s
//! at 100 activities/s over 4 bots and 200 conversations, every activity type, redeliveries (some
//! concurrent), forged tokens, token re-signing. It fails on an acknowledged activity lost,
//! answered twice or out of order, a reply to nothing, a forged token accepted, an invoke without
//! its answer. The release build runs it too under `scripts/test.sh --long`.

mod common;

use loadtest::harness;
use loadtest::mock::MockMicrosoft;
use loadtest::scenario::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_scenario_loses_duplicates_and_reorders_nothing() {
    let scenario = Scenario::load("smoke").expect("the bundled smoke scenario");
    let mock = MockMicrosoft::start().await;
    let (target, spawned, _environment) =
        loadtest::spawn::spawn(&scenario, &mock, &common::binary())
            .await
            .expect("router starts");
    let report = harness::run(&scenario, &mock, target, spawned, false)
        .await
        .expect("smoke run");
    println!("{}", report.summary());
    assert!(report.passed, "{}", report.summary());
}

/// The bundled `failover` scenario, shortened (its full length runs under `.ci/run --long`):
/// three routers on one Redis, one killed with SIGKILL and replaced under a new name; nothing any
/// of them acknowledged is lost, and the partitions are all held again and spread evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failover_scenario_replaces_a_killed_router_and_loses_nothing() {
    let mut scenario = Scenario::load("failover").expect("the bundled failover scenario");
    // Three debug routers, driver and mocks on two cores.
    scenario.rate = 60.0;
    scenario.duration_secs = 16.0;
    scenario.conversations = 150;
    if let Some(failover) = scenario.failover.as_mut() {
        failover.kill_at_secs = 5.0;
    }
    let mock = MockMicrosoft::start().await;
    let (target, spawned, _environment) =
        loadtest::spawn::spawn(&scenario, &mock, &common::binary())
            .await
            .expect("routers start");
    assert_eq!(spawned.len(), 3);
    let report = harness::run(&scenario, &mock, target, spawned, false)
        .await
        .expect("failover run");
    println!("{}", report.summary());
    assert!(report.passed, "{}", report.summary());
    assert!(
        report.instances.iter().filter(|i| i.acked > 0).count() == 4,
        "three routers and the replacement acknowledged: {}",
        report.summary()
    );
    assert!(report.takeover_secs.is_some(), "{}", report.summary());
    assert!(report.rebalanced_secs.is_some(), "{}", report.summary());
}

/// The bundled `broadcast-kill` scenario, shortened (its 100,000 recipients run under
/// `.ci/run --long`): a broadcast created and started through the management API, the router
/// killed with SIGKILL at half and restarted on its store; every recipient gets its copy, once
/// (duplicates at most the sends in flight at the kill), with no 429 from the router's pacing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broadcast_scenario_resumes_after_a_kill_and_sends_each_copy_once() {
    let mut scenario = Scenario::load("broadcast-kill").expect("the bundled broadcast scenario");
    if let Some(broadcast) = scenario.broadcast.as_mut() {
        broadcast.recipients = 600;
        broadcast.tenants = 4;
        broadcast.page = 250;
        broadcast.timeout_secs = 120.0;
    }
    let mock = MockMicrosoft::start().await;
    let (target, mut spawned, _environment) =
        loadtest::spawn::spawn(&scenario, &mock, &common::binary())
            .await
            .expect("router starts");
    let integration = target.integrations[0].0.clone();
    let report = loadtest::broadcast::run(&scenario, &mock, spawned.remove(0), &integration, false)
        .await
        .expect("broadcast run");
    println!("{}", report.summary());
    assert!(report.passed, "{}", report.summary());
    assert!(report.killed_at_secs.is_some(), "{}", report.summary());
}
