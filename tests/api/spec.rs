//! Keeps code and contract from drifting: every test talks to the service
//! through a loopback proxy that checks each answer against `openapi.yaml`
//! (the status is documented for the route and method, and a JSON body
//! matches the documented schema). A test fails at `TestApp::stop` if any
//! answer did not.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};

/// The contract, parsed once.
pub struct Spec {
    doc: Value,
}

impl Spec {
    pub fn load() -> Self {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).expect("openapi.yaml");
        Self { doc: serde_saphyr::from_str(&text).expect("openapi.yaml parses") }
    }

    /// The documented path template matching a concrete path, if any.
    fn route(&self, path: &str) -> Option<&str> {
        let segments: Vec<&str> = path.split('/').collect();
        self.doc["paths"].as_object()?.keys().map(String::as_str).find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(p, s)| (p.starts_with('{') && !s.is_empty()) || p == s)
        })
    }

    /// `None` when the answer conforms (or the route is not in the spec, like unknown paths), else why not.
    pub fn violation(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        content_type: &str,
        body: &[u8],
    ) -> Option<String> {
        let template = self.route(path)?;
        let operation = &self.doc["paths"][template][method.as_str().to_ascii_lowercase()];
        if operation.is_null() {
            return None; // a 405, not part of the contract
        }
        let what = format!("{method} {path} -> {status}");
        let Some(response) = operation["responses"].get(status.as_str()) else {
            return Some(format!("{what}: status not documented for {method} {template}"));
        };
        let response = self.resolve(response);
        if !content_type.starts_with("application/json") {
            return None;
        }
        let Some(schema) = response["content"]["application/json"].get("schema") else {
            return Some(format!("{what}: a JSON body, but the spec documents none"));
        };
        let body: Value = match serde_json::from_slice(body) {
            Ok(body) => body,
            Err(e) => return Some(format!("{what}: the body is not JSON: {e}")),
        };
        let mut schema = schema.clone();
        schema["components"] = self.doc["components"].clone();
        let validator = jsonschema::draft202012::new(&schema).expect("the spec's schemas compile");
        let errors: Vec<String> =
            validator.iter_errors(&body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        (!errors.is_empty()).then(|| format!("{what}: {}; body {body}", errors.join("; ")))
    }

    /// Follows a `$ref` to `#/components/...`.
    fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str() {
            Some(reference) => self.doc.pointer(reference.trim_start_matches('#')).expect("a $ref the spec holds"),
            None => value,
        }
    }
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    client: reqwest::Client,
    spec: Arc<Spec>,
    violations: Arc<Mutex<Vec<String>>>,
}

/// Starts a checking proxy in front of `upstream`; returns its address and the violations it records.
pub async fn start_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let violations = Arc::new(Mutex::new(Vec::new()));
    let proxy = Proxy {
        upstream: format!("http://{upstream}"),
        client: reqwest::Client::new(),
        spec: Arc::new(Spec::load()),
        violations: violations.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
    let address = listener.local_addr().unwrap();
    let app = Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, violations)
}

const HOP_BY_HOP: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.expect("request body");
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut upstream = proxy.client.request(parts.method.clone(), format!("{}{path_and_query}", proxy.upstream));
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.body(body).send().await {
        Ok(answer) => answer,
        Err(e) => return Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.unwrap_or_default();
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(violation) = proxy.spec.violation(&parts.method, parts.uri.path(), status, content_type, &bytes) {
        proxy.violations.lock().unwrap().push(violation);
    }
    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response = response.header(HeaderName::from(name), value);
        }
    }
    response.body(Body::from(bytes)).unwrap()
}

#[test]
fn the_checker_catches_a_body_that_breaks_the_contract() {
    let spec = Spec::load();
    let ok = json!({"status": "ok", "model": "m@1", "model_version": "1", "device": "cpu", "workers": 1, "precision": "fp32",
        "max_batch": 8, "cuda_available": false, "indexed_items": 0, "index_source": "rebuilt", "unembeddable_items": 0});
    let bytes = |v: &Value| serde_json::to_vec(v).unwrap();
    assert_eq!(spec.violation(&Method::GET, "/health", StatusCode::OK, "application/json", &bytes(&ok)), None);
    let mut missing = ok.clone();
    missing.as_object_mut().unwrap().remove("model");
    assert!(spec.violation(&Method::GET, "/health", StatusCode::OK, "application/json", &bytes(&missing)).is_some());
    let undocumented = spec.violation(&Method::GET, "/health", StatusCode::IM_A_TEAPOT, "application/json", b"{}");
    assert!(undocumented.unwrap().contains("not documented"));
    let error = json!({"error": {"code": "not_found", "message": "no gallery item 7"}});
    assert_eq!(
        spec.violation(&Method::GET, "/gallery/7", StatusCode::NOT_FOUND, "application/json", &bytes(&error)),
        None
    );
    let unknown_code = json!({"error": {"code": "made_up", "message": "x"}});
    assert!(spec
        .violation(&Method::GET, "/gallery/7", StatusCode::NOT_FOUND, "application/json", &bytes(&unknown_code))
        .is_some());
}
