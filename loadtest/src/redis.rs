//! A real `redis-server` on a free loopback port, for tests and load runs. It is stopped (and its
//! files removed) when dropped; it can be stopped and started again on the same port to play an
//! outage.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The master's port, for a replica.
    replica_of: Option<u16>,
}

impl RedisServer {
    /// Starts `redis-server` (from PATH) without persistence.
    pub fn start() -> Result<Self, String> {
        Self::start_replicating(None)
    }

    /// Starts a replica of `master` (its own directory: a replica writes the master's snapshot
    /// to disk when it syncs).
    pub fn replica_of(master: &RedisServer) -> Result<Self, String> {
        Self::start_replicating(Some(master.port))
    }

    fn start_replicating(replica_of: Option<u16>) -> Result<Self, String> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("teams-router-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut server = Self {
            port,
            dir,
            child: None,
            replica_of,
        };
        server.resume()?;
        Ok(server)
    }

    /// This server's `INFO replication` field `name` (`role`, `connected_slaves`, …).
    pub fn replication(&self, name: &str) -> Option<String> {
        let info = cli(self.port, &["INFO", "replication"]);
        info.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
    }

    /// Commands the server has processed from clients since it started (`INFO stats`): a
    /// script counts once, however many commands it runs.
    pub fn commands_processed(&self) -> u64 {
        commands_processed(self.port)
    }

    /// Calls per command since the server started (`INFO commandstats`), those run inside
    /// scripts included.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        cli(self.port, &["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Entries left in the partitions' streams (`partitions` of them, under the default prefix).
    pub fn stream_entries(&self, partitions: u16) -> u64 {
        let script = format!(
            "local n = 0 for p = 0, {} do n = n + redis.call('XLEN', 'teams-router:{{p' .. p .. '}}:stream') end return n",
            partitions.saturating_sub(1)
        );
        cli(self.port, &["EVAL", &script, "0"])
            .trim()
            .parse()
            .unwrap_or(u64::MAX)
    }

    /// Replicas attached and in sync (`state=online`).
    pub fn replicas_online(&self) -> usize {
        cli(self.port, &["INFO", "replication"])
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (an outage); the data is gone with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it answers.
    pub fn resume(&mut self) -> Result<(), String> {
        self.stop();
        let mut command = Command::new("redis-server");
        command.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(master) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        self.child = Some(spawn_in(command, &self.dir)?);
        wait_for_port(self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster on loopback: `masters` masters with one replica each, created with
/// `redis-cli --cluster create`, a short node timeout so that a killed master's replica takes
/// over within seconds. Stopped (and its files removed) when dropped.
pub struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: PathBuf,
    node_timeout_ms: u64,
}

impl RedisCluster {
    pub fn start(masters: usize, node_timeout_ms: u64) -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "teams-router-cluster-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            node_timeout_ms,
        };
        for _ in 0..masters * 2 {
            let port = free_port()?;
            // The cluster bus listens on port + 10000: it must be free too.
            if TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let child = cluster.spawn_node(port)?;
            cluster.nodes.push((port, Some(child)));
        }
        if cluster.nodes.len() < masters * 2 {
            return Err("not enough free port pairs for the cluster".into());
        }
        for (port, _) in &cluster.nodes {
            wait_for_port(*port)?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stdout)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.is_ok() {
            if Instant::now() > deadline {
                return Err("the cluster did not reach cluster_state:ok within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    fn spawn_node(&self, port: u16) -> Result<Child, String> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &self.node_timeout_ms.to_string()])
            .args(["--save", "", "--appendonly", "no"]);
        spawn_in(command, &self.dir)
    }

    /// Brings a killed node back as a new, empty replica of `master` (a node without persistence
    /// must not rejoin under its old identity: while it still believes it owns its old slots, an
    /// empty master can overwrite its successor's data). Its old cluster file goes; it meets the
    /// cluster and replicates `master`.
    pub fn replace_as_replica_of(&mut self, port: u16, master: u16) -> Result<(), String> {
        let master_id = cli(master, &["CLUSTER", "MYID"]).trim().to_owned();
        if master_id.is_empty() {
            return Err(format!("no node id from the master on {master}"));
        }
        let _ = std::fs::remove_file(self.dir.join(format!("nodes-{port}.conf")));
        let child = self.spawn_node(port)?;
        if let Some((_, slot)) = self.nodes.iter_mut().find(|(p, _)| *p == port) {
            *slot = Some(child);
        }
        wait_for_port(port)?;
        cli(port, &["CLUSTER", "MEET", "127.0.0.1", &master.to_string()]);
        // REPLICATE needs the node to know its master: gossip brings it within a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if cli(port, &["CLUSTER", "REPLICATE", &master_id]).trim() == "OK" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {port} did not become a replica of {master} within 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What every live node says of the cluster (`CLUSTER INFO`, `CLUSTER NODES`): for a test
    /// that waited for it in vain.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (port, _) in self.nodes.iter().filter(|(_, child)| child.is_some()) {
            let info = cli(*port, &["CLUSTER", "INFO"]);
            let state = info
                .lines()
                .find(|l| l.starts_with("cluster_state"))
                .unwrap_or("cluster_state:?");
            out.push_str(&format!(
                "node {port}: {}\n{}",
                state.trim(),
                cli(*port, &["CLUSTER", "NODES"])
            ));
        }
        out
    }

    /// Promotes the replica of the dead master on `port` by hand (`CLUSTER FAILOVER TAKEOVER`,
    /// an operator's last resort: no election), for when the cluster's own failover did not come
    /// within a bound. Answers the replica's port.
    pub fn take_over(&self, port: u16) -> Result<u16, String> {
        let live = self
            .nodes
            .iter()
            .find(|(_, c)| c.is_some())
            .ok_or("no live node")?
            .0;
        let nodes = cli(live, &["CLUSTER", "NODES"]);
        let fields =
            |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
        let dead_id = nodes
            .lines()
            .map(fields)
            .find(|f| f.len() > 1 && node_port(&f[1]) == Some(port))
            .map(|f| f[0].clone())
            .ok_or_else(|| format!("node {port} is not in the cluster"))?;
        let replica = nodes
            .lines()
            .map(fields)
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == dead_id)
            .and_then(|f| node_port(&f[1]))
            .ok_or_else(|| format!("node {port} has no replica"))?;
        let answer = cli(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"]);
        if answer.trim() != "OK" {
            return Err(format!("CLUSTER FAILOVER TAKEOVER on {replica}: {answer}"));
        }
        Ok(replica)
    }

    /// Replicas in sync with the master on `port`.
    pub fn replicas_online(&self, port: u16) -> usize {
        cli(port, &["INFO", "replication"])
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
    }

    /// `host:port` of every node, as `storage.redis_cluster_nodes` takes them.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// Every live node says `cluster_state:ok`.
    pub fn is_ok(&self) -> bool {
        self.nodes
            .iter()
            .filter(|(_, child)| child.is_some())
            .all(|(port, _)| cli(*port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    }

    /// The port of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<u16> {
        let live = self.nodes.iter().find(|(_, c)| c.is_some())?.0;
        let nodes = cli(live, &["CLUSTER", "NODES"]);
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                return None;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(l), Ok(h)) if l <= slot && slot <= h)
            });
            serves.then_some(node_port(fields[1])?)
        })
    }

    /// Kills the node on `port` (a master's failure: its replica is promoted after the node
    /// timeout).
    pub fn kill(&mut self, port: u16) {
        if let Some((_, child)) = self.nodes.iter_mut().find(|(p, _)| *p == port)
            && let Some(mut child) = child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Sentinel (`redis-server sentinel.conf --sentinel`) watching one master under
/// `name`, alone (quorum 1), with a short down-after so that a killed master's replica is
/// promoted within seconds. Stopped (and its files removed) when dropped.
pub struct RedisSentinel {
    port: u16,
    name: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisSentinel {
    pub fn start(name: &str, master: &RedisServer, down_after_ms: u64) -> Result<Self, String> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!(
            "teams-router-sentinel-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // Sentinel rewrites its configuration file as it learns: it must be its own.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {name} {down_after_ms}\n\
                 sentinel failover-timeout {name} {failover}\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.display(),
                master = master.port(),
                failover = down_after_ms * 3,
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server --sentinel cannot start: {e}"))?;
        let sentinel = Self {
            port,
            name: name.to_owned(),
            dir,
            child: Some(child),
        };
        wait_for_port(port)?;
        Ok(sentinel)
    }

    /// `redis-sentinel://…` as `storage.redis_url` takes it.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName={}",
            self.port, self.name
        )
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let answer = cli(
            self.port,
            &["SENTINEL", "get-master-addr-by-name", &self.name],
        );
        answer.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `command` (a `redis-server`) with `dir` as its working directory, quietly.
fn spawn_in(mut command: Command, dir: &std::path::Path) -> Result<Child, String> {
    command
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server cannot start (is it installed?): {e}"))
}

/// `total_commands_processed` of the server on `port`.
pub fn commands_processed(port: u16) -> u64 {
    cli(port, &["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// The port of a `CLUSTER NODES` line's address field (`ip:port@bus-port`).
fn node_port(address: &str) -> Option<u16> {
    address.split(['@', ':']).nth(1)?.parse().ok()
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for_port(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("redis-server did not listen on {port} within 10 s"))
}
