//! Fashion-MNIST files as shipped by the Debian package `dataset-fashion-mnist`
//! (gzipped IDX files).

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use image::GrayImage;

pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// One split: 28x28 grey images and their class numbers.
pub struct Split {
    pub images: Vec<GrayImage>,
    pub labels: Vec<i64>,
}

/// Reads the `train` or `t10k` split from `dir`.
pub fn load(dir: &Path, prefix: &str) -> anyhow::Result<Split> {
    let images = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")))?;
    let labels = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")))?;
    anyhow::ensure!(images.dims.len() == 3 && labels.dims.len() == 1, "unexpected IDX shapes");
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    anyhow::ensure!(labels.dims[0] == n, "{n} images but {} labels", labels.dims[0]);
    let images = images
        .data
        .chunks_exact(h * w)
        .map(|px| GrayImage::from_raw(w as u32, h as u32, px.to_vec()).expect("chunk has h * w bytes"))
        .collect();
    Ok(Split { images, labels: labels.data.iter().map(|l| *l as i64).collect() })
}

struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn read_idx(path: &Path) -> anyhow::Result<Idx> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (install the Debian package dataset-fashion-mnist)", path.display()))?;
    let mut bytes = Vec::new();
    GzDecoder::new(file).read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() >= 4 && bytes[2] == 0x08, "{}: not an unsigned-byte IDX file", path.display());
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    anyhow::ensure!(bytes.len() >= header, "{}: truncated header", path.display());
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    anyhow::ensure!(
        bytes.len() - header == expected,
        "{}: {} data bytes, expected {expected}",
        path.display(),
        bytes.len() - header
    );
    Ok(Idx { dims, data: bytes[header..].to_vec() })
}
