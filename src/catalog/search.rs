//! Reading by similarity: search by image or by stored item, with the label
//! vote, and verification of a pair.

use std::time::Instant;

use bytes::Bytes;

use super::active::ActiveModel;
use super::{Catalog, CatalogError, Neighbour, SearchOutcome, SearchQuery, Timing, Verified};
use crate::embed::Priority;
use crate::gallery::ItemSummary;
use crate::index::Hit;
use crate::vector::{cosine, unit_distance};
use crate::vote::{self, Prediction};

impl Catalog {
    /// The gallery items most similar to the image, and the label its labelled neighbours vote for.
    pub async fn search(&self, bytes: Bytes, query: &SearchQuery) -> Result<SearchOutcome, CatalogError> {
        let start = Instant::now();
        let active = self.active();
        let prepared = active.prepare_all(vec![bytes], Priority::Interactive).await?.remove(0);
        let preprocessed = Instant::now();
        let embedded = active.embedder.embed(prepared.pixels, Priority::Interactive).await?;
        let after_embed = Instant::now();
        let (results, prediction) = self.neighbours(&active, &embedded.vector, query, None).await?;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        let timing = Timing {
            preprocess_ms: ms(start, preprocessed),
            embed_ms: ms(preprocessed, after_embed),
            queue_ms: embedded.queue_wait.as_secs_f64() * 1e3,
            batch_size: embedded.batch_size,
            search_ms: ms(after_embed, Instant::now()),
            total_ms: ms(start, Instant::now()),
        };
        Ok(SearchOutcome { model: active.name(), results, prediction, timing })
    }

    /// The items most similar to a stored item (itself left out), from its
    /// stored embedding; `None` if there is no such item.
    pub async fn search_by_id(&self, id: i64, query: &SearchQuery) -> Result<Option<SearchOutcome>, CatalogError> {
        let start = Instant::now();
        let active = self.active();
        let Some((_, vector)) = self.store.embeddings_of(active.key(), vec![id]).await?.pop() else {
            return Ok(None);
        };
        let (results, prediction) = self.neighbours(&active, &vector, query, Some(id)).await?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        let timing = Timing { search_ms: total_ms, total_ms, ..Timing::default() };
        Ok(Some(SearchOutcome { model: active.name(), results, prediction, timing }))
    }

    /// Searches the index (fetching enough for the label vote), reads the
    /// hits' labels and metadata, votes, then applies `min_score` and `k`.
    async fn neighbours(
        &self,
        active: &ActiveModel,
        vector: &[f32],
        query: &SearchQuery,
        exclude: Option<i64>,
    ) -> Result<(Vec<Neighbour>, Prediction), CatalogError> {
        let fetch = query.k.max(self.settings.knn_k) + usize::from(exclude.is_some());
        let mut hits = self.nearest(active, vector, fetch, query.label.as_deref()).await?;
        hits.retain(|hit| Some(hit.id) != exclude);
        let summaries = self.store.summaries(hits.iter().map(|h| h.id).collect()).await?;
        // An item deleted between the index search and here is simply left out.
        let found: Vec<Neighbour> =
            hits.into_iter().filter_map(|hit| summaries.get(&hit.id).map(|item| neighbour(hit.score, item))).collect();
        let unknown_distance = self.unknown_distance(active);
        let votes = found.iter().map(|n| (n.score, n.label.as_deref()));
        let prediction = vote::predict(votes, self.settings.knn_k, unknown_distance);
        let min_score = query.min_score.unwrap_or(f32::NEG_INFINITY);
        let results = found.into_iter().filter(|n| n.score >= min_score).take(query.k).collect();
        Ok((results, prediction))
    }

    /// The `fetch` nearest items, of `label` only when one is given. An
    /// unknown label answers at once; a small one is searched exactly, from
    /// its stored vectors, since a filtered graph walk visits ever more of the
    /// graph the rarer the label; a large one by the filtered walk.
    async fn nearest(
        &self,
        active: &ActiveModel,
        vector: &[f32],
        fetch: usize,
        label: Option<&str>,
    ) -> Result<Vec<Hit>, CatalogError> {
        let Some(label) = label else { return Ok(active.index.search(vector, fetch, None).await?) };
        if let Some(hits) = active.index.search_label(vector, fetch, label).await? {
            return Ok(hits);
        }
        let Some(ids) = self.labels.ids(label) else { return Ok(Vec::new()) };
        if ids.len() > self.settings.exact_search_limit {
            return Ok(active.index.search(vector, fetch, Some(ids)).await?);
        }
        let stored = self.store.embeddings_of(active.key(), ids.to_vec()).await?;
        let mut hits: Vec<Hit> = stored.iter().map(|(id, v)| Hit { id: *id, score: cosine(vector, v) }).collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(fetch);
        Ok(hits)
    }

    /// Whether two images show the same thing: their similarity against the
    /// active model's verification threshold.
    pub async fn verify(&self, a: Bytes, b: Bytes) -> Result<Verified, CatalogError> {
        let active = self.active();
        let prepared = active.prepare_all(vec![a, b], Priority::Interactive).await?;
        let vectors = active.embed_all(prepared.into_iter().map(|p| p.pixels).collect(), Priority::Interactive).await?;
        let similarity = cosine(&vectors[0], &vectors[1]);
        let threshold = active.version.manifest.verification_threshold;
        Ok(Verified {
            model: active.name(),
            similarity,
            distance: unit_distance(similarity),
            same: threshold.map(|t| similarity >= t),
            threshold,
        })
    }
}

fn neighbour(score: f32, item: &ItemSummary) -> Neighbour {
    Neighbour { id: item.id, score, label: item.label.clone(), metadata: item.metadata.clone() }
}
