//! Cluster mode over TLS, each `sslmode` with libpq's meaning, against
//! PostgreSQL behind a TLS front whose certificate names `localhost` and is
//! signed by a CA of its own (see `support/pg_tls.rs`).

use lookalike::startup::Application;

use crate::support::{config, fixtures, spawn_with, PgServer, TlsFront};

/// Whether the service starts with `url`; the start-up error otherwise.
async fn starts_with(url: String) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.database_url = Some(url);
    match Application::build(config).await {
        Ok(_) => Ok(()),
        Err(error) => Err(format!("{error:#}")),
    }
}

#[tokio::test]
async fn the_service_reaches_postgresql_over_tls_as_sslmode_asks() {
    let pg = PgServer::start();
    let front = TlsFront::start(pg.socket()).await;
    let ca = front.ca_file().display().to_string();

    // Verified, by the name in the certificate: it serves, every connection through TLS.
    let dir = tempfile::tempdir().unwrap();
    let mut verified = config(dir.path());
    verified.database_url = Some(front.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")));
    let app = spawn_with(verified).await;
    let image = fixtures().remove(0).1;
    assert_eq!(app.add_images(std::slice::from_ref(&image), Some("bag"), None).await.status(), 201);
    assert_eq!(app.search_raw(&image, "1", "image/png").await.status(), 200);
    assert!(front.sessions() >= 2, "the pool, the notifications: {} TLS sessions", front.sessions());
    app.stop().await;

    // Encrypted without a check; verify-ca does not check the name (the certificate is for localhost).
    starts_with(front.url("127.0.0.1", "sslmode=require")).await.unwrap();
    starts_with(front.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await.unwrap();
    // verify-full checks it; without the CA file the system's CAs do not know the test CA.
    let wrong_name = starts_with(front.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(wrong_name.as_ref().is_err_and(|e| e.contains("certificate")), "{wrong_name:?}");
    let unknown_ca = starts_with(front.url("localhost", "sslmode=verify-full")).await;
    assert!(unknown_ca.as_ref().is_err_and(|e| e.contains("certificate")), "{unknown_ca:?}");
    // Without TLS the server refuses.
    let plain = starts_with(front.url("127.0.0.1", "sslmode=disable")).await;
    assert!(plain.as_ref().is_err_and(|e| e.contains("no encryption")), "{plain:?}");
}
