//! A teams-router process started the way a user starts it: the built binary, a config file,
//! `serve --config PATH`. The listening line on stdout gives the ports (the config may use `:0`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct RouterProcess {
    child: Child,
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl RouterProcess {
    /// Writes `config_toml` to a temporary file and starts `binary serve --config <file>`.
    pub async fn spawn(binary: &Path, config_toml: &str) -> Result<Self, String> {
        Self::spawn_with_env(binary, config_toml, &[]).await
    }

    pub async fn spawn_with_env(
        binary: &Path,
        config_toml: &str,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!("teams-router-{}-{n}", std::process::id()));
        let config_path = base.with_extension("toml");
        let log_path = base.with_extension("log");
        std::fs::write(&config_path, config_toml).map_err(|e| format!("write config: {e}"))?;
        let log = std::fs::File::create(&log_path).map_err(|e| format!("create log: {e}"))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "router did not report its address within 30 s".to_string())?
            .map_err(|e| format!("read stdout: {e}"))?
            .ok_or_else(|| {
                format!(
                    "router exited before listening: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            })?;
        let (addr, ops_addr) =
            parse_listening_line(&line).ok_or(format!("unexpected first line: {line}"))?;
        // Keep draining stdout so the router never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            addr,
            ops_addr,
            config_path,
            log_path,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn callback_url(&self, integration: &str) -> String {
        format!(
            "http://{}/api/v1/integration/teams/{integration}/callback",
            self.addr
        )
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops_addr)
    }

    /// The router's log so far (stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, String> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| "router did not exit in time".to_string())?
            .map_err(|e| e.to_string())
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// `teams-router listening on http://A (ops http://B)`, or `(ops http://B, admin http://C)`
/// when the management API has its own listener.
fn parse_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("teams-router listening on ")?;
    let (main, ops) = rest.split_once(" (ops ")?;
    let main = main.split("://").nth(1)?.parse().ok()?;
    let ops = ops
        .trim_end_matches(')')
        .split(", ")
        .next()?
        .split("://")
        .nth(1)?
        .parse()
        .ok()?;
    Some((main, ops))
}
