//! Deletes under load: an index of 20,000 vectors loses them one delete at a
//! time (as `DELETE /gallery/{id}` does), and each block of 1,000 deletes is
//! timed by how many tombstones it starts from. With a tombstone set copied
//! on every delete the time per delete grows with the set (quadratic in
//! all); with a structurally shared set it stays flat. Then searches over
//! the tombstoned graph, to show what the set costs a query.
//!
//!     cargo bench --bench index_deletes
//!
//! Prints Markdown tables; asserts nothing.

use std::time::Instant;

use lookalike::index::HnswIndex;
use rand::{Rng, SeedableRng};

const N: usize = 20_000;
const DIM: usize = 64;
const BLOCK: usize = 1_000;

fn unit_vector(rng: &mut impl Rng) -> Vec<f32> {
    let v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn main() -> anyhow::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let index = HnswIndex::new(DIM, N);
    let items: Vec<(i64, Vec<f32>)> = (0..N as i64).map(|id| (id, unit_vector(&mut rng))).collect();
    let started = Instant::now();
    index.insert(&items)?;
    eprintln!("built {N} vectors in {:.1} s", started.elapsed().as_secs_f64());
    let queries: Vec<Vec<f32>> = (0..1_000).map(|_| unit_vector(&mut rng)).collect();

    println!("| tombstones before | {BLOCK} single deletes, ms | µs per delete | searches/s (k = 10) after |");
    println!("| --- | --- | --- | --- |");
    for block in 0..(N / BLOCK) - 1 {
        let before = index.tombstones();
        let started = Instant::now();
        for id in block * BLOCK..(block + 1) * BLOCK {
            index.delete(&[id as i64]);
        }
        let seconds = started.elapsed().as_secs_f64();
        if block % 4 != 0 && block != N / BLOCK - 2 {
            continue;
        }
        let searched = Instant::now();
        for q in &queries {
            std::hint::black_box(index.search(q, 10, None)?);
        }
        let qps = queries.len() as f64 / searched.elapsed().as_secs_f64();
        println!("| {before} | {:.1} | {:.2} | {qps:.0} |", seconds * 1e3, seconds * 1e6 / BLOCK as f64);
    }
    Ok(())
}
