//! The admin token every test that needs one starts its service with, and
//! the requests many tests make, against any base URL.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Client, RequestBuilder, Response};
use serde_json::Value;

use super::eventually;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// The request with the admin token.
pub fn admin(request: RequestBuilder) -> RequestBuilder {
    request.bearer_auth(TOKEN)
}

/// `POST /gallery` with one image and its label.
pub async fn upload(client: &Client, base: &str, image: &[u8], label: &str) -> Response {
    let form =
        Form::new().part("image", Part::bytes(image.to_vec()).file_name("x.png")).text("label", label.to_string());
    client.post(format!("{base}/gallery")).multipart(form).send().await.unwrap()
}

/// `POST /search?{query}` with the image as a multipart part.
pub async fn search(client: &Client, base: &str, image: &[u8], query: &str) -> Response {
    let form = Form::new().part("image", Part::bytes(image.to_vec()).file_name("q.png"));
    client.post(format!("{base}/search?{query}")).multipart(form).send().await.unwrap()
}

/// An admin request's status and JSON body.
pub async fn admin_json(request: RequestBuilder) -> (u16, Value) {
    let response = admin(request).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Starts activating `version` (`202`, then the activation runs on its own); its `Location`.
pub async fn start_activation(client: &Client, base: &str, version: &str) -> String {
    let response = admin(client.post(format!("{base}/admin/models/{version}/activate"))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let started: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/admin/activations/{}", started["id"].as_str().unwrap()));
    location
}

/// Activates `version` and waits until the activation ends; its last status.
pub async fn activate(client: &Client, base: &str, version: &str) -> Value {
    let status = format!("{base}{}", start_activation(client, base, version).await);
    eventually(Duration::from_secs(300), "the activation to end", || async {
        let (code, seen) = admin_json(client.get(&status)).await;
        assert_eq!(code, 200, "{seen}");
        if seen["state"] == "running" {
            Err(seen.to_string())
        } else {
            Ok(seen)
        }
    })
    .await
}

/// A fine-tune job's status.
pub async fn job_status(client: &Client, base: &str, id: &str) -> Value {
    let (code, status) = admin_json(client.get(format!("{base}/admin/finetune/{id}"))).await;
    assert_eq!(code, 200, "{status}");
    status
}

/// Waits until the job finishes; its last status and every state seen, in order.
pub async fn wait_for_job(client: &Client, base: &str, id: &str) -> (Value, Vec<String>) {
    let states = std::cell::RefCell::new(Vec::<String>::new());
    let status = eventually(Duration::from_secs(300), "the job to finish", || async {
        let status = job_status(client, base, id).await;
        let state = status["state"].as_str().unwrap().to_string();
        if states.borrow().last() != Some(&state) {
            states.borrow_mut().push(state.clone());
        }
        if ["done", "failed", "cancelled"].contains(&state.as_str()) {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await;
    (status, states.into_inner())
}
