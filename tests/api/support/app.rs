//! Test harness: the real application (real TorchScript model, real SQLite
//! store) on a loopback port, with a fresh data directory per test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use lookalike::config::{Cli, Command, ServeConfig};
use lookalike::manifest::FASHION_MODEL_DIR;
use lookalike::startup::Application;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestApp {
    /// The checking proxy in front of the service (see `spec.rs`).
    pub address: String,
    /// The service itself, for raw-socket tests the buffering proxy would hide.
    pub direct: std::net::SocketAddr,
    pub client: Client,
    pub data_dir: PathBuf,
    /// Kept so the directory lives as long as the app (`None` when borrowed).
    _data_guard: Option<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    /// Answers that broke the OpenAPI contract.
    violations: Arc<Mutex<Vec<String>>>,
}

/// The service's own defaults (parsed as `lookalike serve` would parse
/// them), with smaller limits so the tests can reach them cheaply.
pub fn config(data_dir: &Path) -> ServeConfig {
    const MIB: usize = 1024 * 1024;
    let numbers = [
        ("--port", 0),
        ("--max-batch", 8),
        ("--queue-capacity", 256),
        ("--max-body-bytes", 4 * MIB),
        ("--max-image-side", 4096),
        ("--max-decoded-bytes", 64 * MIB),
        ("--max-images-per-request", 16),
        ("--max-k", 50),
        ("--max-form-parts", 24),
        ("--max-part-bytes", 2 * MIB),
        ("--max-text-part-bytes", 4096),
        ("--max-concurrent-requests", 64),
        ("--shutdown-grace-secs", 10),
    ];
    let mut args: Vec<String> =
        ["lookalike", "serve", "--host", "127.0.0.1", "--near-duplicate-distance", "0.01"].map(String::from).into();
    // The fixtures are Fashion-MNIST images; tests/api/general.rs runs the general default.
    args.extend(["--model".into(), FASHION_MODEL_DIR.into(), "--data-dir".into(), data_dir.display().to_string()]);
    args.extend(numbers.iter().flat_map(|(flag, value)| [flag.to_string(), value.to_string()]));
    let Command::Serve(config) = Cli::try_parse_from(args).expect("the test arguments parse").command else {
        unreachable!("parsed the serve subcommand")
    };
    // Secrets may sit in the environment of whoever runs the tests; tests set their own.
    ServeConfig {
        admin_token: None,
        admin_token_file: None,
        api_key: None,
        api_key_file: None,
        read_only_api_key: None,
        read_only_api_key_file: None,
        ..*config
    }
}

/// Starts the app on a fresh data directory. Logs only with `TEST_LOG=1`.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the app on a fresh data directory with a changed configuration.
pub async fn spawn_app_with(change: impl FnOnce(&mut ServeConfig)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config(dir.path());
    change(&mut config);
    let mut app = spawn_with(config).await;
    app._data_guard = Some(dir);
    app
}

pub async fn spawn_with(config: ServeConfig) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        lookalike::telemetry::init("info", lookalike::config::LogFormat::Text);
    }
    let data_dir = config.data_dir.clone();
    let app = Application::build(config).await.expect("the application builds");
    let direct = app.address();
    let (proxy, violations) = crate::spec::start_proxy(direct).await;
    let address = format!("http://{proxy}");
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        direct,
        client: Client::new(),
        data_dir,
        _data_guard: None,
        stop: Some(stop),
        server: Some(server),
        violations,
    }
}

/// Every answer the proxy saw must keep the contract, whether or not the
/// test calls `stop()`.
impl Drop for TestApp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let violations = self.violations.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(violations.is_empty(), "answers that break openapi.yaml:\n{}", violations.join("\n"));
    }
}

impl TestApp {
    /// Stops serving and waits until the server has let go of its state;
    /// fails if any answer broke the OpenAPI contract.
    pub async fn stop(mut self) -> Option<TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server exits cleanly");
        }
        let violations = self.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "answers that break openapi.yaml:\n{}", violations.join("\n"));
        self._data_guard.take()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn health(&self) -> Response {
        self.client.get(self.url("/health")).send().await.expect("request")
    }

    pub async fn add_images(&self, images: &[Vec<u8>], label: Option<&str>, metadata: Option<&str>) -> Response {
        let mut form = Form::new();
        for (i, bytes) in images.iter().enumerate() {
            form = form.part("image", Part::bytes(bytes.clone()).file_name(format!("{i}.png")));
        }
        if let Some(label) = label {
            form = form.text("label", label.to_string());
        }
        if let Some(metadata) = metadata {
            form = form.text("metadata", metadata.to_string());
        }
        self.post_form("/gallery", form).await
    }

    pub async fn post_form(&self, path: &str, form: Form) -> Response {
        self.client.post(self.url(path)).multipart(form).send().await.expect("request")
    }

    /// `POST /search?k=` with the image as the raw body.
    pub async fn search_raw(&self, image: &[u8], k: &str, content_type: &str) -> Response {
        self.client
            .post(self.url(&format!("/search?k={k}")))
            .header("content-type", content_type)
            .body(image.to_vec())
            .send()
            .await
            .expect("request")
    }

    /// `POST /search?k=` with the image as a multipart part.
    pub async fn search_form(&self, image: &[u8], k: usize) -> Response {
        let form = Form::new().part("image", Part::bytes(image.to_vec()).file_name("query.png"));
        self.post_form(&format!("/search?k={k}"), form).await
    }
}

/// The committed fixtures: Fashion-MNIST test images, `(class, png bytes)`.
pub fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fmnist");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("fixtures folder")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let class = path.file_stem().unwrap().to_string_lossy().split('-').next().unwrap().to_string();
            (class, std::fs::read(&path).expect("fixture"))
        })
        .collect();
    out.sort();
    out
}

/// Asserts the status and the JSON error code of a failed request.
pub async fn assert_error(response: Response, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status, "status for expected error `{code}`");
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "error body: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error body: {body}");
}

/// A request written by hand on a raw socket: the head and the first
/// `sent` bytes of the body now, the rest when `finish` is called. For
/// slow-client tests (timeouts, drains, concurrency slots).
pub struct SlowRequest {
    stream: tokio::net::TcpStream,
    rest: Vec<u8>,
}

impl SlowRequest {
    pub async fn start(
        address: std::net::SocketAddr,
        path: &str,
        content_type: &str,
        body: &[u8],
        sent: usize,
    ) -> Self {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("write the head");
        stream.write_all(&body[..sent]).await.expect("write the first bytes");
        Self { stream, rest: body[sent..].to_vec() }
    }

    /// Reads the answer without sending the rest: `(status, body)`.
    pub async fn answer(mut self) -> (u16, serde_json::Value) {
        use tokio::io::AsyncReadExt;
        let mut raw = Vec::new();
        let _ = self.stream.read_to_end(&mut raw).await;
        parse_answer(&raw)
    }

    /// Sends the rest of the body a byte every `every`, reading the answer
    /// as soon as the service gives one (or closes).
    pub async fn trickle(mut self, every: Duration) -> (u16, serde_json::Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = Vec::new();
        for byte in std::mem::take(&mut self.rest) {
            tokio::select! {
                read = self.stream.read_to_end(&mut raw) => { let _ = read; break; }
                () = tokio::time::sleep(every) => {
                    if self.stream.write_all(&[byte]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = self.stream.read_to_end(&mut raw).await;
        parse_answer(&raw)
    }

    /// Sends the rest of the body and reads the answer.
    pub async fn finish(mut self) -> (u16, serde_json::Value) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(&self.rest).await.expect("write the rest");
        self.answer().await
    }
}

fn parse_answer(raw: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(raw);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}
