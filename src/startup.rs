//! Building the application from its configuration and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState, RequestLimits};
use crate::catalog::Catalog;
use crate::config::ServeConfig;
use crate::embed::{BatchPolicy, Embedder, EmbedderConfig};
use crate::gallery::Gallery;
use crate::index::Index;
use crate::manifest::Manifest;
use crate::metrics;
use crate::preprocess::{ImageLimits, PreprocessPool, Preprocessor};

/// A bound listener and a ready state: everything but the serving loop.
pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
}

impl Application {
    /// Loads the model, opens the store, rebuilds the index and binds the port.
    pub async fn build(config: ServeConfig) -> anyhow::Result<Self> {
        let manifest = Manifest::load(&config.model)?;
        let metrics_handle = metrics::handle();
        let embedder_config = embedder_config(&config)?;
        let embedder = {
            let manifest = manifest.clone();
            tokio::task::spawn_blocking(move || Embedder::start(&embedder_config, &manifest)).await??
        };
        let info = embedder.info();
        tracing::info!(
            model = %info.model_key, trained = manifest.trained, device = %info.device, workers = info.workers,
            precision = %info.precision, max_batch = info.policy.max_batch, max_delay = ?info.policy.max_delay,
            cuda_available = info.cuda.available, cuda_devices = info.cuda.device_count,
            "encoder loaded"
        );
        metrics::model_info(&info.model_key, &info.device, &info.precision.to_string());
        let gallery = Gallery::open(&config.data_dir)
            .with_context(|| format!("opening the gallery in {}", config.data_dir.display()))?;
        let index = Index::new(manifest.embedding.dim, gallery.count().await? as usize);
        let limits = ImageLimits { max_side: config.max_image_side, max_decoded_bytes: config.max_decoded_bytes };
        let preprocess =
            PreprocessPool::new(Preprocessor::new(manifest.input.clone(), limits), config.preprocess_threads);
        let catalog = Catalog { embedder, index, gallery, preprocess };
        let indexed = catalog.rebuild_index().await?;
        tracing::info!(items = indexed, data_dir = %config.data_dir.display(), "index built from the gallery");

        let listener = TcpListener::bind((config.host, config.port))
            .await
            .with_context(|| format!("binding {}:{}", config.host, config.port))?;
        let address = listener.local_addr()?;
        let limits = RequestLimits {
            max_body_bytes: config.max_body_bytes,
            max_images_per_request: config.max_images_per_request,
            max_k: config.max_k,
        };
        Ok(Self { listener, address, state: AppState { catalog, limits: Arc::new(limits), metrics: metrics_handle } })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        tracing::info!(address = %self.address, "listening");
        axum::serve(self.listener, api::router(self.state)).with_graceful_shutdown(shutdown).await
    }
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
        },
        torch_threads: config.torch_threads,
    })
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
