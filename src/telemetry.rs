//! Tracing set-up shared by the binary and the tests.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs a global `fmt` subscriber filtered by `RUST_LOG`, else by
/// `default_filter` with hnsw_rs's chatty info lines left out. `Json` writes
/// one object per line with the fields of the enclosing span (the request id).
/// Safe to call more than once: later calls are ignored.
pub fn init(default_filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_filter},hnsw_rs=warn,anndists=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only on a terminal; a log file or a collector gets plain text.
        LogFormat::Text => builder.with_target(false).with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
    };
}
