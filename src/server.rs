//! `sidekey serve`: opens the store, binds the three planes, and drains them on shutdown.
//!
//! Start-up order: master key → store → catalog (first snapshot) → listeners bound → ready.
//! Shutdown: `/readyz` turns 503 at once, listeners stop accepting, in-flight proxy requests
//! and control calls get `shutdown_grace` to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::config::{ServeConfig, StoreChoice};
use crate::control::{self, ControlToken, GrpcListener, TenantApi};
use crate::intercept::{InterceptCa, Leaves};
use crate::proxy::{self, Proxy, ProxyConfig};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;
use crate::store::health::StoreHealth;
use crate::store::master_key::{MasterKeySource, MasterKeys};
use crate::tenants::Catalog;
use crate::tenants_file::{QUIET_PERIOD, TenantsFile, TenantsFileStatus};
use crate::upstream::{self, UpstreamConfig};
use crate::vendors::Tester;
use crate::vendors::m3ter::broker::{BrokerConfig, TokenBroker};
use crate::vendors::m3ter::exchange::HttpExchange;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Listen {
        addr: String,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    MasterKey(String),
    #[error("the tenants file was rejected: {0}")]
    TenantsFile(String),
    #[error("cannot open the store in {dir}: {message}")]
    Store { dir: String, message: String },
    #[error("HTTPS interception: {0}")]
    InterceptCa(#[from] crate::intercept::CaError),
}

/// A running sidekey.
pub struct Running {
    pub proxy_addr: SocketAddr,
    /// `http://IP:PORT` or `unix:/path`, as the CLI's `--server` takes it.
    pub grpc_url: String,
    pub admin_addr: SocketAddr,
    pub catalog: Arc<Catalog>,
    /// What the `--tenants-file` watcher has applied or rejected, when one is configured.
    pub tenants_file: Option<watch::Receiver<TenantsFileStatus>>,
    readiness: Readiness,
    stop: watch::Sender<bool>,
    /// Proxy and control plane: drained first.
    tasks: JoinSet<()>,
    stop_admin: watch::Sender<bool>,
    admin: tokio::task::JoinHandle<()>,
    grace: Duration,
    /// Flushed once the proxy has drained, so the last requests' spans are exported.
    tracing: Option<crate::telemetry::Tracing>,
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            flag,
            source,
        })
}

/// Starts every plane; returns once they are bound and ready.
pub async fn start(config: ServeConfig) -> Result<Running, StartError> {
    let source = match (&config.master_key_file, &config.master_key) {
        (Some(_), Some(_)) => {
            return Err(StartError::Config(
                "give the master key with --master-key-file or SIDEKEY_MASTER_KEY, not both".into(),
            ));
        }
        (Some(path), None) => MasterKeySource::File(path.clone()),
        (None, Some(value)) => MasterKeySource::Value(value.clone()),
        (None, None) => MasterKeySource::Generate,
    };
    let data_dir = config.data_dir.clone();
    // The recorder must exist before the store sets its health gauge.
    let _ = crate::admin::metrics_handle();
    let choice = resolve_store(&config, &source)?;
    let store_place = match &choice {
        StoreChoice::Embedded => config.data_dir.display().to_string(),
        StoreChoice::Etcd { config, .. } => {
            format!(
                "etcd {} under {}",
                config.endpoints.join(","),
                config.prefix
            )
        }
    };
    // Key loading and opening redb are blocking file work.
    let (store, store_health) = tokio::task::spawn_blocking(move || {
        let keys = MasterKeys::load(&source, &data_dir)
            .map_err(|e| StartError::MasterKey(e.to_string()))?;
        let opened: (Arc<dyn Store>, StoreHealth) = match choice {
            StoreChoice::Embedded => {
                let store =
                    EmbeddedStore::open(&data_dir, keys).map_err(|e| StartError::Store {
                        dir: data_dir.display().to_string(),
                        message: e.to_string(),
                    })?;
                let health = store.health();
                (Arc::new(store), health)
            }
            StoreChoice::Etcd { config, .. } => {
                let store = EtcdStore::new(*config, keys, Some(&data_dir))
                    .map_err(|e| StartError::Config(e.to_string()))?;
                let health = store.health();
                (Arc::new(store), health)
            }
        };
        Ok::<_, StartError>(opened)
    })
    .await
    .map_err(|e| StartError::Config(format!("start-up task failed: {e}")))??;
    let catalog = Arc::new(Catalog::open(store).await.map_err(|e| StartError::Store {
        dir: store_place,
        message: e.to_string(),
    })?);
    catalog.follow();
    // Declared tenants are in force before any listener accepts a request.
    let mut tenants_file = match &config.tenants_file {
        Some(path) => {
            let mut file = TenantsFile::new(path.clone(), &config.data_dir, catalog.clone())
                .max_delete_percent(config.tenants_file_max_delete)
                .quiet_period(QUIET_PERIOD.min(config.tenants_file_interval));
            file.apply_at_start(config.tenants_file_interval)
                .await
                .map_err(StartError::TenantsFile)?;
            Some(file)
        }
        None => None,
    };
    let token = config
        .grpc_token_file
        .as_deref()
        .map(ControlToken::from_file)
        .transpose()
        .map_err(StartError::Config)?;

    let intercept = match &config.intercept_ca {
        Some(files) => {
            let ca = InterceptCa::load(&files.cert, &files.key, files.allow_unconstrained)?;
            if !ca.is_constrained() {
                tracing::warn!(cert = %files.cert.display(),
                    "the interception CA has no name constraints: clients trusting it accept \
                     its certificates for any domain");
            }
            ca.warn_uncovered(&crate::cli::ca::permitted_domains(), &files.cert);
            Some(Arc::new(Leaves::new(ca)))
        }
        None => None,
    };

    let proxy_listener = bind(config.proxy_listen, "--proxy-listen").await?;
    let admin_listener = bind(config.admin_listen, "--admin-listen").await?;
    let grpc_listener = GrpcListener::bind(&config.grpc_listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: format!("{:?}", config.grpc_listen),
            flag: "--grpc-listen",
            source,
        })?;
    let proxy_addr = local_addr(&proxy_listener);
    let admin_addr = local_addr(&admin_listener);
    let grpc_url = grpc_listener.client_url();

    let (stop, stopped) = watch::channel(false);
    let on_stop = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let readiness = Readiness::default().with_store_health(store_health);
    let mut tasks = JoinSet::new();

    // Data plane: one pooled upstream client shared by the proxy, the token exchange and
    // TestTenant; one token broker whose cache follows the snapshot.
    let client = upstream::Client::new(UpstreamConfig {
        extra_ca_files: config.upstream_ca.clone(),
        connect_to: config.connect_to.clone(),
        ..UpstreamConfig::default()
    })
    .map_err(|e| StartError::Config(e.to_string()))?;
    // The recorder must exist before the proxy registers its metric handles.
    let _ = crate::admin::metrics_handle();
    crate::vendors::m3ter::client::describe_metrics();
    let broker = Arc::new(TokenBroker::new(
        Arc::new(HttpExchange::new(client.clone())),
        BrokerConfig::default(),
    ));
    let _retain = broker.spawn_retain(catalog.snapshot());
    let tracing = match &config.otlp_endpoint {
        Some(endpoint) => {
            let endpoint = crate::telemetry::parse_endpoint(endpoint)
                .map_err(|e| StartError::Config(format!("--otlp-endpoint: {e}")))?;
            let tracing =
                crate::telemetry::Tracing::start(&endpoint).map_err(StartError::Config)?;
            tracing::info!(%endpoint, "exporting traces over OTLP");
            Some(tracing)
        }
        None => None,
    };
    let proxy = Proxy::new(
        catalog.snapshot(),
        client.clone(),
        broker.clone(),
        ProxyConfig {
            tenant_metrics: config.metrics_tenant_label,
            body_memory_budget: config.body_memory_budget,
            intercept,
            tracing: tracing.clone(),
            ..ProxyConfig::default()
        },
    );
    readiness.watch_proxy_slots(proxy.connection_slots());
    tasks.spawn(proxy::serve(proxy_listener, proxy, on_stop()));

    let tester = Tester {
        client,
        tokens: broker,
    };
    let api = TenantApi::new(catalog.clone(), Arc::new(tester));
    let grpc_stop = on_stop();
    tasks.spawn(async move {
        if let Err(e) = control::serve(grpc_listener, api, token, grpc_stop).await {
            tracing::error!(error = %e, "control plane stopped");
        }
    });
    let tenants_file_status = tenants_file.as_ref().map(TenantsFile::status);
    if let Some(file) = tenants_file.take() {
        tasks.spawn(file.watch(config.tenants_file_interval, on_stop()));
    }

    // The admin plane outlives the drain so probes see /readyz answer 503; it stops last.
    let (stop_admin, mut admin_stopped) = watch::channel(false);
    let admin_ready = readiness.clone();
    let admin = tokio::spawn(async move {
        let stopped = async move {
            let _ = admin_stopped.wait_for(|s| *s).await;
        };
        admin::serve(admin_listener, admin_ready, stopped).await;
    });
    let mut loaded = catalog.loaded();
    if *loaded.borrow() {
        readiness.set(true);
        tracing::info!(proxy = %proxy_addr, grpc = %grpc_url, admin = %admin_addr,
            tenants = catalog.snapshot().load().len(), "sidekey ready");
    } else {
        // Ready with the first load; `drain` raises `stop` before clearing readiness, so
        // whichever runs last, a draining sidekey stays not ready.
        let readiness = readiness.clone();
        let mut stopping = stop.subscribe();
        let snapshot = catalog.snapshot();
        tasks.spawn(async move {
            let first_load = tokio::select! {
                loaded = loaded.wait_for(|l| *l) => loaded.is_ok(),
                _ = stopping.wait_for(|s| *s) => false,
            };
            if first_load {
                readiness.set(true);
                if *stopping.borrow() {
                    readiness.set(false);
                } else {
                    tracing::info!(
                        tenants = snapshot.load().len(),
                        "sidekey ready: first load from the store"
                    );
                }
            }
        });
        tracing::info!(proxy = %proxy_addr, grpc = %grpc_url, admin = %admin_addr,
            "sidekey listening; not ready until the store can be loaded");
    }
    Ok(Running {
        proxy_addr,
        grpc_url,
        admin_addr,
        catalog,
        tenants_file: tenants_file_status,
        readiness,
        stop,
        tasks,
        stop_admin,
        admin,
        grace: config.shutdown_grace,
        tracing,
    })
}

/// Checks the store settings against the rest and reads the etcd password file.
fn resolve_store(config: &ServeConfig, key: &MasterKeySource) -> Result<StoreChoice, StartError> {
    let StoreChoice::Etcd {
        config: etcd,
        password_file,
    } = &config.store
    else {
        return Ok(StoreChoice::Embedded);
    };
    if config.tenants_file.is_some() {
        return Err(StartError::Config(
            "--tenants-file cannot be used with --store etcd: in fleet mode tenants are written \
             through the control plane (or `sidekey store copy`) into etcd, once for every \
             replica"
                .into(),
        ));
    }
    if matches!(key, MasterKeySource::Generate) {
        return Err(StartError::Config(
            "--store etcd needs the fleet's master key in --master-key-file or \
             SIDEKEY_MASTER_KEY: a key generated per replica could not open the others' records"
                .into(),
        ));
    }
    let etcd = etcd
        .as_ref()
        .clone()
        .with_password_file(password_file.as_deref())
        .map_err(StartError::Config)?;
    etcd.validate().map_err(StartError::Config)?;
    Ok(StoreChoice::Etcd {
        config: Box::new(etcd),
        password_file: None,
    })
}

fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl Running {
    /// Starts the drain: `/readyz` answers 503 from now on and the proxy and control
    /// listeners stop accepting; in-flight requests go on. [`Running::shutdown`] waits.
    pub fn drain(&self) {
        self.stop.send_replace(true);
        self.readiness.set(false);
    }

    /// Drains, gives in-flight work the grace period, then stops the admin endpoints.
    /// Returns whether everything finished within the grace period.
    pub async fn shutdown(mut self) -> bool {
        self.drain();
        let finished = tokio::time::timeout(self.grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !finished {
            tracing::warn!(grace = ?self.grace, "in-flight work did not finish within the shutdown grace; aborting it");
            self.tasks.abort_all();
        }
        if let Some(tracing) = &self.tracing {
            tracing.shutdown().await;
        }
        self.stop_admin.send_replace(true);
        let _ = self.admin.await;
        finished
    }
}
