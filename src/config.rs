//! Command line and environment configuration: one documented struct per subcommand.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::manifest::BUNDLED_MODEL_DIR;

#[derive(Debug, Parser)]
#[command(name = "lookalike", version, about = "Self-hosted image similarity search")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the HTTP service.
    Serve(Box<ServeConfig>),
    /// Measure a model's retrieval quality on Fashion-MNIST (seen, unseen and
    /// all classes) and on image folders (one sub-folder per class), next to
    /// raw pixels; its pair-verification threshold; its throughput.
    Eval(crate::eval::EvalConfig),
    /// Add a folder of images to a running service: one sub-folder per label,
    /// or images at the top (unlabelled). Already-stored files are skipped, so
    /// a re-run resumes.
    Import(crate::import::ImportConfig),
    /// Move an embedded gallery (SQLite in --data-dir) into a PostgreSQL database for cluster
    /// mode, keeping ids, labels, metadata, images and embeddings. Stop the service first.
    Migrate(crate::migrate::MigrateConfig),
    /// Back up an embedded service's data folder (gallery, model versions, the
    /// active one, index dumps, job records) into one archive, while it serves.
    Backup(crate::backup::BackupConfig),
    /// Restore a backup into a new or empty data folder, checking every file.
    Restore(crate::backup::RestoreConfig),
}

/// Everything `lookalike serve` can be told. Every option has an environment
/// variable so containers can be configured without a command line.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on. Use 0.0.0.0 to accept connections from other machines.
    #[arg(long, env = "LOOKALIKE_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,

    /// TCP port to listen on; 0 picks a free port (the chosen one is logged).
    #[arg(long, env = "LOOKALIKE_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Folder holding the gallery store; created if missing.
    #[arg(long, env = "LOOKALIKE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Cluster mode: a PostgreSQL database with pgvector (`postgres://user@host:port/db`) holds the
    /// gallery, its embeddings and their HNSW indexes, shared by every replica; without it the
    /// gallery is SQLite and `hnsw_rs` in `--data-dir` (embedded mode). `sslmode` (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`) and `sslrootcert` mean what they mean to libpq.
    #[arg(long, env = "LOOKALIKE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Model folder with `encoder.pt` (TorchScript) and `manifest.json`.
    #[arg(long, env = "LOOKALIKE_MODEL", default_value = BUNDLED_MODEL_DIR)]
    pub model: PathBuf,

    /// Where to run the encoder: `auto` (every CUDA device when there is one, else the CPU),
    /// `cpu`, or `cuda:N[,M...]`.
    #[arg(long, env = "LOOKALIKE_DEVICE", default_value = "auto")]
    pub device: String,

    /// Embedding workers (model copies) per device.
    #[arg(long, env = "LOOKALIKE_REPLICAS_PER_DEVICE", default_value_t = 1)]
    pub replicas_per_device: usize,

    /// Forward-pass precision: `fp32`, or `fp16` (CUDA only; `auto` on a CPU host falls back to fp32).
    #[arg(long, env = "LOOKALIKE_PRECISION", default_value = "fp32")]
    pub precision: String,

    /// Largest number of images in one forward pass.
    #[arg(long, env = "LOOKALIKE_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// Most images of bulk work (imports, re-embedding) in one forward pass: a search waits for
    /// the pass under way, so a small share keeps its wait short (`make bench-import-latency`).
    #[arg(long, env = "LOOKALIKE_MAX_BULK_BATCH", default_value_t = 4)]
    pub max_bulk_batch: usize,

    /// Longest an image waits for its batch to fill while a worker is free, in milliseconds.
    #[arg(long, env = "LOOKALIKE_MAX_DELAY_MS", default_value_t = 1.0)]
    pub max_delay_ms: f64,

    /// Images that may wait for the encoder; beyond this, requests get 503 with Retry-After.
    #[arg(long, env = "LOOKALIKE_QUEUE_CAPACITY", default_value_t = 512)]
    pub queue_capacity: usize,

    /// libtorch intra-op threads per CPU worker; 0 shares every core but one among the CPU workers.
    #[arg(long, env = "LOOKALIKE_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,

    /// libtorch intra-op threads of a fine-tune's training thread; 0 takes half the cores (at least
    /// one), leaving the rest to serving (measured with `make bench-finetune-threads`).
    #[arg(long, env = "LOOKALIKE_FINETUNE_THREADS", default_value_t = 0)]
    pub finetune_threads: usize,

    /// Memory a fine-tune's prepared images may take, in MiB: a job trains on
    /// at most this many bytes of images at the model's input size, whatever
    /// its `max_images` (4 bytes per value: 192 KiB per image at 128 px, 588 KiB at 224 px).
    #[arg(long, env = "LOOKALIKE_FINETUNE_MEMORY_MIB", default_value_t = 2048)]
    pub finetune_memory_mib: usize,

    /// Finished fine-tune jobs and activations kept (their records, on disk or in
    /// PostgreSQL); older ones are removed after each run and at start.
    #[arg(long, env = "LOOKALIKE_KEEP_RUNS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_runs: u32,

    /// Images decoded and resized at once; 0 means one per CPU core.
    #[arg(long, env = "LOOKALIKE_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "LOOKALIKE_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted image width or height, in pixels (checked before decoding).
    #[arg(long, env = "LOOKALIKE_MAX_IMAGE_SIDE", default_value_t = 8192)]
    pub max_image_side: u32,

    /// Most bytes one decode may hold at its peak: the pixels, a conversion to RGB that cannot happen
    /// in place, a progressive JPEG's coefficients (counted from the header, before decoding).
    #[arg(long, env = "LOOKALIKE_MAX_DECODED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_decoded_bytes: u64,

    /// Seconds between index dumps (taken only when the index changed; one is
    /// always taken at shutdown). 0 disables the periodic dumps.
    #[arg(long, env = "LOOKALIKE_INDEX_DUMP_INTERVAL_SECS", default_value_t = 60)]
    pub index_dump_interval_secs: u64,

    /// Cosine distance under which an upload is reported as a near duplicate of a stored
    /// item; 0 turns it off. By default the serving model's calibrated distance
    /// (`near_duplicate_distance` in its manifest: at most 1% of distinct class-mate
    /// pairs within it), and off for a model without one.
    #[arg(long, env = "LOOKALIKE_NEAR_DUPLICATE_DISTANCE")]
    pub near_duplicate_distance: Option<f32>,

    /// Deleted items, as a fraction of the index, that trigger a rebuild without them.
    #[arg(long, env = "LOOKALIKE_COMPACT_FRACTION", default_value_t = 0.1)]
    pub compact_fraction: f64,

    /// Most parts one multipart form may carry. The form rules already refuse an unknown or
    /// repeated part when it arrives, so this bites below `--max-images-per-request` + 2.
    #[arg(long, env = "LOOKALIKE_MAX_FORM_PARTS", default_value_t = 80)]
    pub max_form_parts: usize,

    /// Largest image part of a multipart form, in bytes.
    #[arg(long, env = "LOOKALIKE_MAX_PART_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_part_bytes: usize,

    /// Largest text part of a multipart form (`label`, `metadata`), in bytes.
    #[arg(long, env = "LOOKALIKE_MAX_TEXT_PART_BYTES", default_value_t = 64 * 1024)]
    pub max_text_part_bytes: usize,

    /// Seconds a request may take, reading its body included, before it is answered 408.
    /// Admin routes are exempt (an activation re-embeds the gallery). 0 disables it.
    #[arg(long, env = "LOOKALIKE_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Requests handled at once; beyond this, requests get 503 with Retry-After.
    /// `/health`, `/ready` and `/metrics` are not counted, so probes answer under load.
    #[arg(long, env = "LOOKALIKE_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Request-body bytes all requests together may hold in memory, counted as they arrive; a body
    /// that would pass it gets 503 with Retry-After. At least `--max-body-bytes`.
    #[arg(long, env = "LOOKALIKE_MAX_BUFFERED_BODY_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_buffered_body_bytes: usize,

    /// Bytes a second a request body must average once it has taken 5 s; a slower one is cut off
    /// with 408, so slow clients cannot hold connections and memory. 0: no minimum.
    #[arg(long, env = "LOOKALIKE_MIN_BODY_RATE", default_value_t = 8 * 1024)]
    pub min_body_rate: u64,

    /// Seconds a connection may take to send a request's head (line and headers), the idle time
    /// of a keep-alive connection before its next request included; past it the connection is
    /// closed, so slow-header clients cannot hold connections open.
    #[arg(long, env = "LOOKALIKE_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,

    /// Seconds between SIGTERM and closing the listener, while `/ready` answers 503 and
    /// requests are still served: time for a load balancer to take the instance out.
    #[arg(long, env = "LOOKALIKE_SHUTDOWN_DELAY_SECS", default_value_t = 0)]
    pub shutdown_delay_secs: u64,

    /// Seconds SIGTERM waits for in-flight requests and a running fine-tune job to finish.
    #[arg(long, env = "LOOKALIKE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Most images one `POST /gallery` request may carry.
    #[arg(long, env = "LOOKALIKE_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    pub max_images_per_request: usize,

    /// Largest `k` a search may ask for.
    #[arg(long, env = "LOOKALIKE_MAX_K", default_value_t = 100)]
    pub max_k: usize,

    /// Labelled neighbours that vote for the label a search predicts.
    #[arg(long, env = "LOOKALIKE_KNN_K", default_value_t = 10)]
    pub knn_k: usize,

    /// A search filtered by a label with at most this many items compares the query with each
    /// of them (exactly); a larger label is searched by a filtered graph walk, which visits more
    /// of the graph the rarer the label. Chosen with `make bench-filtered`.
    #[arg(long, env = "LOOKALIKE_EXACT_SEARCH_LIMIT", default_value_t = 512)]
    pub exact_search_limit: usize,

    /// Cosine distance beyond which a search's nearest labelled neighbour means the label is
    /// `unknown`. Default: 1 - the active model's verification threshold.
    #[arg(long, env = "LOOKALIKE_UNKNOWN_DISTANCE")]
    pub unknown_distance: Option<f32>,

    /// Origins allowed to call the API from a browser (CORS), comma-separated, or `*` for any.
    /// Default: none (same-origin only).
    #[arg(long, env = "LOOKALIKE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Host names besides IP addresses and `localhost` that requests may name in `Host`,
    /// comma-separated (`.example.com` allows every name under it, `*` any name). Others answer
    /// 403, which stops DNS rebinding (README "Security").
    #[arg(long = "allowed-host", env = "LOOKALIKE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Log format: `text` (human-readable) or `json` (one object per line, for collectors).
    #[arg(long, env = "LOOKALIKE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Bearer token for the `/admin` routes (fine-tuning, model versions). With
    /// neither this nor `--admin-token-file`, admin routes answer 403.
    #[arg(long, env = "LOOKALIKE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (surrounding whitespace is trimmed); for secrets mounted as files.
    #[arg(long, env = "LOOKALIKE_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// API key for every gallery and search route, writes included (`Authorization: Bearer <key>`
    /// or `api-key: <key>`). With no API key configured those routes are open (see README "Security").
    #[arg(long, env = "LOOKALIKE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// File holding the read-write API key (surrounding whitespace is trimmed).
    #[arg(long, env = "LOOKALIKE_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,

    /// API key that may search, verify and read the gallery, but not add or delete (403).
    #[arg(long, env = "LOOKALIKE_READ_ONLY_API_KEY", hide_env_values = true)]
    pub read_only_api_key: Option<String>,

    /// File holding the read-only API key (surrounding whitespace is trimmed).
    #[arg(long, env = "LOOKALIKE_READ_ONLY_API_KEY_FILE", conflicts_with = "read_only_api_key")]
    pub read_only_api_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
