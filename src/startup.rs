//! Building the application from its configuration and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::upload::FormLimits;
use crate::api::{self, AppState, RequestLimits};
use crate::auth::{self, ApiKeys};
use crate::catalog::{Catalog, CatalogSettings, IndexStartup, StartEmbedder};
use crate::cluster::PgCluster;
use crate::config::ServeConfig;
use crate::embed::{BatchPolicy, Embedder, EmbedderConfig};
use crate::finetune::{FinetuneParams, JobSettings, Jobs, Trainer};
use crate::gallery::{GalleryStore, PgGallery, SqliteGallery};
use crate::index::{IndexProvider, LocalIndexes, PgIndexes};
use crate::lifecycle::memory::MemoryCluster;
use crate::lifecycle::{ModelLifecycle, Ports};
use crate::manifest::Manifest;
use crate::metrics;
use crate::preprocess::{ImageLimits, PreprocessPool, Preprocessor};
use crate::registry::{ModelVersion, Registry};
use crate::server;

/// A bound listener and a ready state: everything but the serving loop.
pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
    dump_interval: Duration,
    /// How long a connection may take to send a request's head.
    header_timeout: Duration,
    /// How long shutdown waits for requests in flight, then for a running job.
    grace: Duration,
    /// How long `/ready` answers 503 before the listener closes.
    delay: Duration,
}

/// Index dumps live here, inside the data directory.
pub(crate) const INDEX_DIR: &str = "index";
/// Fine-tuning jobs' records and scratch files.
pub(crate) const JOBS_DIR: &str = "finetune";

impl Application {
    /// Loads the active model, opens the store, makes the index ready and binds the port.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(config.knn_k >= 1, "--knn-k must be at least 1");
        anyhow::ensure!(config.max_concurrent_requests >= 1, "--max-concurrent-requests must be at least 1");
        anyhow::ensure!(config.max_form_parts >= 1, "--max-form-parts must be at least 1");
        anyhow::ensure!(config.header_read_timeout_secs >= 1, "--header-read-timeout-secs must be at least 1");
        anyhow::ensure!(
            config.max_buffered_body_bytes >= config.max_body_bytes,
            "--max-buffered-body-bytes must be at least --max-body-bytes"
        );
        anyhow::ensure!(
            config.unknown_distance.is_none_or(|d| (0.0..=2.0).contains(&d)),
            "--unknown-distance must be between 0 and 2"
        );
        let bundled = Manifest::load(&config.model)?;
        FinetuneParams::model_defaults_hold(&bundled.finetune_defaults)
            .map_err(|e| anyhow::anyhow!("{}: finetune_defaults in its manifest: {e}", config.model.display()))?;
        let metrics_handle = metrics::handle();
        let registry = Registry::new(&config.model, &config.data_dir);
        let (store, indexes, ports) = open_gallery(&config, &registry).await?;
        let limits = ImageLimits { max_side: config.max_image_side, max_decoded_bytes: config.max_decoded_bytes };
        let preprocess =
            PreprocessPool::new(Preprocessor::new(bundled.input.clone(), limits), config.preprocess_threads);
        let settings = CatalogSettings {
            start_embedder: torch_embedder(embedder_config(&config)?),
            preprocess,
            near_duplicate_distance: config.near_duplicate_distance,
            knn_k: config.knn_k,
            exact_search_limit: config.exact_search_limit,
            unknown_distance: config.unknown_distance,
        };
        let version = ModelLifecycle::adopt_active_version(&ports, &registry).await?;
        let (catalog, startup) = Catalog::open(store, indexes.as_ref(), version, settings).await?;
        let lifecycle = ModelLifecycle::new(catalog.clone(), indexes, registry, ports);
        lifecycle.join().await.context("joining the cluster")?;
        let serving = catalog.serving();
        tracing::info!(
            model = %serving.model, version = %serving.version, bundled = serving.bundled,
            trained = serving.trained, device = %serving.device, workers = serving.workers,
            precision = %serving.precision, max_batch = serving.max_batch, max_delay = ?serving.max_delay,
            cuda_available = serving.cuda_available, cuda_devices = serving.cuda_devices,
            "encoder loaded"
        );
        tracing::info!(
            source = %startup.source, reason = %startup.reason, items = startup.items, added = startup.added,
            removed = startup.removed, seconds = startup.seconds, data_dir = %config.data_dir.display(),
            "index ready"
        );
        let admin = auth::admin_token(&config)?;
        let api_keys = ApiKeys::from_config(&config)?;
        if !api_keys.required() && !config.host.is_loopback() {
            tracing::warn!(host = %config.host, "no API key is configured and the service listens beyond this machine: \
                anyone who reaches the port can add, delete and search (see --api-key and README \"Security\")");
        }
        let settings = JobSettings {
            trainer: Trainer { device: config.device.parse()?, threads: config.finetune_threads },
            memory_budget: config.finetune_memory_mib.saturating_mul(1 << 20),
            keep_runs: config.keep_runs as usize,
        };
        let jobs = Jobs::open(&config.data_dir.join(JOBS_DIR), catalog.clone(), lifecycle.clone(), settings)?;

        let listener = TcpListener::bind((config.host, config.port))
            .await
            .with_context(|| format!("binding {}:{}", config.host, config.port))?;
        let address = listener.local_addr()?;
        let limits = RequestLimits {
            max_body_bytes: config.max_body_bytes,
            max_k: config.max_k,
            form: FormLimits {
                max_parts: config.max_form_parts,
                max_part_bytes: config.max_part_bytes,
                max_text_part_bytes: config.max_text_part_bytes,
                max_images: config.max_images_per_request,
            },
            request_timeout: Duration::from_secs(config.request_timeout_secs),
            max_concurrent_requests: config.max_concurrent_requests,
            max_buffered_body_bytes: config.max_buffered_body_bytes,
            min_body_rate: config.min_body_rate,
        };
        let dump_interval = Duration::from_secs(config.index_dump_interval_secs);
        let state = AppState {
            catalog,
            lifecycle,
            limits: Arc::new(limits),
            metrics: metrics_handle,
            index_startup: Arc::new(startup),
            admin: admin.map(Arc::new),
            api_keys: Arc::new(api_keys),
            jobs,
            cors_origins: config.cors_origins.clone().into(),
            allowed_hosts: config.allowed_hosts.clone().into(),
            draining: Arc::default(),
            store_check: Arc::default(),
        };
        let grace = Duration::from_secs(config.shutdown_grace_secs);
        let delay = Duration::from_secs(config.shutdown_delay_secs);
        let header_timeout = Duration::from_secs(config.header_read_timeout_secs);
        Ok(Self { listener, address, state, dump_interval, header_timeout, grace, delay })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How the index was made ready: reloaded from its dump or rebuilt.
    pub fn index_startup(&self) -> &IndexStartup {
        &self.state.index_startup
    }

    /// Serves until `shutdown` resolves, then stops in order: `/ready` turns
    /// 503 (still serving for the shutdown delay, so a load balancer can take
    /// the instance out), then no connection is accepted; requests in flight finish (up to
    /// the grace period); a running fine-tune job stops and records how (up
    /// to the grace period again); the index is dumped, so the next start
    /// reloads it; the store folds its write-ahead log in. Every write that
    /// was answered 2xx is committed to the store before its answer, so
    /// nothing acknowledged depends on this order, only how fast the next start is.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        tracing::info!(address = %self.address, "listening");
        let (catalog, lifecycle, jobs, grace) =
            (self.state.catalog.clone(), self.state.lifecycle.clone(), self.state.jobs.clone(), self.grace);
        let dumper = (!self.dump_interval.is_zero())
            .then(|| tokio::spawn(dump_periodically(catalog.clone(), self.dump_interval)));
        let expiry = tokio::spawn(forget_expired_keys_hourly(catalog.store().clone()));
        let (draining, delay) = (self.state.draining.clone(), self.delay);
        let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            if !delay.is_zero() {
                tracing::info!(delay_secs = delay.as_secs(), "/ready answers 503; still serving until the delay ends");
                tokio::time::sleep(delay).await;
            }
            let _ = stopping_tx.send(());
        };
        let serve = server::serve(self.listener, api::router(self.state), self.header_timeout, signal);
        tokio::select! {
            () = serve => {},
            _ = async { let _ = stopping.await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_secs = grace.as_secs(), "requests still in flight after the grace period are dropped");
            }
        };
        tracing::info!("no longer serving requests");
        if !jobs.stop_running(grace).await {
            tracing::warn!("the fine-tune job did not stop within the grace period; the next start records it failed");
        }
        expiry.abort();
        if let Some(dumper) = dumper {
            dumper.abort();
            let _ = dumper.await; // a dump in progress finishes on its blocking thread either way
        }
        catalog.settle().await;
        if let Err(error) = lifecycle.leave().await {
            tracing::warn!(%error, "could not tell the cluster this replica left; it is taken as gone in seconds");
        }
        if let Err(error) = catalog.dump_index().await {
            tracing::error!(%error, "could not dump the index at shutdown; the next start rebuilds it");
        }
        match catalog.close_store().await {
            Ok(()) => tracing::info!("gallery store closed"),
            Err(error) => {
                tracing::error!(%error, "could not checkpoint the gallery store; the next start recovers its log")
            }
        }
        Ok(())
    }
}

/// Dumps the index every `interval` when it changed, so a crash loses at most
/// that much of the index (the store loses nothing; a start reconciles).
async fn dump_periodically(catalog: Catalog, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        if let Err(error) = catalog.dump_index().await {
            tracing::error!(%error, "periodic index dump failed");
        }
    }
}

/// Forgets idempotency keys past their day, every hour (keyed uploads do it
/// too; this covers a gallery that gets none for a while).
async fn forget_expired_keys_hourly(store: Arc<dyn GalleryStore>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(3600));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.forget_expired_keys().await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "idempotency keys past their day forgotten"),
            Err(error) => tracing::warn!(%error, "could not forget expired idempotency keys; trying again in an hour"),
        }
    }
}

/// Starts libtorch workers for a model version, from its folder.
fn torch_embedder(config: EmbedderConfig) -> StartEmbedder {
    Arc::new(move |version: &ModelVersion| {
        let config = EmbedderConfig { model_dir: version.dir.clone(), ..config.clone() };
        Embedder::start(&config, &version.manifest)
    })
}

fn embedder_config(config: &ServeConfig) -> anyhow::Result<EmbedderConfig> {
    anyhow::ensure!(
        config.max_delay_ms.is_finite() && config.max_delay_ms >= 0.0,
        "--max-delay-ms must be a non-negative number of milliseconds"
    );
    Ok(EmbedderConfig {
        model_dir: config.model.clone(),
        device: config.device.parse()?,
        replicas_per_device: config.replicas_per_device,
        precision: config.precision.parse()?,
        policy: BatchPolicy {
            max_batch: config.max_batch,
            max_delay: Duration::from_secs_f64(config.max_delay_ms / 1e3),
            capacity: config.queue_capacity,
            max_bulk_batch: config.max_bulk_batch,
        },
        torch_threads: config.torch_threads,
    })
}

/// What `open_gallery` opens.
type Gallery = (Arc<dyn GalleryStore>, Arc<dyn IndexProvider>, Ports);

/// The gallery store, its vector indexes and the model lifecycle's ports:
/// SQLite, `hnsw_rs` in the data folder and a one-replica cluster in memory,
/// or, with `--database-url`, PostgreSQL with pgvector, with the model
/// lifecycle shared by every replica.
async fn open_gallery(config: &ServeConfig, registry: &Registry) -> anyhow::Result<Gallery> {
    if let Some(url) = &config.database_url {
        let store = PgGallery::connect(url).await.context("opening the gallery in PostgreSQL (--database-url)")?;
        let indexes = PgIndexes { pool: store.pool().clone() };
        let cluster = PgCluster::join(store.pool().clone(), store.target().clone(), config.keep_runs as usize);
        let ports = Ports::of(cluster);
        tracing::info!(replica = %ports.membership.replica(), "cluster mode: the gallery, its indexes and the model lifecycle are in PostgreSQL");
        return Ok((Arc::new(store), Arc::new(indexes), ports));
    }
    let sqlite = SqliteGallery::open(&config.data_dir)
        .with_context(|| format!("opening the gallery in {}", config.data_dir.display()))?;
    sqlite.abandon_running_scans().await.context("marking the last run's duplicate scans as stopped")?;
    let store: Arc<dyn GalleryStore> = Arc::new(sqlite);
    let indexes = LocalIndexes { dir: config.data_dir.join(INDEX_DIR), compact_fraction: config.compact_fraction };
    let active = registry.active()?;
    let cluster = MemoryCluster::new((!active.bundled).then_some(active.version), store.clone());
    cluster.keep_runs(config.keep_runs as usize);
    Ok((store, Arc::new(indexes), Ports::of(cluster.join())))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
    tracing::info!("shutting down");
}
