//! `--spawn`: the harness builds the router (release), writes a config pointing it at the mock
//! Microsoft side, starts Redis when the scenario wants it, and starts the router.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{Spawned, Target};
use crate::mock::MockMicrosoft;
use crate::redis::RedisServer;
use crate::router::RouterProcess;
use crate::scenario::Scenario;

/// The management API key of a spawned router.
pub const API_KEY: &str = "loadtest-api-key";
/// The bot every spawned integration answers with.
pub const BOT_ID: &str = "echo";

/// Integration `i` of a run: id, app id, secret.
pub fn integration(i: usize) -> (String, String, String) {
    (
        format!("loadtest_{i}"),
        format!("00000000-0000-4000-8000-{i:012}"),
        format!("loadtest-secret-{i}"),
    )
}

/// The router binary: `TEAMS_ROUTER_BIN`, or the workspace's release build, built now (a no-op
/// when it is up to date), so a run never measures a stale router.
pub fn router_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("TEAMS_ROUTER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace above loadtest/")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building the router: cargo build --release -p teams-router --bin teams-router");
    let output = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "teams-router",
            "--bin",
            "teams-router",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo build failed ({})", output.status));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "teams-router")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo build did not report the teams-router executable".to_string())
}

/// A free loopback port (fixed for the run, so a restarted router listens where it did).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// What a spawned run owns besides the router: its Redis and state directory.
pub struct Environment {
    pub redis: Option<RedisServer>,
    pub state_dir: PathBuf,
}

impl Drop for Environment {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The router config for `scenario` against `mock`.
pub fn router_config(
    scenario: &Scenario,
    mock: &MockMicrosoft,
    listen: &str,
    ops_listen: &str,
    storage: &str,
) -> String {
    let limits = if scenario.connector.teams_limits {
        // The router's defaults are Teams' documented limits.
        String::new()
    } else {
        "conversation_limits = [[1000, 1000000]]\napp_limits = [[1000, 10000000]]\n".into()
    };
    let mut config = format!(
        r#"{storage}

[server]
listen = "{listen}"
ops_listen = "{ops_listen}"
max_connections = 20000

[microsoft]
openid_metadata_url = "{metadata}"
login_url = "{login}"

[connector]
backoff_base_ms = 50
backoff_max_ms = 1000
{limits}{proactive}
[conversation]
mailbox_capacity = {mailbox_capacity}

[[accounts]]
id = "loadtest"
api_key = "{API_KEY}"

[[bots]]
id = "{BOT_ID}"
backend = {{ kind = "echo", wordDelayMs = {word_delay_ms} }}
"#,
        metadata = mock.openid_metadata_url(),
        login = mock.login_url(),
        word_delay_ms = scenario.router.word_delay_ms,
        mailbox_capacity = scenario.router.mailbox_capacity,
        // Tenants the router has not seen are reached at the cloud's global endpoint: here, the
        // mock's.
        proactive = if scenario.broadcast.is_some() {
            format!("proactive_service_url = \"{}\"\n", mock.service_url())
        } else {
            String::new()
        },
    );
    if let Some(broadcast) = &scenario.broadcast {
        config.push_str(&format!(
            "\n[broadcast]\nmax_share = {}\n",
            broadcast.max_share
        ));
    }
    for i in 0..scenario.integrations {
        let (id, app, secret) = integration(i);
        config.push_str(&format!(
            "\n[[integrations]]\nid = \"{id}\"\nbotId = \"{BOT_ID}\"\nbotFrameworkAppId = \"{app}\"\nbotFrameworkAppSecret = \"{secret}\"\n"
        ));
    }
    config.push('\n');
    config.push_str(&scenario.router.extra_config);
    config
}

/// Registers the run's apps at the mock.
pub fn register_apps(scenario: &Scenario, mock: &MockMicrosoft) {
    for i in 0..scenario.integrations {
        let (_, app, secret) = integration(i);
        mock.register_app(&app, &secret, None);
    }
}

/// Starts everything a spawned run needs (`router.instances` routers on one store); returns the
/// target (the first router), the processes and what to clean up.
pub async fn spawn(
    scenario: &Scenario,
    mock: &MockMicrosoft,
    binary: &Path,
) -> Result<(Target, Vec<Spawned>, Environment), String> {
    register_apps(scenario, mock);
    let state_dir = std::env::temp_dir().join(format!(
        "teams-router-loadtest-{}-{}",
        std::process::id(),
        free_port()?
    ));
    let mut environment = Environment {
        redis: None,
        state_dir,
    };
    let mut redis_port = None;
    let storage = if scenario.router.storage == "redis" {
        let redis = RedisServer::start()?;
        let storage = format!(
            "[storage]\nbackend = \"redis\"\nredis_url = \"{}\"\n",
            redis.url()
        );
        redis_port = Some(redis.port());
        environment.redis = Some(redis);
        storage
    } else {
        format!("[storage]\npath = {:?}\n", environment.state_dir)
    };
    let mut spawned = Vec::new();
    for n in 0..scenario.router.instances {
        let label = if scenario.router.instances == 1 {
            "loadtest".to_owned()
        } else {
            format!("loadtest-{}", n + 1)
        };
        let mut router = Spawned::start(scenario, mock, binary, &storage, &label).await?;
        router.redis_port = redis_port;
        spawned.push(router);
    }
    if spawned.len() > 1 {
        wait_for_even_spread(&spawned).await;
    }
    let first = spawned
        .first()
        .ok_or_else(|| "no router instance".to_string())?;
    let target = Target {
        base_url: first.process.base_url(),
        messaging_url: None,
        pid: None,
        integrations: (0..scenario.integrations)
            .map(|i| {
                let (id, app, _) = integration(i);
                (id, app)
            })
            .collect(),
        management: Some((API_KEY.into(), BOT_ID.into())),
    };
    Ok((target, spawned, environment))
}

/// Waits (up to 30 s) until the routers hold the partitions evenly (`teams_router_partitions_held`
/// differs by one at most, the same total twice in a row), so that a run measures routers at work,
/// not partitions moving between them at start.
async fn wait_for_even_spread(routers: &[Spawned]) {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last_total = None;
    while std::time::Instant::now() < deadline {
        let mut held = Vec::new();
        for router in routers {
            let scrape = match client.get(router.process.ops_url("/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            held.push(
                scrape
                    .lines()
                    .find_map(|l| l.strip_prefix("teams_router_partitions_held "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0) as u64,
            );
        }
        let total: u64 = held.iter().sum();
        let (low, high) = (
            held.iter().min().copied().unwrap_or(0),
            held.iter().max().copied().unwrap_or(0),
        );
        if low > 0 && high - low <= 1 && last_total == Some(total) {
            return;
        }
        last_total = Some(total);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    eprintln!("the routers' partitions were not spread evenly within 30 s; the run starts anyway");
}

impl Spawned {
    /// One router on `storage`, named `label`, on ports of its own.
    pub async fn start(
        scenario: &Scenario,
        mock: &MockMicrosoft,
        binary: &Path,
        storage: &str,
        label: &str,
    ) -> Result<Self, String> {
        let storage = if scenario.router.storage == "redis" {
            format!("{storage}instance_id = \"{label}\"\n")
        } else {
            storage.to_owned()
        };
        let listen = format!("127.0.0.1:{}", free_port()?);
        let ops_listen = format!("127.0.0.1:{}", free_port()?);
        let config = router_config(scenario, mock, &listen, &ops_listen, &storage);
        // Per-turn info lines would cost the router more than the turn; warnings still show.
        let env = vec![(
            "RUST_LOG".to_string(),
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )];
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process = RouterProcess::spawn_with_env(binary, &config, &env_refs).await?;
        Ok(Spawned {
            process,
            binary: binary.to_owned(),
            config,
            env,
            label: label.to_owned(),
            storage,
            redis_port: None,
        })
    }

    /// A new router in this one's place (a replaced pod): a new instance id and new ports.
    pub async fn replacement(
        &self,
        scenario: &Scenario,
        mock: &MockMicrosoft,
    ) -> Result<Self, String> {
        let label = format!("{}-replacement", self.label);
        let storage = self
            .storage
            .replace(&format!("instance_id = \"{}\"\n", self.label), "");
        let mut replacement = Self::start(scenario, mock, &self.binary, &storage, &label).await?;
        replacement.redis_port = self.redis_port;
        Ok(replacement)
    }
}
