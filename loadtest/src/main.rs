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
    after_help = "Scenarios: smoke, steady, ramp, storm, failover, capacity, overload, cpu, peak, broadcast, broadcast-kill (loadtest/scenarios/*.toml), or a path to a TOML file.\n                  `loadtest reference` serves the bare reference endpoint (PORT, APP_ID, APP_PASSWORD, OPENID_URL, TOKEN_URL, OAUTH_SCOPE).\n\
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
    /// Drive any Bot Framework messaging endpoint (one bot): the command runs under `sh -c` with
    /// PORT, APP_ID, APP_PASSWORD, OPENID_URL, TOKEN_URL, OAUTH_SCOPE and MOCK_PORT set, and
    /// must serve POST http://127.0.0.1:$PORT/api/messages. It is sampled like the router.
    #[arg(long, value_name = "CMD", conflicts_with_all = ["target", "target_url"])]
    target_cmd: Option<String>,
    /// Drive a running Bot Framework messaging endpoint at this URL (one bot, named by one
    /// --integration ID=APP_ID:SECRET; it must trust --mock-listen as its Microsoft side).
    #[arg(long, value_name = "URL", conflicts_with = "target")]
    target_url: Option<String>,
    /// Run the scenario against the harness's bare reference endpoint (`loadtest reference`)
    /// first, then against the router, and print the router's figures beside it as ratios.
    #[arg(long)]
    reference: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let reference = cli.scenario == "reference";
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
    if reference {
        // `loadtest reference`: the bare reference endpoint itself, configured by environment.
        let served = loadtest::reference::Settings::from_env()
            .and_then(|settings| runtime.block_on(loadtest::reference::serve(settings)));
        if let Err(e) = served {
            eprintln!("loadtest reference: {e}");
            return ExitCode::from(2);
        }
        return ExitCode::SUCCESS;
    }
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

    if scenario.broadcast.is_some() {
        if cli.target.is_some()
            || cli.target_url.is_some()
            || cli.target_cmd.is_some()
            || cli.reference
        {
            return Err("a broadcast run spawns its router".into());
        }
        let (mock, target, mut spawned, _environment) = spawn_router(&scenario, &cli).await?;
        let (integration, _) = target
            .integrations
            .first()
            .cloned()
            .ok_or("the scenario has no integration")?;
        let report = loadtest::broadcast::run(
            &scenario,
            &mock,
            spawned.remove(0),
            &integration,
            !cli.quiet,
        )
        .await?;
        println!("{}", report.summary());
        report.write(&out)?;
        println!("report: {}", out.join("report.json").display());
        if !report.passed {
            eprintln!("router log (last lines):");
            for line in &report.router_log_tail {
                eprintln!("  {line}");
            }
        }
        return Ok(report.passed);
    }

    let reference = if cli.reference {
        let me = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
        let command = format!("exec '{}' reference", me.display());
        eprintln!(
            "scenario {}: the bare reference endpoint first",
            scenario.name
        );
        let report = run_target_cmd(&scenario, &command, !cli.quiet).await?;
        println!(
            "reference endpoint (it keeps no order, dedup or state: its order check may fail):\n{}",
            report.summary()
        );
        report.write(&out.join("reference"))?;
        Some(report)
    } else {
        None
    };
    let report = if let Some(command) = &cli.target_cmd {
        run_target_cmd(&scenario, command, !cli.quiet).await?
    } else if let Some(url) = &cli.target_url {
        let mock = MockMicrosoft::start_on(cli.mock_listen)
            .await
            .map_err(|e| format!("mock Microsoft on {}: {e}", cli.mock_listen))?;
        let (id, app, secret) = match cli.integrations.as_slice() {
            [spec] => parse_integration(spec)?,
            _ => return Err("--target-url needs one --integration ID=APP_ID:SECRET".into()),
        };
        mock.register_app(&app, &secret, None);
        scenario.integrations = 1;
        let target = Target {
            base_url: url.trim_end_matches('/').to_owned(),
            integrations: vec![(id, app)],
            management: None,
            messaging_url: Some(url.clone()),
            pid: None,
        };
        harness::run(&scenario, &mock, target, Vec::new(), !cli.quiet).await?
    } else {
        match &cli.target {
            Some(url) => {
                if scenario.failover.is_some() {
                    return Err("failover kills the router: it needs a spawned router".into());
                }
                let mock = MockMicrosoft::start_on(cli.mock_listen)
                    .await
                    .map_err(|e| format!("mock Microsoft on {}: {e}", cli.mock_listen))?;
                let mut integrations = Vec::new();
                for spec in &cli.integrations {
                    let (id, app, secret) = parse_integration(spec)?;
                    mock.register_app(&app, &secret, None);
                    integrations.push((id, app));
                }
                if integrations.is_empty() {
                    return Err("--target needs at least one --integration ID=APP_ID:SECRET".into());
                }
                scenario.integrations = integrations.len();
                let target = Target {
                    base_url: url.trim_end_matches('/').to_owned(),
                    integrations,
                    management: cli.api_key.clone().map(|key| (key, cli.bot.clone())),
                    messaging_url: None,
                    pid: None,
                };
                harness::run(&scenario, &mock, target, Vec::new(), !cli.quiet).await?
            }
            None => {
                let (mock, target, spawned, _environment) = spawn_router(&scenario, &cli).await?;
                harness::run(&scenario, &mock, target, spawned, !cli.quiet).await?
            }
        }
    };
    println!("{}", report.summary());
    report.write(&out)?;
    if let Some(reference) = &reference {
        let ratios = ratios(reference, &report);
        println!("{ratios}");
        let page = loadtest::report::comparison_html(&report, reference, &ratios)?;
        let path = out.join("comparison.html");
        std::fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("both curves: {}", path.display());
    }
    println!("report: {}", out.join("report.html").display());
    if !report.passed && !report.router_log_tail.is_empty() {
        eprintln!("router log (last lines):");
        for line in &report.router_log_tail {
            eprintln!("  {line}");
        }
    }
    Ok(report.passed)
}

/// Builds (unless named) and starts the router for the scenario, with its mock Microsoft side.
async fn spawn_router(
    scenario: &Scenario,
    cli: &Cli,
) -> Result<
    (
        MockMicrosoft,
        Target,
        Vec<harness::Spawned>,
        spawn::Environment,
    ),
    String,
> {
    let binary = tokio::task::spawn_blocking({
        let explicit = cli.router_bin.clone();
        move || spawn::router_binary(explicit.as_deref())
    })
    .await
    .map_err(|e| e.to_string())??;
    let mock = MockMicrosoft::start().await;
    let (target, spawned, environment) = spawn::spawn(scenario, &mock, &binary).await?;
    eprintln!(
        "scenario {}: {} (router {} at {})",
        scenario.name,
        scenario.description,
        binary.display(),
        target.base_url
    );
    Ok((mock, target, spawned, environment))
}

/// `ID=APP_ID:SECRET`.
fn parse_integration(spec: &str) -> Result<(String, String, String), String> {
    let malformed = || format!("--integration {spec}: expected ID=APP_ID:SECRET");
    let (id, credentials) = spec.split_once('=').ok_or_else(malformed)?;
    let (app, secret) = credentials.split_once(':').ok_or_else(malformed)?;
    Ok((id.to_owned(), app.to_owned(), secret.to_owned()))
}

/// Starts `command` as a Bot Framework endpoint of one bot against a fresh mock Microsoft side,
/// runs the scenario against it, and stops it.
async fn run_target_cmd(
    scenario: &Scenario,
    command: &str,
    progress: bool,
) -> Result<loadtest::report::Report, String> {
    const APP_ID: &str = "endpoint-app";
    const APP_PASSWORD: &str = "endpoint-secret";
    let mock = MockMicrosoft::start().await;
    mock.register_app(APP_ID, APP_PASSWORD, None);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port: {e}"))?
        .port();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("PORT", port.to_string())
        .env("APP_ID", APP_ID)
        .env("APP_PASSWORD", APP_PASSWORD)
        .env("OPENID_URL", mock.openid_metadata_url())
        .env(
            "TOKEN_URL",
            format!("{}/botframework.com/oauth2/v2.0/token", mock.login_url()),
        )
        .env("OAUTH_SCOPE", "https://api.botframework.com/.default")
        .env("MOCK_PORT", mock.addr().port().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start {command}: {e}"))?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{command} exited before listening: {status}"));
        }
        if std::time::Instant::now() > until {
            return Err(format!(
                "{command} did not listen on port {port} within 60 s"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "scenario {}: {} (endpoint `{command}` on port {port})",
        scenario.name, scenario.description
    );
    let mut scenario = scenario.clone();
    scenario.integrations = 1;
    let target = Target {
        base_url: format!("http://127.0.0.1:{port}"),
        integrations: vec![("endpoint".into(), APP_ID.into())],
        management: None,
        messaging_url: Some(format!("http://127.0.0.1:{port}/api/messages")),
        pid: child.id(),
    };
    let report = harness::run(&scenario, &mock, target, Vec::new(), progress).await;
    let _ = child.kill().await;
    report
}

/// The router's figures beside the reference's, as users compare them.
fn ratios(reference: &loadtest::report::Report, router: &loadtest::report::Report) -> String {
    let rate = |r: &loadtest::report::Report| r.max_sustainable_rate;
    let mut lines =
        vec!["router vs the bare reference endpoint (same scenario, same machine):".to_owned()];
    match (rate(router), rate(reference)) {
        (Some(router_rate), Some(reference_rate)) => lines.push(format!(
            "  max sustainable rate  router {router_rate:.0}/s, reference {reference_rate:.0}/s: {:.2} of the reference's",
            router_rate / reference_rate
        )),
        (a, b) => lines.push(format!(
            "  max sustainable rate  router {a:?}, reference {b:?} (no sustainable step on one side)"
        )),
    }
    match (router.cpu_per_answered_us(), reference.cpu_per_answered_us()) {
        (Some(router_cpu), Some(reference_cpu)) => lines.push(format!(
            "  CPU per answered activity  router {router_cpu:.0} µs, reference {reference_cpu:.0} µs: {:.2}×",
            router_cpu / reference_cpu
        )),
        _ => lines.push("  CPU per answered activity: not sampled on one side".into()),
    }
    lines.join("\n")
}
