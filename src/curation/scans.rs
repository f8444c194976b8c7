//! Duplicate scans as jobs: started, followed by id. Records live in the store
//! (`gallery::scans`), so any replica answers for a scan another one runs and
//! a restart keeps the last few. The process running a scan writes its record
//! every `HEARTBEAT`; a running record left unwritten for `STALE_MS` (by the
//! store's clock) lost its process, and is shown failed. One scan runs at a
//! time, across replicas. A store that refuses writes for `STALE_MS` makes a
//! live scan read failed too (and another may start); its final write, once
//! the store is back, still records what it found.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{group_pairs, DuplicateGroup};
use crate::catalog::{Catalog, CatalogError};
use crate::clock::now_millis;
use crate::gallery::{GalleryError, ScanStart, StoredScan};

/// How often a running scan writes its progress.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A running record unwritten this long lost the process that ran it.
const STALE_MS: i64 = 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanState {
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanRecord {
    pub id: String,
    pub state: ScanState,
    /// The model (`name@version`) whose embeddings were compared.
    pub model: String,
    /// Cosine distance under which two items count as copies.
    pub distance: f32,
    #[serde(default)]
    pub scanned: usize,
    #[serde(default)]
    pub total: usize,
    /// Unix milliseconds.
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// Items that are in a group but not its keeper: what deleting the
    /// suggestions would remove.
    pub duplicates: Option<usize>,
    pub groups: Option<Vec<DuplicateGroup>>,
    pub error: Option<String>,
}

impl ScanState {
    /// As the API and the store's `state` column name it.
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

impl ScanRecord {
    fn stored(&self) -> StoredScan {
        StoredScan {
            id: self.id.clone(),
            state: self.state.as_str().to_string(),
            record: serde_json::to_string(self).expect("a scan record serialises"),
            created_at: self.created_at as i64,
            idle_ms: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("duplicate scan {0} is running; follow it at /gallery/duplicates/{0}")]
    Running(String),
    #[error(transparent)]
    Store(#[from] GalleryError),
}

/// Starts a scan of `catalog` at `distance`, unless one is running (on any replica).
pub async fn start(catalog: Catalog, distance: f32) -> Result<ScanRecord, ScanError> {
    let record = ScanRecord {
        id: uuid::Uuid::new_v4().to_string(),
        state: ScanState::Running,
        model: catalog.serving().model,
        distance,
        scanned: 0,
        total: 0,
        created_at: now_millis(),
        finished_at: None,
        duplicates: None,
        groups: None,
        error: None,
    };
    if let ScanStart::Running(id) = catalog.store().start_scan(record.stored(), STALE_MS).await? {
        return Err(ScanError::Running(id));
    }
    tokio::spawn(run(catalog, Arc::new(Mutex::new(record.clone())), distance));
    Ok(record)
}

/// A scan's record; `None` if the store keeps none by that id.
pub async fn get(catalog: &Catalog, id: &str) -> Result<Option<ScanRecord>, ScanError> {
    let Some(stored) = catalog.store().scan(id.to_string()).await? else {
        return Ok(None);
    };
    let mut record: ScanRecord = serde_json::from_str(&stored.record)
        .map_err(|e| GalleryError::Corrupt(format!("duplicate scan {id}'s record: {e}")))?;
    if record.state == ScanState::Running && stored.idle_ms > STALE_MS {
        record.state = ScanState::Failed;
        record.error = Some(format!(
            "the process running this scan stopped before it finished (no progress for {} s); start another",
            STALE_MS / 1000
        ));
    }
    Ok(Some(record))
}

async fn run(catalog: Catalog, record: Arc<Mutex<ScanRecord>>, distance: f32) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat(catalog.clone(), record.clone(), stopped));
    let progress = |scanned, total| {
        let mut record = record.lock().unwrap_or_else(|e| e.into_inner());
        (record.scanned, record.total) = (scanned, total);
    };
    let outcome = async {
        let found = catalog.near_pairs(distance, progress, &AtomicBool::new(false)).await?;
        let ids: Vec<i64> = found.pairs.iter().flat_map(|p| [p.a, p.b]).collect::<HashSet<_>>().into_iter().collect();
        // In pages, so that the store serves other requests between them.
        let mut items = HashMap::new();
        for page in ids.chunks(500) {
            items.extend(catalog.summaries(page.to_vec()).await?);
        }
        Ok::<_, CatalogError>((found.model, group_pairs(&found.pairs, &items)))
    }
    .await;
    // The heartbeat ends before the final write, so none of its writes can land after it.
    let _ = stop.send(true);
    let _ = heartbeat.await;
    let finished = {
        let mut record = record.lock().unwrap_or_else(|e| e.into_inner());
        finish(&mut record, outcome);
        record.stored()
    };
    for attempt in 1..=3 {
        if attempt > 1 {
            tokio::time::sleep(HEARTBEAT).await;
        }
        match catalog.store().put_scan(finished.clone()).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, attempt, "could not write a finished duplicate scan"),
        }
    }
}

fn finish(record: &mut ScanRecord, outcome: Result<(String, Vec<DuplicateGroup>), CatalogError>) {
    record.finished_at = Some(now_millis());
    match outcome {
        Ok((model, groups)) => {
            record.model = model;
            record.duplicates = Some(groups.iter().map(|g| g.items.len() - 1).sum());
            record.groups = Some(groups);
            record.state = ScanState::Done;
        }
        Err(error) => {
            tracing::error!(%error, "duplicate scan failed");
            record.error = Some(error.to_string());
            record.state = ScanState::Failed;
        }
    }
}

/// Writes the running record's progress every `HEARTBEAT` until `stopped`.
async fn heartbeat(catalog: Catalog, record: Arc<Mutex<ScanRecord>>, mut stopped: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = stopped.changed() => return,
        }
        let progress = record.lock().unwrap_or_else(|e| e.into_inner()).stored();
        if let Err(error) = catalog.store().put_scan(progress).await {
            tracing::warn!(%error, "could not write a duplicate scan's progress");
        }
    }
}
