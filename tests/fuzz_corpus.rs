//! Replays every input the fuzz targets keep (`fuzz/corpus/<target>/`) and
//! every input that once broke one (`fuzz/regressions/<target>/`) through the
//! same checks as `cargo fuzz` (`lookalike::fuzzing`), on stable Rust, so
//! `make test` fails if any of them breaks again.

use std::path::{Path, PathBuf};

use lookalike::fuzzing;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = ["corpus", "regressions"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(root.join(kind).join(target)).ok())
        .flat_map(|dir| dir.map(|entry| entry.unwrap().path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every input, naming the one that panics.
fn replay(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) -> usize {
    let files = inputs(target);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{} fails its fuzz check (cargo +nightly fuzz run {target} {0})", path.display());
        }
    }
    files.len()
}

#[test]
fn the_preprocess_corpus_still_passes() {
    let preprocessor = fuzzing::preprocessor();
    let count = replay("preprocess", |data| fuzzing::check_preprocess(&preprocessor, data));
    assert!(count >= 100, "the committed corpus is missing: {count} inputs");
}

#[test]
fn the_upload_form_corpus_still_passes() {
    let count = replay("upload_form", fuzzing::check_upload_form);
    assert!(count >= 100, "the committed corpus is missing: {count} inputs");
}
