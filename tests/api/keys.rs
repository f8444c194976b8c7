//! API keys: which routes need one, what a read-only key may do, keys read
//! from a file, the admin token kept apart, and the open default.

use reqwest::multipart::{Form, Part};
use reqwest::RequestBuilder;
use serde_json::Value;

use crate::support::{fixtures, spawn_app, spawn_app_with, TestApp, TOKEN};

const READ_WRITE: &str = "read-write-key-for-the-tests-0123";
const READ_ONLY: &str = "read-only-key-for-the-tests-4567";

fn upload(app: &TestApp, png: &[u8]) -> RequestBuilder {
    let form = Form::new().part("image", Part::bytes(png.to_vec()).file_name("x.png"));
    app.client.post(app.url("/gallery")).multipart(form)
}

fn search(app: &TestApp, png: &[u8]) -> RequestBuilder {
    app.client.post(app.url("/search?k=1")).header("content-type", "image/png").body(png.to_vec())
}

/// Sends and checks the status, and for errors the code.
async fn expect(name: &str, request: RequestBuilder, status: u16, code: Option<&str>) -> Value {
    let response = request.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{name}: {body}");
    if let Some(code) = code {
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
    }
    body
}

#[tokio::test]
async fn with_keys_every_route_but_the_probes_needs_one_and_a_read_only_key_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let read_only_file = dir.path().join("read-only-key");
    std::fs::write(&read_only_file, format!("  {READ_ONLY}\n")).unwrap();
    let app = spawn_app_with(|c| {
        c.api_key = Some(READ_WRITE.into());
        c.read_only_api_key_file = Some(read_only_file);
        c.admin_token = Some(TOKEN.into());
    })
    .await;
    let mut images = fixtures().into_iter().map(|(_, png)| png);
    let (stored, other) = (images.next().unwrap(), images.next().unwrap());

    for path in ["/health", "/ready", "/metrics", "/", "/app.js", "/openapi.yaml"] {
        expect(path, app.client.get(app.url(path)), 200, None).await;
    }
    let added =
        expect("upload with the read-write key", upload(&app, &stored).bearer_auth(READ_WRITE), 201, None).await;
    let id = added["items"][0]["id"].as_i64().unwrap();
    let item = format!("/gallery/{id}");

    let unauthorized = Some("unauthorized");
    expect("list without a key", app.client.get(app.url("/gallery")), 401, unauthorized).await;
    expect("item without a key", app.client.get(app.url(&item)), 401, unauthorized).await;
    expect("image without a key", app.client.get(app.url(&format!("{item}/image"))), 401, unauthorized).await;
    expect("search without a key", search(&app, &stored), 401, unauthorized).await;
    expect("upload without a key", upload(&app, &other), 401, unauthorized).await;
    expect("delete without a key", app.client.delete(app.url(&item)), 401, unauthorized).await;
    expect(
        "search with a wrong key",
        search(&app, &stored).bearer_auth("read-only-key-for-the-tests-456"),
        401,
        unauthorized,
    )
    .await;
    expect(
        "search with the key as basic auth",
        search(&app, &stored).basic_auth("x", Some(READ_WRITE)),
        401,
        unauthorized,
    )
    .await;
    expect("search with the admin token", search(&app, &stored).bearer_auth(TOKEN), 401, unauthorized).await;

    // The read-only key (read from its file, whitespace trimmed) reads and searches, in either header.
    let found = expect("search, read-only key", search(&app, &stored).header("api-key", READ_ONLY), 200, None).await;
    assert_eq!(found["results"][0]["id"], id);
    expect("list, read-only key", app.client.get(app.url("/gallery")).bearer_auth(READ_ONLY), 200, None).await;
    let verify = Form::new()
        .part("a", Part::bytes(stored.clone()).file_name("a.png"))
        .part("b", Part::bytes(other.clone()).file_name("b.png"));
    let verify = app.client.post(app.url("/verify")).multipart(verify).bearer_auth(READ_ONLY);
    expect("verify, read-only key", verify, 200, None).await;
    let read_only = Some("read_only_key");
    expect("upload, read-only key", upload(&app, &other).bearer_auth(READ_ONLY), 403, read_only).await;
    expect("delete, read-only key", app.client.delete(app.url(&item)).header("api-key", READ_ONLY), 403, read_only)
        .await;
    let relabel = app.client.patch(app.url(&item)).json(&serde_json::json!({"label": "x"})).bearer_auth(READ_ONLY);
    expect("edit, read-only key", relabel, 403, read_only).await;
    let relabel = app.client.patch(app.url(&item)).json(&serde_json::json!({"label": "x"})).bearer_auth(READ_WRITE);
    expect("edit, read-write key", relabel, 200, None).await;

    // Admin routes take the admin token, not an API key.
    expect("models with the admin token", app.client.get(app.url("/admin/models")).bearer_auth(TOKEN), 200, None).await;
    expect(
        "models with the API key",
        app.client.get(app.url("/admin/models")).bearer_auth(READ_WRITE),
        401,
        unauthorized,
    )
    .await;

    expect("delete, read-write key", app.client.delete(app.url(&item)).header("api-key", READ_WRITE), 204, None).await;
    app.stop().await;
}

#[tokio::test]
async fn without_keys_the_gallery_and_search_are_open() {
    let app = spawn_app().await;
    let png = fixtures().remove(0).1;
    expect("upload, no key configured", upload(&app, &png), 201, None).await;
    expect("search, no key configured", search(&app, &png), 200, None).await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    let policy = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(policy.contains("script-src 'self';") && !policy.contains("script-src 'unsafe-inline'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let image = app.client.get(app.url("/gallery/1/image")).send().await.unwrap();
    assert_eq!(image.headers()["x-content-type-options"], "nosniff", "user bytes are never sniffed");
    assert_eq!(image.headers()["x-frame-options"], "DENY");
    app.stop().await;
}

/// Straight to the service: the checking proxy sets `Host` to its own upstream.
fn direct(app: &TestApp, method: reqwest::Method, path: &str) -> RequestBuilder {
    app.client.request(method, format!("http://{}{path}", app.direct))
}

fn direct_upload(app: &TestApp, png: &[u8]) -> RequestBuilder {
    let form = Form::new().part("image", Part::bytes(png.to_vec()).file_name("x.png"));
    direct(app, reqwest::Method::POST, "/gallery").multipart(form)
}

#[tokio::test]
async fn without_keys_a_foreign_host_or_origin_cannot_read_or_write() {
    use reqwest::Method;
    let app = spawn_app_with(|c| c.allowed_hosts = vec!["search.example".into()]).await;
    let png = fixtures().remove(0).1;
    let own_origin = format!("http://{}", app.direct);

    // DNS rebinding: a page on evil.test whose name resolves to this machine.
    let rebound = direct_upload(&app, &png).header("host", "evil.test").header("origin", "http://evil.test");
    expect("upload, rebound host", rebound, 403, Some("host_not_allowed")).await;
    let read = direct(&app, Method::GET, "/gallery").header("host", "evil.test:8080");
    expect("list, rebound host", read, 403, Some("host_not_allowed")).await;
    // A cross-site form post: the right host, another site's origin.
    let cross_site = direct_upload(&app, &png).header("origin", "http://evil.test");
    expect("upload, foreign origin", cross_site, 403, Some("foreign_origin")).await;
    let opaque = direct_upload(&app, &png).header("origin", "null");
    expect("upload, opaque origin", opaque, 403, Some("foreign_origin")).await;

    // The service's own page, other tools (no Origin) and listed names go on.
    expect("upload, own origin", direct_upload(&app, &png).header("origin", &own_origin), 201, None).await;
    expect("upload, no origin", direct_upload(&app, &png), 201, None).await;
    let named = direct(&app, Method::GET, "/gallery").header("host", "search.example:8080");
    let listed = expect("list, allowed name", named, 200, None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "the refused uploads stored nothing: {listed}");
    let cross_site_delete = direct(&app, Method::DELETE, "/gallery/1").header("origin", "http://evil.test");
    expect("delete, foreign origin", cross_site_delete, 403, Some("foreign_origin")).await;
    expect("get after the refused delete", direct(&app, Method::GET, "/gallery/1"), 200, None).await;
    app.stop().await;
}
