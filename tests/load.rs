//! The bundled harness's `smoke` scenario, whole, against the router binary the tests build: 10 s
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
    let report = harness::run(&scenario, &mock, target, Some(spawned), false)
        .await
        .expect("smoke run");
    println!("{}", report.summary());
    assert!(report.passed, "{}", report.summary());
}
