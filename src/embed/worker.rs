//! The worker loop: one OS thread owns one encoder and serves queued jobs in
//! batches. libtorch keeps per-thread state, so torch work never leaves the
//! few long-lived threads that run this loop.

use tokio::sync::{mpsc, oneshot};

use super::encoder::Encoder;
use super::EmbedError;

/// One image waiting to be embedded, with the channel its answer goes back on.
pub struct Job {
    pub pixels: Vec<f32>,
    pub reply: oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

/// Serves jobs until every sender is gone. Whatever is queued when the worker
/// becomes free (up to `max_batch`) goes into one forward pass, so load turns
/// into larger batches instead of a longer queue.
pub fn run(mut encoder: impl Encoder, mut jobs: mpsc::Receiver<Job>, max_batch: usize, input_len: usize) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A client that went away no longer needs its forward pass.
        batch.retain(|job| !job.reply.is_closed());
        if !batch.is_empty() {
            serve(&mut encoder, batch, input_len);
        }
    }
}

fn serve(encoder: &mut impl Encoder, batch: Vec<Job>, input_len: usize) {
    let mut pixels = Vec::with_capacity(batch.len() * input_len);
    for job in &batch {
        pixels.extend_from_slice(&job.pixels);
    }
    match encoder.encode(&pixels, batch.len()) {
        Ok(embeddings) => {
            for (job, embedding) in batch.into_iter().zip(embeddings) {
                let _ = job.reply.send(Ok(embedding));
            }
        }
        Err(error) => {
            tracing::error!(%error, batch = batch.len(), "forward pass failed");
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records batch sizes; the embedding of an image is its first pixel.
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

    impl Encoder for Recorder {
        fn encode(&mut self, pixels: &[f32], n: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.0.lock().unwrap().push(n);
            Ok(pixels.chunks(pixels.len() / n).map(|c| vec![c[0]]).collect())
        }
    }

    #[test]
    fn queued_jobs_form_batches_and_cancelled_ones_are_skipped() {
        let (tx, rx) = mpsc::channel(16);
        let mut replies = Vec::new();
        for i in 0..6 {
            let (reply, answer) = oneshot::channel();
            tx.try_send(Job { pixels: vec![i as f32, 0.0], reply }).unwrap();
            replies.push(answer);
        }
        drop(replies.remove(5)); // this client went away
        drop(tx);
        let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        run(Recorder(sizes.clone()), rx, 4, 2);
        assert_eq!(*sizes.lock().unwrap(), vec![4, 1]);
        for (i, answer) in replies.into_iter().enumerate() {
            assert_eq!(answer.blocking_recv().unwrap().unwrap(), vec![i as f32]);
        }
    }
}
