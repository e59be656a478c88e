//! The shipped Prometheus config, alerting rules and Grafana dashboard, checked by the real tools:
//! promtool validates the config and rules (and runs the rules' unit tests), and a real Prometheus
//! server scrapes a router under the smoke scenario's traffic and answers every dashboard query
//! with data, while evaluating every alerting rule without error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::harness::{self, Target};
use loadtest::mock::MockMicrosoft;
use loadtest::scenario::Scenario;
use serde_json::Value;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(config_dir())
        .output()
        .expect("promtool (Debian package prometheus) is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_alerting_rules() {
    let config = promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = promtool(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
    let tests = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

/// Every query of the dashboard, with Grafana's variables replaced as Grafana would.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = config_dir().join("grafana/teams-router.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            queries.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                expr.replace("$__rate_interval", "1m")
                    .replace("$instance", ".*"),
            ));
        }
    }
    queries
}

struct Prometheus {
    child: std::process::Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Prometheus server scraping `ops` every second, with the shipped alerting rules.
async fn start_prometheus(ops: std::net::SocketAddr) -> Prometheus {
    let dir = common::scratch_dir("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\nscrape_configs:\n  - job_name: teams-router\n    static_configs:\n      - targets: [\"{ops}\"]\n",
        rules = config_dir().join("alerts.yml").display().to_string(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus) is installed");
    let prometheus = Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    };
    let client = common::http();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("{}/-/ready", prometheus.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not ready: {}",
            std::fs::read_to_string(prometheus.dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    prometheus
}

async fn query(client: &reqwest::Client, prometheus: &Prometheus, expr: &str) -> Value {
    client
        .get(format!(
            "{}/api/v1/query?query={}",
            prometheus.url,
            url::form_urlencoded::byte_serialize(expr.as_bytes()).collect::<String>()
        ))
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("query answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_router_under_smoke_traffic_and_every_dashboard_query_has_data() {
    let mut scenario = Scenario::load("smoke").unwrap();
    // The tests run a debug build of the router.
    scenario.rate = 40.0;
    scenario.duration_secs = 15.0;
    let mock = MockMicrosoft::start().await;
    let (target, spawned, _environment) =
        loadtest::spawn::spawn(&scenario, &mock, &common::binary())
            .await
            .expect("router starts");
    let router = spawned.into_iter().next().expect("one router").process;
    let prometheus = start_prometheus(router.ops_addr).await;
    let client = common::http();

    let report = harness::run(
        &scenario,
        &mock,
        Target {
            base_url: target.base_url.clone(),
            integrations: target.integrations.clone(),
            management: target.management.clone(),
            messaging_url: None,
            pid: None,
        },
        Vec::new(),
        false,
    )
    .await
    .expect("smoke run");
    assert!(report.passed, "{}", report.summary());
    // Two more scrapes after the last reply.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let up = query(&client, &prometheus, "up{job=\"teams-router\"}").await;
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let received = query(
        &client,
        &prometheus,
        "sum(increase(teams_router_activities_received_total[5m]))",
    )
    .await;
    let received: f64 = received["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!(
        received > report.acked as f64 * 0.5,
        "Prometheus saw {received} activities of {} acknowledged",
        report.acked
    );

    // The activity listener's tasks are measured (the wait is never exactly zero while requests
    // come), and healthy traffic is never shed for it.
    let gauge_max = |answer: Value| -> Option<f64> {
        answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
    };
    let wait = gauge_max(
        query(
            &client,
            &prometheus,
            "max_over_time(teams_router_request_wait_seconds[5m])",
        )
        .await,
    );
    assert!(
        wait.is_some_and(|w| w > 0.0 && w < 1.0),
        "request wait {wait:?}"
    );
    let shed = gauge_max(
        query(
            &client,
            &prometheus,
            "max_over_time(teams_router_shed_share[5m])",
        )
        .await,
    );
    assert_eq!(shed, Some(0.0), "nothing shed under smoke traffic");

    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        let answer = query(&client, &prometheus, expr).await;
        assert_eq!(answer["status"], "success", "{panel}: {expr}: {answer}");
        let has_data = answer["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty());
        if !has_data {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );

    let rules: Value = client
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rules: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(rules.len() >= 13, "{} rules loaded", rules.len());
    for rule in &rules {
        assert_eq!(
            rule["health"], "ok",
            "rule {} evaluates: {rule}",
            rule["name"]
        );
    }
    // Healthy traffic raises none of the alerts.
    let firing: Vec<&str> = rules
        .iter()
        .filter(|r| r["state"] == "firing")
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        firing.is_empty(),
        "alerts firing under smoke traffic: {firing:?}"
    );
    drop(router);
}
