//! The catalog's rules over a stand-in encoder (a fixed random projection
//! of the pixels): duplicates, reconciling at start, deletes. Real store and
//! index in a temporary folder; no libtorch. The helpers serve the model
//! lifecycle's tests too.

use std::io::Cursor;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::embed::{BatchPolicy, Encoder, Priority};
use crate::gallery::SqliteGallery;
use crate::index::LocalIndexes;
use crate::manifest::{Manifest, FASHION_MODEL_DIR};
use crate::preprocess::ImageLimits;
use crate::registry::{ModelVersion, Registry};

/// A fixed random projection: distinct images get distinct directions.
pub(crate) struct Projection {
    weights: Vec<f32>,
    dim: usize,
    /// Held once, at the first forward pass, until the test lets go.
    gate: Option<Arc<Gate>>,
}

/// Stops a forward pass in its middle: the test sees `entered`, acts, then sends `release`.
pub(crate) struct Gate {
    pub(crate) entered: Mutex<mpsc::Sender<()>>,
    pub(crate) release: Mutex<mpsc::Receiver<()>>,
}

impl Projection {
    fn new(input_len: usize, dim: usize, gate: Option<Arc<Gate>>) -> Self {
        let mut rng = StdRng::seed_from_u64(7);
        Self { weights: (0..input_len * dim).map(|_| rng.random_range(-1.0..1.0)).collect(), dim, gate }
    }
}

impl Encoder for Projection {
    fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        if let Some(gate) = self.gate.take() {
            gate.entered.lock().unwrap().send(()).unwrap();
            gate.release.lock().unwrap().recv().unwrap();
        }
        let input_len = pixels.len() / n;
        let embed = |image: &[f32]| -> Vec<f32> {
            (0..self.dim).map(|j| image.iter().zip(&self.weights[j * input_len..]).map(|(p, w)| p * w).sum()).collect()
        };
        Ok(pixels.chunks_exact(input_len).map(embed).collect())
    }
}

pub(crate) fn settings() -> CatalogSettings {
    settings_gated(None)
}

/// Settings whose model versions other than the bundled one stop at `gate`.
pub(crate) fn settings_gated(gate: Option<Arc<Gate>>) -> CatalogSettings {
    let manifest = Manifest::load(Path::new(FASHION_MODEL_DIR)).unwrap();
    let limits = ImageLimits { max_side: 1024, max_decoded_bytes: 1 << 24 };
    let policy = BatchPolicy { max_batch: 8, max_delay: Duration::from_millis(1), capacity: 64, max_bulk_batch: 8 };
    CatalogSettings {
        start_embedder: Arc::new(move |version: &ModelVersion| {
            let input = &version.manifest.input;
            let gate = gate.clone().filter(|_| !version.bundled);
            let encoder = Projection::new(input.input_len(), version.manifest.embedding.dim, gate);
            Embedder::with_encoder(encoder, &version.manifest, policy)
        }),
        preprocess: PreprocessPool::new(Preprocessor::new(manifest.input, limits), 2),
        near_duplicate_distance: Some(0.001),
        knn_k: 10,
        exact_search_limit: 512,
        unknown_distance: None,
    }
}

async fn open(dir: &Path) -> (Catalog, IndexStartup, Arc<SqliteGallery>) {
    let store = Arc::new(SqliteGallery::open(dir).unwrap());
    let indexes = LocalIndexes { dir: dir.join("index"), compact_fraction: 0.1 };
    let version = Registry::new(Path::new(FASHION_MODEL_DIR), dir).active().unwrap();
    let (catalog, startup) = Catalog::open(store.clone(), &indexes, version, settings()).await.unwrap();
    (catalog, startup, store)
}

/// A small PNG of noise, different for every `seed`.
pub(crate) fn png(seed: u64) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed);
    let image = image::RgbImage::from_fn(32, 32, |_, _| image::Rgb([rng.random(), rng.random(), rng.random()]));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner().into()
}

pub(crate) fn uploads(seeds: &[u64]) -> Vec<Upload> {
    seeds.iter().map(|&s| Upload { bytes: png(s), label: None, metadata: serde_json::json!({}) }).collect()
}

#[tokio::test]
async fn duplicates_are_reported_skipped_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, _, _) = open(dir.path()).await;
    let first = catalog.add(uploads(&[1, 2]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    assert!(first.iter().all(|a| a.status == AddStatus::Added && a.duplicate_of.is_none()));

    // Allow: stored again, both kinds of duplicate reported.
    let again = catalog.add(uploads(&[1]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    assert_eq!((again[0].status, again[0].duplicate_of), (AddStatus::Added, Some(first[0].id)));
    assert_eq!(again[0].near_duplicate_of.map(|n| n.id), Some(first[0].id));

    // Skip: a byte duplicate is not stored; a new image beside it is.
    let skipped = catalog.add(uploads(&[2, 3]), OnDuplicate::Skip, Priority::Interactive).await.unwrap();
    assert_eq!((skipped[0].status, skipped[0].id), (AddStatus::Skipped, first[1].id));
    assert_eq!((skipped[1].status, skipped[1].duplicate_of), (AddStatus::Added, None));

    // Reject: the whole request is refused, naming the upload and the item.
    let refused = catalog.add(uploads(&[4, 1]), OnDuplicate::Reject, Priority::Interactive).await;
    assert!(matches!(refused, Err(CatalogError::Duplicate { position: 1, existing, .. }) if existing == first[0].id));
    assert_eq!(catalog.serving().indexed_items, 4, "nothing of the refused request was stored");

    // Two copies inside one request: the store reports the second as a duplicate of the first.
    let pair = catalog.add(uploads(&[5, 5]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    assert_eq!(pair[1].duplicate_of, Some(pair[0].id));
}

#[tokio::test]
async fn a_start_reconciles_the_saved_index_with_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, startup, store) = open(dir.path()).await;
    assert_eq!((startup.source, startup.items), (IndexSource::Rebuilt, 0));
    let added = catalog.add(uploads(&[1, 2, 3]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    catalog.dump_index().await.unwrap();
    // Behind the index's back, as a crash between the two writes would leave them:
    // one item gone from the store, one stored without its index insert.
    assert!(store.delete(added[0].id).await.unwrap());
    let model = catalog.active_version().key;
    let embedding = store.embeddings_of(model.clone(), vec![added[1].id]).await.unwrap().remove(0).1;
    let item = crate::gallery::NewItem {
        image: png(9),
        content_hash: crate::gallery::content_hash(&png(9)),
        media_type: "image/png".into(),
        width: 32,
        height: 32,
        label: None,
        metadata: serde_json::json!({}),
        embedding,
        unless_stored: false,
    };
    let extra = store.insert(vec![item], model, None).await.unwrap().remove(0).id;
    drop(catalog);

    let (catalog, startup, _) = open(dir.path()).await;
    assert_eq!((startup.source, startup.added, startup.removed, startup.items), (IndexSource::Reloaded, 1, 1, 3));
    let query = SearchQuery { k: 10, ..SearchQuery::default() };
    let found = catalog.search_by_id(added[1].id, &query).await.unwrap().unwrap();
    let ids: Vec<i64> = found.results.iter().map(|n| n.id).collect();
    assert!(ids.contains(&extra) && !ids.contains(&added[0].id), "{ids:?}");
}

#[tokio::test]
async fn deletes_leave_results_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, _, _) = open(dir.path()).await;
    let added = catalog.add(uploads(&[1, 2, 3]), OnDuplicate::Allow, Priority::Interactive).await.unwrap();
    assert!(catalog.delete(added[0].id).await.unwrap());
    assert!(!catalog.delete(added[0].id).await.unwrap(), "a second delete finds nothing");
    assert_eq!(catalog.serving().indexed_items, 2);
    let query = SearchQuery { k: 10, ..SearchQuery::default() };
    let found = catalog.search_by_id(added[1].id, &query).await.unwrap().unwrap();
    assert!(found.results.iter().all(|n| n.id != added[0].id));
}

#[tokio::test]
async fn reject_refuses_copies_within_one_request_and_skip_stores_new_bytes_once() {
    let dir = tempfile::tempdir().unwrap();
    let (catalog, _, store) = open(dir.path()).await;
    let refused = catalog.add(uploads(&[1, 2, 1]), OnDuplicate::Reject, Priority::Interactive).await;
    assert!(matches!(refused, Err(CatalogError::DuplicateInRequest { position: 2, earlier: 0 })), "{refused:?}");
    assert_eq!(store.count().await.unwrap(), 0);

    // Two requests with the same new bytes at once: whichever commits second is told it was skipped.
    let (a, b) = tokio::join!(
        catalog.add(uploads(&[7]), OnDuplicate::Skip, Priority::Interactive),
        catalog.add(uploads(&[7]), OnDuplicate::Skip, Priority::Interactive)
    );
    let statuses = [a.unwrap()[0].status, b.unwrap()[0].status];
    assert!(statuses.contains(&AddStatus::Added) && statuses.contains(&AddStatus::Skipped), "{statuses:?}");
    assert_eq!((store.count().await.unwrap(), catalog.serving().indexed_items), (1, 1));
}
