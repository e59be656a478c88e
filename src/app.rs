//! The process: wires the rooms together, binds the listeners, and shuts down gracefully on
//! SIGTERM/SIGINT (stop accepting, let running turns finish within the deadline, exit).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::secrets::{Sealer, SecretError};
use crate::admin::setup::SetupChecker;
use crate::admin::{self, Admin, AdminParts, Vault};
use crate::auth::{KeyStore, Verifier, Verifiers};
use crate::backend::BackendClient;
use crate::backend::egress::EgressPolicy;
use crate::config::Config;
use crate::connector::{self, Connector, TokenProvider};
use crate::conversation::admission::Gate;
use crate::conversation::session::HistoryLimits;
use crate::conversation::{Admission, ConversationSettings, Directory, Persistence};
use crate::front::{self, Front, ListenerLimits, Ops};
use crate::ledger::addresses::AddressBook;
use crate::ledger::contacts::ContactBook;
use crate::ledger::events::EventLog;
use crate::notify::broadcasts::{BroadcastParts, BroadcastSettings, Broadcasts};
use crate::notify::graph::Graph;
use crate::notify::workflows::Workflows;
use crate::notify::{Destinations, Tenants};
use crate::ownership::{Owner, OwnerSettings};
use crate::registry::Registry;
use crate::reply::ReplyServices;
use crate::reply::streaming::StreamSettings;
use crate::store::partitions::PartitionLog;
use crate::store::writer::{Journal, SnapshotPolicy, Snapshots};
use crate::store::{JournalEntry, Store, StoreError, StoreHealth};
use crate::telemetry::{self, Readiness};

/// Sent when the backend fails; the user always hears back.

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Metrics(#[from] telemetry::RecorderError),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot start the conversation supervisor: {0}")]
    Supervisor(#[from] ractor::SpawnErr),
    #[error("signal handling: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("secrets at rest: {0}")]
    Secrets(#[from] SecretError),
    #[error("{0}")]
    Config(String),
}

/// Logs go to stderr (`RUST_LOG` filters, default `info`); stdout carries the listening line.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Everything but the listeners: the rooms wired together, ready to take activities.
pub struct Router {
    pub front: Arc<Front>,
    pub directory: Arc<Directory>,
    pub keys: Arc<KeyStore>,
    pub readiness: Arc<Readiness>,
    pub metrics: PrometheusHandle,
    pub snapshots: Arc<Snapshots>,
    /// With a shared Redis store: this instance's partitions.
    owner: Option<Arc<Owner>>,
    supervisor_task: tokio::task::JoinHandle<()>,
    /// Stops the store's background tasks (snapshot writer, journal writer, health probe).
    stop_store_tasks: watch::Sender<bool>,
    store_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Router {
    /// Installs the process-wide metrics recorder (once per process) and starts the supervisor.
    /// `env` looks up the environment variables the config names (the master key's).
    pub async fn build(
        config: &Config,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Self, AppError> {
        Self::build_with_metrics(config, env, telemetry::install()?).await
    }

    /// [`Router::build`] recording into the recorder of `metrics` (already the current one).
    pub(crate) async fn build_with_metrics(
        config: &Config,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        metrics: PrometheusHandle,
    ) -> Result<Self, AppError> {
        let readiness = Arc::new(Readiness::default());
        let http = connector::http_client(&config.connector)?;
        let keys = Arc::new(KeyStore::new(
            http.clone(),
            config.microsoft.openid_metadata_url.clone(),
            Arc::clone(&readiness),
        ));
        let verifier = Arc::new(Verifier::new(Arc::clone(&keys), &config.microsoft));
        let http_for_clouds = http.clone();
        let tokens = TokenProvider::new(
            http.clone(),
            &config.microsoft.login_url,
            &config.microsoft.oauth_scope,
        );
        let transport = connector::transport::Transport::new(&config.connector, env, http.clone())
            .map_err(|e| AppError::Tls(e.to_string()))?;
        let connector = Arc::new(Connector::new(transport, tokens, &config.connector));
        for integration in &config.integrations {
            if integration.bot_framework_app_id.is_none() && !integration.development {
                tracing::warn!(
                    integration = %integration.id,
                    "no botFrameworkAppId and not development = true: this integration accepts no activity"
                );
            }
        }
        let egress = Arc::new(
            EgressPolicy::new(
                &config.security.backend_allow,
                &config.security.backend_deny,
            )
            .map_err(AppError::Config)?,
        );
        let (stop_store_tasks, store_stopped) = watch::channel(false);
        let instance_id = config.storage.instance_id();
        let store = Arc::new(Store::open(&config.storage, &instance_id).await?);
        let health = Arc::new(StoreHealth::default());

        let sealer = Arc::new(Sealer::from_config(&config.security, &config.storage, env)?);
        let sealer_for_workflows = Arc::clone(&sealer);
        if store.is_shared() && config.security.master_key_env.is_none() {
            tracing::warn!(
                "storage is shared but security.master_key_env is not set: every instance must use the same master key file"
            );
        }
        let vault = Vault {
            store: Arc::clone(&store),
            health: Arc::clone(&health),
            sealer,
        };
        admin::check_master_key(&vault).await;
        let registry = Arc::new(Registry::default());
        if let Err(error) = admin::load(&vault, &registry, None, config, true).await {
            tracing::warn!(%error, "stored bots and integrations cannot be read; starting with the config's records until the store answers");
            admin::load_seeds_only(&registry, config);
        }
        readiness.add_check(registry.readiness_check());
        readiness.set_needs_keys(registry.needs_signing_keys());
        let (events, event_sink, events_task) = EventLog::start(
            Arc::clone(&registry),
            Arc::clone(&store),
            Arc::clone(&health),
            config.admin.event_log_size,
            store_stopped.clone(),
        )
        .await;
        let contacts = ContactBook::load(
            Arc::clone(&store),
            Arc::clone(&health),
            Duration::from_millis(config.admin.contact_touch_interval_ms),
        )
        .await;
        let addresses = AddressBook::load(Arc::clone(&store), Arc::clone(&health)).await;
        let tenants = Tenants::load(Arc::clone(&store), Arc::clone(&health)).await;
        let destinations = Destinations::load(Arc::clone(&store), Arc::clone(&health)).await;
        let services = Arc::new(ReplyServices {
            registry: Arc::clone(&registry),
            connector: Arc::clone(&connector),
            welcome_message: config.connector.welcome_message.clone(),
            apology: config.backend.apology.clone(),
            streaming: StreamSettings {
                max_message_bytes: config.connector.max_message_bytes,
                ..StreamSettings::from(&config.streaming)
            },
            events: event_sink.clone(),
            contacts: Some(Arc::clone(&contacts)),
            addresses: Some(Arc::clone(&addresses)),
            backends: BackendClient {
                http: BackendClient::http_client(
                    &egress,
                    Duration::from_millis(config.backend.connect_timeout_ms),
                )?,
                egress: Arc::clone(&egress),
                webhook_timeout: Duration::from_millis(config.backend.webhook_timeout_ms),
                openai_timeout: Duration::from_millis(config.backend.openai_timeout_ms),
                openai_history_max_chars: config.backend.openai_history_max_chars,
            },
            exchanges: Default::default(),
        });
        let snapshots = Snapshots::new(
            Arc::clone(&store),
            Arc::clone(&health),
            SnapshotPolicy::of(&config.storage),
        );
        let mut store_tasks = vec![
            events_task,
            tokio::spawn(Arc::clone(&snapshots).run(store_stopped.clone())),
            tokio::spawn(watch_store(
                Arc::clone(&store),
                Arc::clone(&health),
                store_stopped.clone(),
            )),
        ];
        let durable = config.storage.durable_accept();
        // A shared store records activities in its partitions' streams instead.
        let (journal, recovered) = if durable && !store.is_shared() {
            let pending = store.pending_journal().await?;
            let first_seq = pending.last().map(|e| e.seq + 1).unwrap_or(0);
            let (journal, task) = Journal::start(
                Arc::clone(&store),
                Arc::clone(&health),
                config.storage.journal_batch_max,
                Duration::from_secs(config.storage.dedup_ttl_secs),
                first_seq,
                store_stopped.clone(),
            );
            store_tasks.push(task);
            readiness.add_check(health.readiness_check());
            (Some(journal), pending)
        } else {
            (None, Vec::new())
        };
        tracing::info!(
            backend = ?config.storage.backend,
            durable_accept = durable,
            instance = %instance_id,
            "store opened"
        );
        let partition_log = PartitionLog::new(Arc::clone(&store), config.storage.partitions);
        let persistence = Arc::new(Persistence {
            snapshots: Arc::clone(&snapshots),
            journal: journal.clone(),
            limits: HistoryLimits {
                max_entries: config.conversation.history_max_turns,
                max_bytes: config.conversation.history_max_bytes,
            },
            partitions: partition_log.clone(),
        });
        let settings = ConversationSettings {
            mailbox_capacity: config.conversation.mailbox_capacity,
            max_active: config.conversation.max_active,
            idle_timeout: Duration::from_millis(config.conversation.idle_timeout_ms),
            rest_after: Some(config.conversation.rest_after_ms)
                .filter(|&ms| ms > 0 && ms < config.conversation.idle_timeout_ms)
                .map(Duration::from_millis),
            max_awake: Some(config.conversation.max_awake).filter(|&max| max > 0),
            dedup_window: config.conversation.dedup_window,
            panic_trigger: config.testing.panic_trigger.clone(),
            persistence,
            stopping: Arc::default(),
        };
        let (directory, supervisor_task) = Directory::start(settings, services).await?;
        recover(&directory, journal.as_deref(), recovered);
        let owner = match partition_log {
            Some(log) => {
                let (owner, tasks) = Owner::start(
                    log,
                    Arc::clone(&directory),
                    OwnerSettings {
                        instance_id: &instance_id,
                        lease_ms: config.storage.lease_ms,
                        dedup_ttl: Duration::from_secs(config.storage.dedup_ttl_secs),
                        durable_accept: durable,
                    },
                    connector.pacer().share(),
                    store_stopped.clone(),
                )
                .await;
                store_tasks.extend(tasks);
                move_legacy_journals(&store, &owner).await;
                if durable {
                    readiness.add_check(health.readiness_check());
                }
                Some(owner)
            }
            None => None,
        };
        let broadcasts = Broadcasts::load(BroadcastParts {
            events: event_sink.clone(),
            store: Arc::clone(&store),
            health: Arc::clone(&health),
            connector: Arc::clone(&connector),
            addresses: Arc::clone(&addresses),
            registry: Arc::clone(&registry),
            destinations: Arc::clone(&destinations),
            workflows: Workflows::new(
                BackendClient::http_client(
                    &egress,
                    Duration::from_millis(config.backend.connect_timeout_ms),
                )?,
                Arc::clone(&egress),
                admin::workflow_opener(Arc::clone(&sealer_for_workflows)),
            ),
            settings: BroadcastSettings {
                max_share: config.broadcast.max_share,
            },
        })
        .await;
        store_tasks.push(tokio::spawn(
            Arc::clone(&broadcasts).adopt(store_stopped.clone()),
        ));
        let setup = SetupChecker::new(
            Arc::new(TokenProvider::new(
                http,
                &config.microsoft.login_url,
                &config.microsoft.oauth_scope,
            )),
            Duration::from_millis(config.admin.setup_timeout_ms),
        );
        let admin = Admin::new(
            AdminParts {
                registry: Arc::clone(&registry),
                directory: Arc::clone(&directory),
                vault,
                events,
                sink: event_sink.clone(),
                contacts,
                setup,
                readiness: Arc::clone(&readiness),
                addresses: Arc::clone(&addresses),
                tenants: Arc::clone(&tenants),
                destinations: Arc::clone(&destinations),
                broadcasts: Arc::clone(&broadcasts),
                graph: Arc::new(Graph::new(
                    connector::http_client(&config.connector)?,
                    Arc::clone(&connector),
                )),
                connector: Arc::clone(&connector),
                egress,
            },
            config,
        );
        if store.is_shared() {
            store_tasks.push(tokio::spawn(
                Arc::clone(&admin).run_sync(config.clone(), store_stopped.clone()),
            ));
        }
        let admission = Arc::new(Gate::new(config.admission.clone()));
        store_tasks.push(tokio::spawn(
            Arc::clone(&admission).watch_runtime(store_stopped.clone()),
        ));
        let front = Arc::new(Front {
            admin,
            serves_admin: config.admin.listen.is_none(),
            events: event_sink,
            registry,
            tenants,
            destinations,
            addresses: Arc::clone(&addresses),
            verifiers: Arc::new(Verifiers::new(
                verifier,
                &config.microsoft,
                http_for_clouds,
                Arc::clone(&readiness),
            )),
            directory: Arc::clone(&directory),
            connector,
            body_limit: config.server.body_limit_bytes,
            body_read_timeout: Duration::from_millis(config.server.body_read_timeout_ms),
            admission,
            invoke_timeout: Duration::from_millis(config.conversation.invoke_timeout_ms),
            retry_after_secs: config.conversation.retry_after_secs,
            required_endorsements: config.microsoft.required_endorsements.clone(),
            journal,
            owner: owner.clone(),
            durable_accept: durable,
            on_store_unavailable: config.storage.on_unavailable,
        });
        Ok(Self {
            front,
            directory,
            keys,
            readiness,
            metrics,
            snapshots,
            owner,
            supervisor_task,
            stop_store_tasks,
            store_tasks,
        })
    }

    /// Waits (up to `deadline`) for accepted activities to finish, then stops the actors.
    pub async fn drain(self, deadline: Duration) {
        let until = crate::clock::now() + deadline;
        if let Some(owner) = &self.owner {
            owner.stop_reading();
        }
        while self.directory.pending() > 0 && crate::clock::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.directory.pending();
        if left > 0 {
            tracing::warn!(
                left,
                "shutdown deadline reached with activities still pending"
            );
        }
        // Each conversation stops on its own first, so that what it gathered since its last
        // snapshot reaches the writer (a supervisor's stop alone would not run their `post_stop`);
        // one still awaiting a turn hands it over at once, and stops when the turn ends.
        self.directory.stop_taking_turns();
        self.directory
            .supervisor()
            .stop_children_and_wait(Some("shutdown".into()), Some(Duration::from_secs(5)))
            .await;
        self.directory.supervisor().stop(Some("shutdown".into()));
        let _ = self.supervisor_task.await;
        self.snapshots.flush(Duration::from_secs(5)).await;
        // Released only now: the next holder reads the snapshots written above.
        if let Some(owner) = &self.owner {
            owner.release_all(Duration::from_secs(5)).await;
        }
        let _ = self.stop_store_tasks.send(true);
        for task in self.store_tasks {
            let _ = task.await;
        }
    }
}

/// Earlier versions journaled each instance's accepted activities under its own name; what they
/// left unanswered moves to the partitions' streams once (any instance may find it: the move is
/// idempotent, the dedup claim of each activity makes a second copy a duplicate).
async fn move_legacy_journals(store: &Store, owner: &Owner) {
    let Some(redis) = store.redis() else {
        return;
    };
    let journals = match redis.legacy_journals().await {
        Ok(journals) => journals,
        Err(error) => {
            tracing::warn!(%error, "journals of earlier versions cannot be read; they are looked for at the next start");
            return;
        }
    };
    for (key, entries) in journals {
        let mut moved = 0usize;
        let mut complete = true;
        for entry in &entries {
            let body = bytes::Bytes::from(entry.body.clone().into_bytes());
            let integration: Arc<str> = entry.integration.as_str().into();
            match owner
                .accept(
                    &integration,
                    &entry.conversation_id,
                    &entry.activity_id,
                    &body,
                    None,
                )
                .await
            {
                Ok(_) => moved += 1,
                Err(error) => {
                    tracing::warn!(%error, %key, "a journal of an earlier version is not moved yet");
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            if let Err(error) = redis.delete_raw(&key).await {
                tracing::warn!(%error, %key, "a moved journal could not be removed");
            }
            tracing::info!(%key, moved, "moved a journal of an earlier version to the partitions");
            metrics::counter!(crate::telemetry::JOURNAL_RECOVERED).increment(moved as u64);
        }
    }
}

/// Runs again what was acknowledged but not answered before the last stop, in acceptance order.
fn recover(directory: &Directory, journal: Option<&Journal>, entries: Vec<JournalEntry>) {
    let (Some(journal), false) = (journal, entries.is_empty()) else {
        return;
    };
    tracing::warn!(
        count = entries.len(),
        "replaying accepted activities that were not answered before the last stop"
    );
    metrics::counter!(crate::telemetry::JOURNAL_RECOVERED).increment(entries.len() as u64);
    for entry in entries {
        let integration: Arc<str> = entry.integration.as_str().into();
        let activity = match crate::activity::parse_turn(entry.body.as_bytes()) {
            Ok(activity) => Box::new(activity),
            // Journaled after the same parse succeeded: only a damaged entry gets here.
            Err(error) => {
                tracing::error!(%error, seq = entry.seq, "journaled activity cannot be read; dropped");
                journal.complete(entry.seq);
                continue;
            }
        };
        let admission = directory.accept_recorded(
            &integration,
            &entry.conversation_id,
            &entry.activity_id,
            activity,
            Some(crate::store::Receipt::Journal(entry.seq)),
        );
        if !matches!(admission, Admission::Accepted(_)) {
            journal.complete(entry.seq);
        }
    }
}

/// Probes the store (Redis always, the embedded one while it fails), so that readiness and
/// metrics follow its state without traffic; the embedded store also drops expired records here.
async fn watch_store(
    store: Arc<Store>,
    health: Arc<StoreHealth>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sweep_due = crate::clock::now() + Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A shared store can fail while this instance is idle; readiness must show it anyway.
        if store.is_shared() || !health.is_up() {
            let result = store.ping().await;
            health.observe("ping", &result);
        }
        if crate::clock::now() >= sweep_due {
            sweep_due = crate::clock::now() + Duration::from_secs(60);
            if let Err(error) = store.sweep_expired().await {
                tracing::warn!(%error, "expired records could not be swept");
            }
        }
    }
}

/// A router serving on its listeners, until [`Serving::shutdown`] drains it.
pub struct Serving {
    /// The traffic listener's address (activities and the management API).
    pub addr: SocketAddr,
    /// The ops listener's address (`/metrics`, `/healthz`, `/readyz`).
    pub ops_addr: SocketAddr,
    /// The management API's own listener (`admin.listen`), if it has one.
    pub admin_addr: Option<SocketAddr>,
    /// Whether the traffic listener speaks TLS.
    pub tls: bool,
    router: Router,
    /// Stops the traffic listener (first step of a shutdown).
    stop_front: watch::Sender<bool>,
    front_task: tokio::task::JoinHandle<()>,
    /// Stops the ops listener and the background tasks (last step).
    stop_background: watch::Sender<bool>,
    background_tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: Duration,
}

impl Serving {
    /// Builds the router, binds both listeners and starts the background tasks.
    pub async fn start(
        config: &Config,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Self, AppError> {
        Self::start_with_metrics(config, env, telemetry::install()?).await
    }

    /// [`Serving::start`] recording into the recorder of `metrics` (already the current one).
    pub(crate) async fn start_with_metrics(
        config: &Config,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
        metrics: PrometheusHandle,
    ) -> Result<Self, AppError> {
        let router = Router::build_with_metrics(config, env, metrics).await?;
        let registry = Arc::clone(&router.front.registry);
        let readiness = Arc::clone(&router.readiness);
        let keys = Arc::clone(&router.keys);
        let metrics = router.metrics.clone();

        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(front::tls_acceptor(cert, key).map_err(AppError::Tls)?),
            _ => None,
        };
        let listener = bind("server.listen", &config.server.listen).await?;
        let ops_listener = bind("server.ops_listen", &config.server.ops_listen).await?;
        let admin_listener = match &config.admin.listen {
            Some(admin) => Some(bind("admin.listen", admin).await?),
            None => None,
        };
        let addr = local_addr(&listener);
        let ops_addr = local_addr(&ops_listener);
        let admin_addr = admin_listener.as_ref().map(local_addr);
        readiness.set_listening();
        tracing::info!(%addr, %ops_addr, integrations = registry.integrations().len(), "teams-router listening");

        let (stop_front, front_stopped) = watch::channel(false);
        let (stop_background, background_stopped) = watch::channel(false);
        let mut background_tasks = Vec::new();
        {
            // Integrations created later through the API may be the first to need signing keys.
            let mut stopped = background_stopped.clone();
            let interval = Duration::from_secs(config.microsoft.key_refresh_interval_secs.max(60));
            let keys = Arc::clone(&keys);
            background_tasks.push(tokio::spawn(async move {
                while !registry.needs_signing_keys() {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopped.changed() => return,
                    }
                }
                keys.run_refresher(interval, stopped).await;
            }));
        }
        {
            let connector = Arc::clone(&router.front.connector);
            let admission = Arc::clone(&router.front.admission);
            let mut stopped = background_stopped.clone();
            background_tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            connector.pacer().forget_idle();
                            admission.forget_idle();
                        }
                        _ = stopped.changed() => return,
                    }
                }
            }));
        }
        background_tasks.push(tokio::spawn(telemetry::run_upkeep(
            metrics.clone(),
            background_stopped.clone(),
        )));

        let limits = ListenerLimits {
            max_connections: config.server.max_connections,
            header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
        };
        let drain = Duration::from_millis(config.server.shutdown_timeout_ms);
        if let Some(admin_listener) = admin_listener {
            let handler = Arc::new(front::AdminListener {
                admin: Arc::clone(&router.front.admin),
            });
            background_tasks.push(tokio::spawn(front::serve(
                admin_listener,
                tls.clone(),
                handler,
                limits,
                front_stopped.clone(),
                Duration::from_secs(1),
                None,
            )));
        }
        let front_task = tokio::spawn(front::serve(
            listener,
            tls.clone(),
            Arc::clone(&router.front),
            limits,
            front_stopped,
            drain,
            (config.admission.target_request_wait_ms > 0).then(|| router.front.admission.waits()),
        ));
        let ops = Arc::new(Ops { metrics, readiness });
        background_tasks.push(tokio::spawn(front::serve(
            ops_listener,
            None,
            ops,
            limits,
            background_stopped,
            Duration::from_secs(1),
            None,
        )));
        Ok(Self {
            addr,
            ops_addr,
            admin_addr,
            tls: tls.is_some(),
            router,
            stop_front,
            front_task,
            stop_background,
            background_tasks,
            drain,
        })
    }

    /// The rooms behind the listeners.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The graceful stop: no new activities, running turns finished (up to
    /// `server.shutdown_timeout_ms`), snapshots flushed, then the ops listener closed.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new activities; finishing running turns");
        self.router.readiness.set_draining();
        self.router.front.connector.stop_retrying();
        let _ = self.stop_front.send(true);
        let _ = self.front_task.await;
        self.router.drain(self.drain).await;
        let _ = self.stop_background.send(true);
        for task in self.background_tasks {
            let _ = task.await;
        }
        tracing::info!("stopped");
    }
}

pub async fn run(config: Config) -> Result<(), AppError> {
    let serving = Serving::start(&config, &|name| std::env::var(name).ok()).await?;
    let scheme = if serving.tls { "https" } else { "http" };
    // One line on stdout that scripts and tests read to find the ports.
    let mut stdout = std::io::stdout();
    let admin = serving
        .admin_addr
        .map(|a| format!(", admin {scheme}://{a}"))
        .unwrap_or_default();
    let _ = writeln!(
        stdout,
        "teams-router listening on {scheme}://{} (ops http://{}{admin})",
        serving.addr, serving.ops_addr
    );
    let _ = stdout.flush();
    wait_for_signal().await?;
    serving.shutdown().await;
    Ok(())
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn wait_for_signal() -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
