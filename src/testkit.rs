//! The router in the test's own process, for behaviour tests: the same rooms, listeners and HTTP
//! as the binary, bound to `127.0.0.1:0`, on the test's tokio runtime. A test that pauses its
//! runtime (`#[tokio::test(start_paused = true)]`) runs every timer of the router (pacing
//! windows, backoff, Retry-After, session expiry, passivation, key refresh) in virtual time; see
//! [`crate::clock`].
//!
//! What only a process shows (signals, `kill -9`, exit codes, configuration errors at start, the
//! listening line) is tested by spawning the binary instead.
//!
//! The metrics recorder is process-wide: routers started with [`TestRouter::start`] in one test
//! process share it. A test that asserts a metric's value starts its router with
//! [`TestRouter::start_counting`] on a current-thread runtime (the default of `#[tokio::test]`):
//! that router records into a recorder of the test's thread alone, and its `/metrics` shows it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::app::{Router, Serving};
use crate::config::Config;

/// A router serving on loopback inside the test process.
pub struct TestRouter {
    /// The traffic listener (activities and the management API).
    pub addr: SocketAddr,
    /// The ops listener (`/metrics`, `/healthz`, `/readyz`).
    pub ops_addr: SocketAddr,
    /// The management API's own listener (`admin.listen`), if configured.
    pub admin_addr: Option<SocketAddr>,
    serving: Option<Serving>,
    /// Keeps the test thread's own recorder current (see [`TestRouter::start_counting`]).
    _own_metrics: Option<metrics::LocalRecorderGuard<'static>>,
}

impl TestRouter {
    /// Starts a router on `config_toml` (its `listen` addresses may use port 0).
    pub async fn start(config_toml: &str) -> Result<Self, String> {
        Self::start_with_env(config_toml, &[]).await
    }

    /// Like [`TestRouter::start`], with `TEAMS_ROUTER__SECTION__KEY` overrides and the variables
    /// the config names (`api_key_env`, `master_key_env`, ...) given here instead of read from
    /// the process environment.
    pub async fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Result<Self, String> {
        Self::launch(config_toml, env, false).await
    }

    /// Like [`TestRouter::start_with_env`], with metrics of its own: what the router records on
    /// this thread goes to a recorder that no other router shares, so a test can assert exact
    /// values. Needs a current-thread runtime (every task of the router then runs on this
    /// thread), and one such router per test.
    pub async fn start_counting(config_toml: &str, env: &[(&str, &str)]) -> Result<Self, String> {
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::CurrentThread
        {
            return Err("start_counting needs a current-thread runtime".to_owned());
        }
        Self::launch(config_toml, env, true).await
    }

    async fn launch(
        config_toml: &str,
        env: &[(&str, &str)],
        own_metrics: bool,
    ) -> Result<Self, String> {
        // One crypto provider for the process, as the binary's `main` installs it.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let pairs: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut config = Config::from_sources(config_toml, pairs.clone())
            .map_err(|e| format!("invalid configuration: {e}"))?;
        // On the test's runtime the workers' busy time, and how long tasks wait to run, are the
        // test clients' as much as the router's: they say nothing about the router's load (the
        // gate has unit tests).
        config.admission.max_runtime_busy_percent = 0;
        config.admission.target_request_wait_ms = 0;
        config.admission.target_arrival_delay_ms = 0;
        let lookup = move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let (serving, guard) = if own_metrics {
            let (metrics, guard) = crate::telemetry::install_on_this_thread()
                .map_err(|e| format!("metrics recorder: {e}"))?;
            let serving = Serving::start_with_metrics(&config, &lookup, metrics).await;
            (serving, Some(guard))
        } else {
            (Serving::start(&config, &lookup).await, None)
        };
        let serving = serving.map_err(|e| format!("router does not start: {e}"))?;
        Ok(Self {
            addr: serving.addr,
            ops_addr: serving.ops_addr,
            admin_addr: serving.admin_addr,
            serving: Some(serving),
            _own_metrics: guard,
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

    /// The rooms behind the listeners (directory, snapshots, readiness, ...).
    pub fn router(&self) -> Option<&Router> {
        self.serving.as_ref().map(Serving::router)
    }

    /// The graceful stop the binary does on SIGTERM, within `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(serving) = self.serving.take() else {
            return Ok(());
        };
        tokio::time::timeout(timeout, serving.shutdown())
            .await
            .map_err(|_| "router did not stop in time".to_owned())
    }
}
