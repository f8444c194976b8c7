//! lookalike: self-hosted image similarity search. A ShuffleNet Siamese
//! encoder (TorchScript through libtorch) embeds images; an HNSW index over a
//! durable gallery answers nearest-neighbour queries over HTTP.

pub mod api;
pub mod auth;
pub mod backup;
pub mod catalog;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod curation;
pub mod embed;
pub mod error_kind;
pub mod eval;
pub mod files;
pub mod finetune;
pub mod fuzzing;
pub mod gallery;
pub mod import;
pub mod index;
pub mod lifecycle;
pub mod manifest;
pub mod metrics;
pub mod migrate;
pub mod preprocess;
pub mod registry;
pub mod server;
pub mod startup;
pub mod telemetry;
pub mod vector;
pub mod vote;
