//! `loadtest`: the bundled load-test harness. `cargo run --release -p loadtest -- smoke` builds and
//! spawns the router against a mock Microsoft side, drives the scenario's traffic, and exits
//! non-zero when a correctness check fails.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use loadtest::harness::{self, Target};
use loadtest::mock::MockMicrosoft;
use loadtest::scenario::Scenario;
use loadtest::spawn;

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "Load-test harness for teams-router: open-loop Teams traffic, a mock Microsoft side, latency and correctness report",
    after_help = "Scenarios: smoke, steady, ramp, storm, failover, capacity, overload, cpu (loadtest/scenarios/*.toml), or a path to a TOML file.\n\
                  Reports go to target/loadtest/<scenario>/report.{json,html}."
)]
struct Cli {
    /// A bundled scenario name or a scenario TOML file.
    #[arg(default_value = "smoke")]
    scenario: String,
    /// Start the router (the default): built in release mode unless --router-bin or
    /// TEAMS_ROUTER_BIN names a binary.
    #[arg(long, conflicts_with = "target")]
    spawn: bool,
    /// Drive a running router at this base URL instead (it must trust --mock-listen as its
    /// Microsoft side; --print-config shows the config it needs).
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// With --target: `ID=APP_ID:SECRET` of an integration to send to (repeatable).
    #[arg(long = "integration", value_name = "ID=APP_ID:SECRET")]
    integrations: Vec<String>,
    /// With --target: where the mock Microsoft side listens.
    #[arg(long, default_value = "127.0.0.1:9400")]
    mock_listen: SocketAddr,
    /// With --target: a management API key, so backend slowdowns can be injected.
    #[arg(long)]
    api_key: Option<String>,
    /// With --target and --api-key: the bot to slow down.
    #[arg(long, default_value = spawn::BOT_ID)]
    bot: String,
    /// The router binary to spawn.
    #[arg(long)]
    router_bin: Option<PathBuf>,
    /// Overrides the scenario's rate (activities/s).
    #[arg(long)]
    rate: Option<f64>,
    /// Overrides the scenario's duration (seconds).
    #[arg(long)]
    duration: Option<f64>,
    /// Where report.json and report.html go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Print the router config a --target run needs for this scenario, and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

/// Ok(passed), or Err when the run could not be set up.
async fn run(cli: Cli) -> Result<bool, String> {
    let mut scenario = Scenario::load(&cli.scenario)?;
    if let Some(rate) = cli.rate {
        scenario.rate = rate;
    }
    if let Some(duration) = cli.duration {
        scenario.duration_secs = duration;
    }
    scenario.validate()?;
    let out = cli.out.clone().unwrap_or_else(|| {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        manifest
            .parent()
            .unwrap_or(manifest)
            .join("target/loadtest")
            .join(&scenario.name)
    });

    if cli.print_config {
        let mock_url = format!("http://{}", cli.mock_listen);
        println!(
            "# Router config for `loadtest {} --target URL --mock-listen {}`:\n\
             [microsoft]\nopenid_metadata_url = \"{mock_url}/v1/.well-known/openidconfiguration\"\n\
             login_url = \"{mock_url}\"\n",
            cli.scenario, cli.mock_listen
        );
        for i in 0..scenario.integrations {
            let (id, app, secret) = spawn::integration(i);
            println!(
                "[[integrations]]\nid = \"{id}\"\nbotId = \"{}\"\nbotFrameworkAppId = \"{app}\"\nbotFrameworkAppSecret = \"{secret}\"\n",
                spawn::BOT_ID
            );
        }
        println!(
            "# then: loadtest {} --target http://ROUTER {}",
            cli.scenario,
            (0..scenario.integrations)
                .map(|i| {
                    let (id, app, secret) = spawn::integration(i);
                    format!("--integration {id}={app}:{secret}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        return Ok(true);
    }

    let report = match &cli.target {
        Some(url) => {
            if scenario.failover.is_some() {
                return Err("failover kills the router: it needs a spawned router".into());
            }
            let mock = MockMicrosoft::start_on(cli.mock_listen)
                .await
                .map_err(|e| format!("mock Microsoft on {}: {e}", cli.mock_listen))?;
            let mut integrations = Vec::new();
            for spec in &cli.integrations {
                let (id, credentials) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--integration {spec}: expected ID=APP_ID:SECRET"))?;
                let (app, secret) = credentials
                    .split_once(':')
                    .ok_or_else(|| format!("--integration {spec}: expected ID=APP_ID:SECRET"))?;
                mock.register_app(app, secret, None);
                integrations.push((id.to_owned(), app.to_owned()));
            }
            if integrations.is_empty() {
                return Err("--target needs at least one --integration ID=APP_ID:SECRET".into());
            }
            scenario.integrations = integrations.len();
            let target = Target {
                base_url: url.trim_end_matches('/').to_owned(),
                integrations,
                management: cli.api_key.clone().map(|key| (key, cli.bot.clone())),
            };
            harness::run(&scenario, &mock, target, None, !cli.quiet).await?
        }
        None => {
            let binary = tokio::task::spawn_blocking({
                let explicit = cli.router_bin.clone();
                move || spawn::router_binary(explicit.as_deref())
            })
            .await
            .map_err(|e| e.to_string())??;
            let mock = MockMicrosoft::start().await;
            let (target, spawned, _environment) = spawn::spawn(&scenario, &mock, &binary).await?;
            eprintln!(
                "scenario {}: {} (router {} at {})",
                scenario.name,
                scenario.description,
                binary.display(),
                target.base_url
            );
            harness::run(&scenario, &mock, target, Some(spawned), !cli.quiet).await?
        }
    };
    println!("{}", report.summary());
    report.write(&out)?;
    println!("report: {}", out.join("report.html").display());
    if !report.passed && !report.router_log_tail.is_empty() {
        eprintln!("router log (last lines):");
        for line in &report.router_log_tail {
            eprintln!("  {line}");
        }
    }
    Ok(report.passed)
}
