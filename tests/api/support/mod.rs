//! What the tests stand on: three harnesses (the application in-process
//! behind a contract-checking proxy, `app`; the release binary as a child
//! process, `process`; a real PostgreSQL, `pg`), each of which lets go of
//! what it started when dropped; the admin token and client helpers
//! (`client`); and `eventually`, the one way a test waits.

mod app;
mod client;
mod pg;
mod pg_tls;
mod process;

use std::future::Future;
use std::time::{Duration, Instant};

pub use app::*;
pub use client::*;
pub use pg::PgServer;
pub use pg_tls::TlsFront;
pub use process::Server;

/// How often `eventually` looks again.
const POLL: Duration = Duration::from_millis(50);

/// Calls `check` until it answers `Ok`, and returns that; fails the test if
/// `timeout` passes first, naming `what` it waited for and the last `Err`
/// (what it saw instead).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    eventually_every(POLL, timeout, what, check).await
}

/// `eventually`, looking again every `every`.
pub async fn eventually_every<T, F, Fut>(every: Duration, timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) if Instant::now() >= deadline => panic!("waited {timeout:?} for {what}; last seen: {seen}"),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}
