//! Duplicate scans as jobs: started, followed by id, kept in memory (the last
//! few) by the process that ran them. One runs at a time per process.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{group_pairs, DuplicateGroup};
use crate::catalog::Catalog;
use crate::clock::now_millis;

/// Finished scans kept for reading back.
const KEEP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanState {
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScanRecord {
    pub id: String,
    pub state: ScanState,
    /// The model (`name@version`) whose embeddings were compared.
    pub model: String,
    /// Cosine distance under which two items count as copies.
    pub distance: f32,
    pub scanned: usize,
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

#[derive(Default)]
pub struct DuplicateScans {
    /// Newest last.
    records: Mutex<VecDeque<Arc<Mutex<ScanRecord>>>>,
}

impl DuplicateScans {
    /// Starts a scan of `catalog` at `distance`; `Err` with the id of the scan already running.
    pub fn start(self: &Arc<Self>, catalog: Catalog, distance: f32) -> Result<ScanRecord, String> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        // Looked at under each record's lock, not cloned: a finished record holds its groups.
        let running = records.iter().find_map(|r| {
            let record = r.lock().unwrap_or_else(|e| e.into_inner());
            (record.state == ScanState::Running).then(|| record.id.clone())
        });
        if let Some(id) = running {
            return Err(id);
        }
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
        let shared = Arc::new(Mutex::new(record.clone()));
        records.push_back(shared.clone());
        while records.len() > KEEP {
            records.pop_front();
        }
        tokio::spawn(run(catalog, shared, distance));
        Ok(record)
    }

    pub fn get(&self, id: &str) -> Option<ScanRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.iter().map(|r| r.lock().unwrap_or_else(|e| e.into_inner())).find(|r| r.id == id).map(|r| r.clone())
    }
}

async fn run(catalog: Catalog, record: Arc<Mutex<ScanRecord>>, distance: f32) {
    let progress = |scanned, total| {
        let mut record = record.lock().unwrap_or_else(|e| e.into_inner());
        (record.scanned, record.total) = (scanned, total);
    };
    let outcome = async {
        let found = catalog.near_pairs(distance, progress, &AtomicBool::new(false)).await?;
        let ids: Vec<i64> = found.pairs.iter().flat_map(|p| [p.a, p.b]).collect::<HashSet<_>>().into_iter().collect();
        // In pages, so that the store serves other requests between them.
        let mut items = std::collections::HashMap::new();
        for page in ids.chunks(500) {
            items.extend(catalog.summaries(page.to_vec()).await?);
        }
        Ok::<_, crate::catalog::CatalogError>((found.model, group_pairs(&found.pairs, &items)))
    }
    .await;
    let mut record = record.lock().unwrap_or_else(|e| e.into_inner());
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
