//! Tracing set-up shared by the binary and the tests.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs a global `fmt` subscriber filtered by `RUST_LOG`, else by
/// `default_filter` with hnsw_rs's chatty info lines left out.
/// Safe to call more than once: later calls are ignored.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_filter},hnsw_rs=warn,anndists=warn")));
    // Colour codes only on a terminal; a log file or a collector gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}
