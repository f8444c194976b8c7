//! The release binary as a child process on a free port, for tests that
//! kill, restart or signal it. Dropping a `Server` kills its process (also
//! when the test panics).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Client;

use super::eventually;

pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    /// Starts the release binary on a free port; periodic index dumps every
    /// second, so kills also land during and between dumps.
    pub async fn start(data_dir: &Path, log_name: &str) -> Self {
        Self::start_with_env(data_dir, log_name, &[]).await
    }

    pub async fn start_with_env(data_dir: &Path, log_name: &str, env: &[(&str, &str)]) -> Self {
        let server = Self::spawn(data_dir, log_name, env);
        let (client, health) = (Client::new(), format!("{}/health", server.url));
        let what = format!("the server to become healthy; see {}", data_dir.join(log_name).display());
        eventually(Duration::from_secs(120), &what, || async {
            match client.get(&health).send().await {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{:?}", other.map(|r| r.status()))),
            }
        })
        .await;
        server
    }

    /// Starts the binary without waiting for it to serve (its stderr goes to `log_name` in `data_dir`).
    pub fn spawn(data_dir: &Path, log_name: &str, env: &[(&str, &str)]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(data_dir.join(log_name)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lookalike"))
            .args(["serve", "--port", &port.to_string(), "--index-dump-interval-secs", "1", "--max-batch", "8"])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .envs(env.iter().copied())
            .spawn()
            .expect("the lookalike binary starts");
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// Waits up to `within` for the process to exit; its exit status.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        eventually(within, "the server to exit", || {
            let exited = child.try_wait().unwrap();
            async move { exited.ok_or_else(|| "still running".to_string()) }
        })
        .await
    }

    /// Sends SIGTERM and waits for the process to exit; its exit status.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(sent.success());
        self.exited(within).await
    }

    pub fn address(&self) -> std::net::SocketAddr {
        self.url.trim_start_matches("http://").parse().unwrap()
    }

    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
