//! The two kinds of long-lived threads behind the queue: one batcher that cuts
//! batches and lays their pixels out for the forward pass while the workers
//! compute, and one worker per model replica that owns its encoder. libtorch
//! keeps per-thread state, so torch work never leaves these threads.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::encoder::Encoder;
use super::queue::{Embedded, Queue, Reply, Taken};
use super::EmbedError;
use crate::metrics;

/// A batch ready for a forward pass: pixels contiguous, one reply per image.
pub struct Batch {
    pub pixels: Vec<f32>,
    pub replies: Vec<Reply>,
    pub waits: Vec<Duration>,
}

impl Batch {
    fn assemble(taken: Taken, input_len: usize) -> Self {
        let mut pixels = Vec::with_capacity(taken.entries.len() * input_len);
        let mut replies = Vec::with_capacity(taken.entries.len());
        for entry in taken.entries {
            pixels.extend_from_slice(&entry.pixels);
            replies.push(entry.reply);
        }
        Self { pixels, replies, waits: taken.waits }
    }
}

/// Cuts batches until the queue is closed and drained. The hand-off channel
/// holds no buffer: the batch in hand is the one ready for the next free
/// worker, and nothing else is cut before a worker takes it.
pub fn run_batcher(queue: &Queue, handoff: Sender<Batch>, input_len: usize) {
    while let Some(taken) = queue.next_batch() {
        if handoff.send(Batch::assemble(taken, input_len)).is_err() {
            tracing::error!("every embedding worker has stopped");
            break;
        }
    }
}

/// Runs batches on one encoder until the batcher stops.
pub fn run_worker(mut encoder: impl Encoder, queue: &Queue, batches: Receiver<Batch>, device: &str) {
    loop {
        queue.worker_ready();
        match batches.recv() {
            Ok(batch) => serve(&mut encoder, batch, device),
            Err(_) => break,
        }
    }
}

/// One forward pass. A failure, panics included, goes to every image of the
/// batch; the worker lives on for the next one.
fn serve(encoder: &mut impl Encoder, batch: Batch, device: &str) {
    if batch.replies.iter().all(|reply| reply.is_closed()) {
        return; // every client went away while the batch waited
    }
    let n = batch.replies.len();
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| encoder.encode(&batch.pixels, n)))
        .unwrap_or_else(|_| Err(EmbedError::Forward("the encoder panicked".into())));
    metrics::batch(device, n, started.elapsed());
    match result {
        Ok(vectors) if vectors.len() == n => {
            for ((reply, vector), queue_wait) in batch.replies.into_iter().zip(vectors).zip(batch.waits) {
                let _ = reply.send(Ok(Embedded { vector, batch_size: n, queue_wait }));
            }
        }
        Ok(vectors) => fail(batch.replies, EmbedError::Forward(format!("{} embeddings for {n} images", vectors.len()))),
        Err(error) => fail(batch.replies, error),
    }
}

fn fail(replies: Vec<Reply>, error: EmbedError) {
    tracing::error!(%error, batch = replies.len(), "forward pass failed");
    for reply in replies {
        let _ = reply.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;

    use super::super::queue::{BatchPolicy, Entry, Priority};
    use super::*;

    /// The embedding of an image is its first pixel; a pixel of -1 makes the
    /// batch fail and -2 makes it panic.
    struct Scripted(Arc<Mutex<Vec<usize>>>);

    impl Encoder for Scripted {
        fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.0.lock().unwrap().push(n);
            if pixels.contains(&-2.0) {
                panic!("scripted panic");
            }
            if pixels.contains(&-1.0) {
                return Err(EmbedError::Forward("scripted failure".into()));
            }
            Ok(pixels.chunks(pixels.len() / n).map(|c| vec![c[0]]).collect())
        }
    }

    /// Runs a batcher and one worker over the given images, queued before
    /// either starts, and returns every answer and the batch sizes seen.
    fn run_all(images: &[f32], max_batch: usize) -> (Vec<Result<Embedded, EmbedError>>, Vec<usize>) {
        let queue = Arc::new(Queue::new(BatchPolicy {
            max_batch,
            max_delay: Duration::ZERO,
            capacity: 64,
            max_bulk_batch: max_batch,
        }));
        let answers: Vec<_> = images
            .iter()
            .map(|&value| {
                let (reply, answer) = oneshot::channel();
                let entry =
                    Entry { pixels: vec![value, 0.0], reply, enqueued: Instant::now(), priority: Priority::Bulk };
                queue.push(entry).unwrap();
                answer
            })
            .collect();
        queue.close();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = crossbeam_channel::bounded(0);
        let worker = {
            let (queue, sizes) = (queue.clone(), sizes.clone());
            std::thread::spawn(move || run_worker(Scripted(sizes), &queue, rx, "test"))
        };
        run_batcher(&queue, tx, 2);
        worker.join().unwrap();
        let answers = answers.into_iter().map(|a| a.blocking_recv().unwrap()).collect();
        let sizes = sizes.lock().unwrap().clone();
        (answers, sizes)
    }

    #[test]
    fn every_image_gets_its_own_embedding() {
        let (answers, sizes) = run_all(&[1.0, 2.0, 3.0, 4.0, 5.0], 2);
        assert_eq!(sizes, vec![2, 2, 1]);
        let firsts: Vec<f32> = answers.iter().map(|a| a.as_ref().unwrap().vector[0]).collect();
        assert_eq!(firsts, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(answers[0].as_ref().unwrap().batch_size, 2);
    }

    #[test]
    fn a_failed_or_panicking_batch_fails_all_its_images_and_the_worker_goes_on() {
        let (answers, sizes) = run_all(&[1.0, -1.0, 3.0, -2.0, 5.0], 2);
        assert_eq!(sizes, vec![2, 2, 1]);
        assert!(answers[0].is_err() && answers[1].is_err(), "the failing batch fails for both images");
        assert!(answers[2].is_err() && answers[3].is_err(), "the panicking batch fails for both images");
        assert_eq!(answers[4].as_ref().unwrap().vector, vec![5.0], "the worker survived both");
    }
}
