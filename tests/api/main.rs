//! Integration tests through the front door: one binary, one module per area.

mod backbones;
mod backup;
mod batching;
mod cluster;
mod crash;
mod duplicates;
mod edit;
mod errors;
mod explain;
mod finetune;
mod formats;
mod gallery;
mod general;
mod idempotency;
mod import;
mod keys;
mod labels;
mod limits;
mod lock;
mod search;
mod shutdown;
mod spec;
mod support;
mod tls;
mod versions;
