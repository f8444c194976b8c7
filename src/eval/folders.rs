//! Evaluation sets made of image folders, one sub-folder per class: either a
//! gallery folder and a query folder, or one folder split per class with a
//! seed. A gallery class with no query is a distractor, so copy detection
//! ("find this altered image's original among thousands") is the same
//! layout with one original per class.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::DynamicImage;

use super::SplitMix;
use crate::preprocess::{decode, ImageLimits};

/// Side of the raw-pixel baseline's images (RGB, mean-centred cosine).
pub const RAW_SIDE: u32 = 32;

/// `NAME=DIR` (a seeded split of one folder) or `NAME=GALLERY,QUERIES`.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderSet {
    pub name: String,
    pub gallery: PathBuf,
    pub queries: Option<PathBuf>,
}

impl std::str::FromStr for FolderSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, dirs) = s.split_once('=').ok_or("expected NAME=DIR or NAME=GALLERY_DIR,QUERY_DIR")?;
        if name.is_empty() || dirs.is_empty() {
            return Err("expected NAME=DIR or NAME=GALLERY_DIR,QUERY_DIR".into());
        }
        let (gallery, queries) = match dirs.split_once(',') {
            Some((g, q)) => (PathBuf::from(g), Some(PathBuf::from(q))),
            None => (PathBuf::from(dirs), None),
        };
        Ok(Self { name: name.into(), gallery, queries })
    }
}

/// One image file with its class index.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub path: PathBuf,
    pub class: i64,
}

/// The files of a set, as gallery and queries.
#[derive(Debug, Default)]
pub struct SetFiles {
    pub gallery: Vec<Labelled>,
    pub queries: Vec<Labelled>,
}

/// Lists a set's files. Class indices are shared between the gallery and
/// query folders by sub-folder name.
pub fn list(set: &FolderSet, query_fraction: f64, seed: u64) -> anyhow::Result<SetFiles> {
    let mut classes = Vec::new();
    let gallery = list_classes(&set.gallery, &mut classes)?;
    match &set.queries {
        Some(dir) => Ok(SetFiles { gallery, queries: list_classes(dir, &mut classes)? }),
        None => Ok(split(gallery, query_fraction, seed)),
    }
}

fn list_classes(root: &Path, classes: &mut Vec<String>) -> anyhow::Result<Vec<Labelled>> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().expect("a listed entry has a name").to_string_lossy().to_string();
        let class = match classes.iter().position(|c| *c == name) {
            Some(i) => i,
            None => {
                classes.push(name);
                classes.len() - 1
            }
        } as i64;
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
        files.sort();
        out.extend(files.into_iter().map(|path| Labelled { path, class }));
    }
    anyhow::ensure!(!out.is_empty(), "{}: no images in class sub-folders", root.display());
    Ok(out)
}

/// Per class, `fraction` of the files (at least one, and never the last) become queries.
fn split(files: Vec<Labelled>, fraction: f64, seed: u64) -> SetFiles {
    let mut rng = SplitMix(seed);
    let mut by_class: std::collections::BTreeMap<i64, Vec<Labelled>> = Default::default();
    for f in files {
        by_class.entry(f.class).or_default().push(f);
    }
    let mut out = SetFiles::default();
    for (_, mut members) in by_class {
        // Fisher-Yates with the fixed generator: the same split on every machine.
        for i in (1..members.len()).rev() {
            members.swap(i, rng.below(i + 1));
        }
        let queries = if members.len() < 2 { 0 } else { ((members.len() as f64 * fraction).round() as usize).max(1) };
        let queries = queries.min(members.len().saturating_sub(1));
        let rest = members.split_off(queries);
        out.queries.extend(members);
        out.gallery.extend(rest);
    }
    out
}

/// Decodes a file as the service does (same limits and orientation).
pub fn load(path: &Path, limits: ImageLimits) -> anyhow::Result<DynamicImage> {
    let bytes = std::fs::read(path)?;
    Ok(decode(&bytes, limits)?.0)
}

/// The raw-pixel baseline vector of an RGB image (already over white):
/// stretched to 32 x 32, in [0, 1] (mean-centred over the whole set by the caller).
pub fn raw_pixels(rgb: &DynamicImage) -> Vec<f32> {
    rgb.resize_exact(RAW_SIDE, RAW_SIDE, FilterType::Triangle)
        .to_rgb8()
        .as_raw()
        .iter()
        .map(|p| *p as f32 / 255.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_syntax() {
        let one: FolderSet = "clip=data/clip".parse().unwrap();
        assert_eq!((one.name.as_str(), one.queries), ("clip", None));
        let two: FolderSet = "copy=g,q".parse().unwrap();
        assert_eq!((two.gallery, two.queries), (PathBuf::from("g"), Some(PathBuf::from("q"))));
        assert!("nodir".parse::<FolderSet>().is_err());
        assert!("=x".parse::<FolderSet>().is_err());
    }

    #[test]
    fn split_keeps_a_gallery_image_per_class_and_is_seeded() {
        let files: Vec<Labelled> = (0..23)
            .map(|i| Labelled {
                path: format!("{i}.png").into(),
                class: if i < 20 {
                    0
                } else if i < 22 {
                    1
                } else {
                    2
                },
            })
            .collect();
        let a = split(files.clone(), 0.2, 7);
        let count = |v: &[Labelled], c| v.iter().filter(|f| f.class == c).count();
        assert_eq!((count(&a.queries, 0), count(&a.gallery, 0)), (4, 16));
        assert_eq!((count(&a.queries, 1), count(&a.gallery, 1)), (1, 1));
        assert_eq!((count(&a.queries, 2), count(&a.gallery, 2)), (0, 1), "a lone image is a distractor");
        let b = split(files, 0.2, 7);
        let paths = |s: &SetFiles| s.queries.iter().map(|f| f.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&a), paths(&b));
    }
}
