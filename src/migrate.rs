//! `lookalike migrate --to postgres://…`: moves an embedded gallery (SQLite
//! in `--data-dir`) into cluster mode's PostgreSQL, keeping ids, labels,
//! metadata, original bytes and every model version's embeddings, so clients'
//! ids stay valid and no image is embedded again. Run it with the service
//! stopped; the target must hold no items yet.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::gallery::{GalleryStore, PgGallery, SqliteGallery};

/// Items moved per transaction: original bytes can be megabytes each.
const CHUNK: usize = 16;

#[derive(Debug, Clone, Args)]
pub struct MigrateConfig {
    /// Data folder of the embedded gallery to move.
    #[arg(long, env = "LOOKALIKE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The PostgreSQL database (with pgvector) to move it into; it must hold no items yet.
    #[arg(long, hide_env_values = true)]
    pub to: String,
}

pub struct MigrateSummary {
    pub items: usize,
    pub embeddings: usize,
    pub seconds: f64,
    pub data_dir: PathBuf,
}

impl MigrateSummary {
    pub fn render(&self) -> String {
        format!(
            "moved {} items with {} embeddings into PostgreSQL in {:.1} s\n\
             model versions and job records stay in {}: start the replicas with --model and a data folder \
             holding the same versions, and --database-url\n",
            self.items,
            self.embeddings,
            self.seconds,
            self.data_dir.display()
        )
    }
}

pub async fn run(config: &MigrateConfig) -> anyhow::Result<MigrateSummary> {
    let started = Instant::now();
    let source = SqliteGallery::open_existing(&config.data_dir)?;
    let target = PgGallery::connect(&config.to).await?;
    let already = target.count().await?;
    anyhow::ensure!(already == 0, "the database already holds {already} items; migrate into an empty one");
    let (mut items, mut embeddings, mut after) = (0, 0, 0);
    loop {
        let page = source.export_page(after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = last.summary.id;
        items += page.len();
        embeddings += page.iter().map(|item| item.embeddings.len()).sum::<usize>();
        target.import(page).await?;
    }
    Ok(MigrateSummary {
        items,
        embeddings,
        seconds: started.elapsed().as_secs_f64(),
        data_dir: config.data_dir.clone(),
    })
}
