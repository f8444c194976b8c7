//! The cluster's lifecycle lock when the connection holding it is lost: the
//! work under it stops, and no other replica starts a fine-tune before it
//! has. Also: `--keep-runs` in the database.

use std::time::Duration;

use reqwest::Client;
use serde_json::{json, Value};

use crate::support::{admin_json, eventually, fixtures, upload, PgServer, Server, TOKEN};

/// A job's state as the database has it.
fn state_in_database(pg: &PgServer, id: &str) -> String {
    pg.psql(&format!("SELECT status->>'state' FROM lifecycle_runs WHERE id = '{id}'"))
}

/// `pg_terminate_backend` on the lock's connection mid-job (what a PostgreSQL
/// restart or failover does to it): the job ends failed, saying why; the
/// other replica's starts are refused until it has, then one is accepted.
#[tokio::test]
async fn a_job_whose_lock_connection_is_terminated_fails_and_no_second_job_overlaps_it() {
    let pg = PgServer::start();
    let url = pg.url();
    let env =
        [("LOOKALIKE_DATABASE_URL", url.as_str()), ("LOOKALIKE_ADMIN_TOKEN", TOKEN), ("LOOKALIKE_KEEP_RUNS", "1")];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = Server::start_with_env(dirs[0].path(), "replica.log", &env).await;
    let second = Server::start_with_env(dirs[1].path(), "replica.log", &env).await;
    let client = Client::new();
    for (class, bytes) in fixtures() {
        assert_eq!(upload(&client, &first.url, &bytes, &class).await.status(), 201);
    }
    let params = json!({"epochs": 1000, "p": 4, "k": 2, "validation_fraction": 0.34, "seed": 1});
    let (status, job) = admin_json(client.post(format!("{}/admin/finetune", first.url)).json(&params)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(120), "the job to train", || async {
        let state = state_in_database(&pg, &id);
        if state == "training" {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;

    let holder = "SELECT pid FROM pg_stat_activity WHERE application_name = 'lookalike lifecycle lock'";
    let pid = pg.psql(holder);
    assert!(!pid.is_empty() && !pid.contains('\n'), "one connection holds the lock: {pid:?}");
    assert_eq!(pg.psql(&format!("SELECT pg_terminate_backend({pid})")), "t");

    // The other replica is refused while the first job runs, and accepted once it has ended.
    let start = format!("{}/admin/finetune", second.url);
    let accepted: Value = eventually(Duration::from_secs(60), "a job accepted by the other replica", || async {
        let (status, answer) = admin_json(client.post(&start).json(&params)).await;
        match status {
            202 => Ok(answer),
            409 => {
                assert_eq!(answer["error"]["code"], "job_running", "{answer}");
                Err(answer.to_string())
            }
            other => panic!("{other}: {answer}"),
        }
    })
    .await;
    let (_, ended) = admin_json(client.get(format!("{}/admin/finetune/{id}", first.url))).await;
    assert_eq!(ended["state"], "failed", "the first job had ended when the second was accepted: {ended}");
    let why = ended["error"].as_str().unwrap_or_default();
    assert!(why.contains("lost the lifecycle lock (its connection to PostgreSQL"), "{ended}");
    let (finished, created) = (ended["finished_at"].as_u64().unwrap(), accepted["created_at"].as_u64().unwrap());
    assert!(finished <= created, "{ended} / {accepted}");
    assert_eq!(ended["saved_version"], Value::Null, "nothing was saved by it: {ended}");

    let second_id = accepted["id"].as_str().unwrap();
    assert_eq!(admin_json(client.delete(format!("{}/admin/finetune/{second_id}", second.url))).await.0, 202);
    // `--keep-runs 1`: once the second job has ended, the first one's record is gone from the database.
    eventually(Duration::from_secs(60), "one finished job in the database", || async {
        let jobs = pg.psql("SELECT id || ' ' || (status->>'state') FROM lifecycle_runs WHERE kind = 'job'");
        if jobs == format!("{second_id} cancelled") {
            Ok(())
        } else {
            Err(jobs)
        }
    })
    .await;
    for server in [first, second] {
        server.terminate(Duration::from_secs(30)).await;
    }
}
