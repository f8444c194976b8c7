//! Why two images match: occlusion sensitivity (Zeiler and Fergus, 2014).
//! Each image's input is cut into a grid; a window of 3 x 3 cells, centred
//! on each cell in turn, is hidden (set to the normalisation mean, 0 after
//! normalising: a neutral grey) and the image embedded again; how far the
//! similarity to the other image falls is that window's share of the match,
//! and a cell's is the mean over the windows that hide it. (Hiding single
//! cells, tried first, gave noisier maps.) It asks nothing of the model beyond its
//! embeddings, so it works for every model folder, bring-your-own included,
//! and it measures the encoder's actual behaviour rather than a gradient's
//! local slope. Cost: 2 x grid^2 extra embeddings, at bulk priority: behind
//! searches and uploads, waiting for room in the queue rather than taking it.

use bytes::Bytes;
use serde::Serialize;

use super::{Catalog, CatalogError, Priority};
use crate::manifest::ResizePolicy;
use crate::vector::cosine;

/// Cells per side.
pub const GRID: usize = 7;

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub model: String,
    pub similarity: f32,
    /// Cells per side of each map.
    pub grid: usize,
    /// The frame the maps cover: the whole image for `stretch`, its centred
    /// square for `center_crop`.
    pub resize: ResizePolicy,
    /// For each cell of `a` (rows top to bottom, each left to right), how
    /// much hiding it (with its neighbours) lowers the similarity to `b`, as a
    /// share of the hottest cell's (0 to 1; all 0 when hiding nothing lowers it).
    pub a: Vec<Vec<f32>>,
    pub b: Vec<Vec<f32>>,
    /// The largest fall of the similarity when a window of each image is hidden.
    pub largest_drop: [f32; 2],
}

impl Catalog {
    /// The similarity maps of two images against each other.
    pub async fn explain(&self, a: Bytes, b: Bytes) -> Result<Explanation, CatalogError> {
        let active = self.active();
        let size = active.version.manifest.input.size as usize;
        let prepared = active.prepare_all(vec![a, b], Priority::Bulk).await?;
        let (a, b) = (&prepared[0].pixels, &prepared[1].pixels);
        let mut inputs = vec![a.clone(), b.clone()];
        inputs.extend(occluded(a, size));
        inputs.extend(occluded(b, size));
        let vectors = active.embed_all(inputs, Priority::Bulk).await?;
        let (whole, cells) = vectors.split_at(2);
        let similarity = cosine(&whole[0], &whole[1]);
        let (cells_a, cells_b) = cells.split_at(GRID * GRID);
        let (map_a, drop_a) = heat(cells_a, &whole[1], similarity);
        let (map_b, drop_b) = heat(cells_b, &whole[0], similarity);
        Ok(Explanation {
            model: active.name(),
            similarity,
            grid: GRID,
            resize: active.version.manifest.input.resize,
            a: map_a,
            b: map_b,
            largest_drop: [drop_a, drop_b],
        })
    }

    /// `explain` for two stored items; `None` when either does not exist.
    pub async fn explain_items(&self, a: i64, b: i64) -> Result<Option<Explanation>, CatalogError> {
        let (Some(first), Some(second)) = (self.store.image(a).await?, self.store.image(b).await?) else {
            return Ok(None);
        };
        Ok(Some(self.explain(first.bytes.into(), second.bytes.into()).await?))
    }
}

/// The input with each grid cell hidden in turn (CHW, `size` x `size`).
fn occluded(pixels: &[f32], size: usize) -> Vec<Vec<f32>> {
    let plane = size * size;
    let mut out = Vec::with_capacity(GRID * GRID);
    for row in 0..GRID {
        for col in 0..GRID {
            let mut hidden = pixels.to_vec();
            let (rows, cols) = (window(row, size), window(col, size));
            for channel in hidden.chunks_mut(plane) {
                for y in rows.clone() {
                    channel[y * size + cols.start..y * size + cols.end].fill(0.0);
                }
            }
            out.push(hidden);
        }
    }
    out
}

/// The pixel rows (or columns) of the window centred on grid cell `cell`: it
/// and its neighbours, within the image.
fn window(cell: usize, size: usize) -> std::ops::Range<usize> {
    cell.saturating_sub(1) * size / GRID..(cell + 2).min(GRID) * size / GRID
}

/// Each cell's mean fall in similarity to `other` over the windows hiding it,
/// scaled by the largest; and the largest window's fall.
fn heat(windows: &[Vec<f32>], other: &[f32], similarity: f32) -> (Vec<Vec<f32>>, f32) {
    let drops: Vec<f32> = windows.iter().map(|v| (similarity - cosine(v, other)).max(0.0)).collect();
    let drops = &drops;
    let near = |i: usize| i.saturating_sub(1)..(i + 2).min(GRID);
    let mean = |row: usize, col: usize| {
        let covering: Vec<f32> = near(row).flat_map(|r| near(col).map(move |c| drops[r * GRID + c])).collect();
        covering.iter().sum::<f32>() / covering.len() as f32
    };
    let cells: Vec<Vec<f32>> = (0..GRID).map(|r| (0..GRID).map(|c| mean(r, c)).collect()).collect();
    let top = cells.iter().flatten().copied().fold(0.0, f32::max);
    let scale = if top > 0.0 { 1.0 / top } else { 0.0 };
    let largest = drops.iter().copied().fold(0.0, f32::max);
    (cells.into_iter().map(|row| row.into_iter().map(|v| v * scale).collect()).collect(), largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_window_hides_its_cell_and_the_neighbours_within_the_image() {
        let size = 14; // cells of 2 x 2 pixels
        let pixels = vec![1.0; 3 * size * size];
        let variants = occluded(&pixels, size);
        assert_eq!(variants.len(), GRID * GRID);
        let hidden = |v: &Vec<f32>| v.iter().filter(|x| **x == 0.0).count();
        assert_eq!(hidden(&variants[0]), 3 * 4 * 4, "a corner window: 2 x 2 cells in each channel");
        assert_eq!(hidden(&variants[3 * GRID + 3]), 3 * 6 * 6, "an inner window: 3 x 3 cells");
        // Row 1, column 3: pixel rows 0-5, columns 4-9 of every channel.
        let window = &variants[GRID + 3];
        assert!([4, 5 * size + 9, size * size + 2 * size + 6].iter().all(|&i| window[i] == 0.0));
        assert_eq!(window[2 * size + 10], 1.0);
        assert_eq!(window[6 * size + 6], 1.0);
    }

    #[test]
    fn a_cell_is_the_mean_fall_over_the_windows_hiding_it() {
        let other = vec![1.0, 0.0];
        let mut windows = vec![vec![1.0, 0.0]; GRID * GRID];
        windows[0] = vec![0.0, 1.0]; // hiding the corner window: similarity 1 -> 0
        let (map, largest) = heat(&windows, &other, 1.0);
        assert!((largest - 1.0).abs() < 1e-6);
        // Cell (0, 0) is hidden by 4 windows, cell (1, 1) by 9; one of them fell by 1.
        assert!((map[0][0] - 1.0).abs() < 1e-6);
        assert!((map[1][1] - 4.0 / 9.0).abs() < 1e-5);
        assert_eq!(map[2][2], 0.0);
    }
}
