//! `lookalike migrate --to postgres://…`: moves an embedded gallery (SQLite
//! in `--data-dir`) into cluster mode's PostgreSQL, keeping ids, labels,
//! metadata, original bytes and every model version's embeddings, so clients'
//! ids stay valid and no image is embedded again. Run it with the service
//! stopped; the target must hold no items yet.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::cluster;
use serde_json::Value;

use crate::gallery::{GalleryStore, ItemSummary, PgGallery, SqliteGallery};
use crate::manifest::BUNDLED_MODEL_DIR;
use crate::registry::{Registry, RegistryError};

/// Items moved per transaction: original bytes can be megabytes each.
const CHUNK: usize = 16;

#[derive(Debug, Clone, Args)]
pub struct MigrateConfig {
    /// Data folder of the embedded gallery to move.
    #[arg(long, env = "LOOKALIKE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The PostgreSQL database (with pgvector) to move it into; it must hold no items yet.
    #[arg(long, env = "LOOKALIKE_DATABASE_URL", hide_env_values = true)]
    pub to: String,

    /// The bundled model the embedded service ran with (its saved versions build on it).
    #[arg(long, env = "LOOKALIKE_MODEL", default_value = BUNDLED_MODEL_DIR)]
    pub model: PathBuf,
}

pub struct MigrateSummary {
    pub items: usize,
    pub embeddings: usize,
    /// Saved model versions moved, and the active one.
    pub versions: usize,
    pub active: String,
    pub seconds: f64,
    pub data_dir: PathBuf,
    /// Items whose label or metadata held a NUL, which PostgreSQL cannot store.
    pub nul_replaced: Vec<i64>,
}

impl MigrateSummary {
    pub fn render(&self) -> String {
        format!(
            "moved {} items with {} embeddings and {} saved model versions (version {} active) into PostgreSQL \
             in {:.1} s\nfine-tune job records stay in {}; start the replicas with the same --model and --database-url\n",
            self.items,
            self.embeddings,
            self.versions,
            self.active,
            self.seconds,
            self.data_dir.display()
        ) + &self.render_replaced()
    }

    fn render_replaced(&self) -> String {
        if self.nul_replaced.is_empty() {
            return String::new();
        }
        format!(
            "{} items held a NUL character in their label or metadata, which PostgreSQL cannot store; it is now \
             U+FFFD in items {:?}\n",
            self.nul_replaced.len(),
            self.nul_replaced
        )
    }
}

pub async fn run(config: &MigrateConfig) -> anyhow::Result<MigrateSummary> {
    let started = Instant::now();
    // Read before anything is copied: a wrong --model must not leave a half-filled database.
    let registry = Registry::new(&config.model, &config.data_dir);
    let (versions, active) =
        tokio::task::spawn_blocking(move || Ok::<_, RegistryError>((registry.list()?, registry.active()?))).await??;
    let source = SqliteGallery::open_existing(&config.data_dir)?;
    let target = PgGallery::connect(&config.to).await?;
    let already = target.count().await?;
    anyhow::ensure!(already == 0, "the database already holds {already} items; migrate into an empty one");
    let (mut items, mut embeddings, mut after, mut nul_replaced) = (0, 0, 0, Vec::new());
    loop {
        let mut page = source.export_page(after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = last.summary.id;
        nul_replaced
            .extend(page.iter_mut().filter_map(|item| replace_nul(&mut item.summary).then_some(item.summary.id)));
        items += page.len();
        embeddings += page.iter().map(|item| item.embeddings.len()).sum::<usize>();
        target.import(page).await?;
    }
    let cluster_active = (!active.bundled).then_some(active.version.as_str());
    let moved = cluster::import_versions(target.pool(), &versions, cluster_active).await?;
    Ok(MigrateSummary {
        items,
        embeddings,
        versions: moved,
        active: active.version,
        seconds: started.elapsed().as_secs_f64(),
        data_dir: config.data_dir.clone(),
        nul_replaced,
    })
}

/// Replaces NUL characters in an item's label and metadata (stored before the
/// API refused them) with U+FFFD, so one old value cannot stop the move
/// halfway; true if any was found.
fn replace_nul(item: &mut ItemSummary) -> bool {
    fn in_value(value: &mut Value) -> bool {
        match value {
            Value::String(s) => in_string(s),
            Value::Array(items) => items.iter_mut().fold(false, |found, v| in_value(v) | found),
            Value::Object(map) => {
                let clean = |key: &String| !key.contains('\0');
                let mut found = !map.keys().all(clean);
                if found {
                    let renamed = std::mem::take(map).into_iter().map(|(k, v)| (k.replace('\0', "\u{fffd}"), v));
                    *map = renamed.collect();
                }
                for v in map.values_mut() {
                    found |= in_value(v);
                }
                found
            }
            _ => false,
        }
    }
    fn in_string(s: &mut String) -> bool {
        let found = s.contains('\0');
        if found {
            *s = s.replace('\0', "\u{fffd}");
        }
        found
    }
    let label = item.label.as_mut().is_some_and(in_string);
    in_value(&mut item.metadata) | label
}
