//! The embedding queue and its batching rule. Every image to embed is one
//! entry with its own reply channel; the batcher thread takes entries out in
//! batches, interactive ones first, so one forward pass serves many clients.
//!
//! A batch is due when `max_batch` entries wait, or when the oldest has waited
//! `max_delay` and a worker is free to run it. While every worker is busy,
//! entries keep accumulating into the next batch instead of being cut into
//! small ones that could not start any sooner.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::EmbedError;
use crate::metrics;

/// Who is waiting for an embedding. Bulk work (re-embedding the gallery) only
/// fills what interactive requests leave of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Interactive,
    Bulk,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Bulk => "bulk",
        }
    }
}

/// What a worker sends back for one image.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vector: Vec<f32>,
    /// How many images shared the forward pass.
    pub batch_size: usize,
    /// Time spent in the queue before the batch was formed.
    pub queue_wait: Duration,
}

pub type Reply = oneshot::Sender<Result<Embedded, EmbedError>>;

/// One image waiting to be embedded.
pub struct Entry {
    pub pixels: Vec<f32>,
    pub reply: Reply,
    pub enqueued: Instant,
    pub priority: Priority,
}

/// When a batch is due, and how many entries may wait.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Interactive entries that may wait; beyond this `push` fails fast.
    pub capacity: usize,
}

/// Entries taken out for one forward pass, each with how long it waited.
pub struct Taken {
    pub entries: Vec<Entry>,
    pub waits: Vec<Duration>,
}

pub struct Queue {
    policy: BatchPolicy,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    interactive: VecDeque<Entry>,
    bulk: VecDeque<Entry>,
    idle_workers: usize,
    closed: bool,
}

impl State {
    fn len(&self) -> usize {
        self.interactive.len() + self.bulk.len()
    }

    fn oldest(&self) -> Option<Instant> {
        let heads = [self.interactive.front(), self.bulk.front()];
        heads.into_iter().flatten().map(|e| e.enqueued).min()
    }

    fn publish_depth(&self) {
        metrics::queue_depth(Priority::Interactive.as_str(), self.interactive.len());
        metrics::queue_depth(Priority::Bulk.as_str(), self.bulk.len());
    }
}

impl Queue {
    pub fn new(policy: BatchPolicy) -> Self {
        let policy = BatchPolicy { max_batch: policy.max_batch.max(1), capacity: policy.capacity.max(1), ..policy };
        Self { policy, state: Mutex::new(State::default()), changed: Condvar::new() }
    }

    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    /// Adds an entry. Interactive entries beyond the capacity are refused at
    /// once; bulk entries are bounded by their submitter (see `Embedder`).
    pub fn push(&self, entry: Entry) -> Result<(), EmbedError> {
        let mut state = self.lock();
        if state.closed {
            return Err(EmbedError::Stopped);
        }
        match entry.priority {
            Priority::Interactive if state.interactive.len() >= self.policy.capacity => {
                return Err(EmbedError::Overloaded)
            }
            Priority::Interactive => state.interactive.push_back(entry),
            Priority::Bulk => state.bulk.push_back(entry),
        }
        state.publish_depth();
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Blocks until a batch is due and returns it; `None` once the queue is
    /// closed and drained.
    pub fn next_batch(&self) -> Option<Taken> {
        let mut state = self.lock();
        loop {
            let Some(oldest) = state.oldest() else {
                if state.closed {
                    return None;
                }
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            let deadline = oldest + self.policy.max_delay;
            let full = state.len() >= self.policy.max_batch;
            let runnable = state.idle_workers > 0 && now >= deadline;
            if full || runnable || state.closed {
                let taken = self.take(&mut state, now);
                if taken.entries.is_empty() {
                    continue; // every candidate had been cancelled
                }
                return Some(taken);
            }
            // Wake at the deadline, or earlier on a push or a worker becoming free.
            let timeout = if now < deadline { deadline - now } else { Duration::from_secs(3600) };
            state = self.changed.wait_timeout(state, timeout).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Takes up to `max_batch` live entries, interactive first; entries whose
    /// client went away are dropped here, before they cost a forward pass.
    fn take(&self, state: &mut State, now: Instant) -> Taken {
        let mut taken = Taken { entries: Vec::new(), waits: Vec::new() };
        while taken.entries.len() < self.policy.max_batch {
            let Some(entry) = state.interactive.pop_front().or_else(|| state.bulk.pop_front()) else { break };
            let wait = now.saturating_duration_since(entry.enqueued);
            if entry.reply.is_closed() {
                metrics::cancelled(entry.priority.as_str());
                continue;
            }
            metrics::queue_wait(entry.priority.as_str(), wait);
            taken.waits.push(wait);
            taken.entries.push(entry);
        }
        state.publish_depth();
        taken
    }

    /// A worker waits for its next batch (`true`) or has just got one (`false`).
    pub fn set_worker_idle(&self, idle: bool) {
        let mut state = self.lock();
        if idle {
            state.idle_workers += 1;
        } else {
            state.idle_workers = state.idle_workers.saturating_sub(1);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Refuses new entries; what is queued is still served.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one push or pop.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn policy(max_batch: usize, max_delay_ms: u64, capacity: usize) -> BatchPolicy {
        BatchPolicy { max_batch, max_delay: Duration::from_millis(max_delay_ms), capacity }
    }

    fn entry(value: f32, priority: Priority) -> (Entry, oneshot::Receiver<Result<Embedded, EmbedError>>) {
        let (reply, answer) = oneshot::channel();
        (Entry { pixels: vec![value], reply, enqueued: Instant::now(), priority }, answer)
    }

    fn values(taken: &Taken) -> Vec<f32> {
        taken.entries.iter().map(|e| e.pixels[0]).collect()
    }

    #[test]
    fn a_full_batch_is_due_at_once_even_with_every_worker_busy() {
        let queue = Queue::new(policy(4, 10_000, 64));
        let _answers: Vec<_> = (0..6)
            .map(|i| {
                let (e, a) = entry(i as f32, Priority::Interactive);
                queue.push(e).unwrap();
                a
            })
            .collect();
        let started = Instant::now();
        let taken = queue.next_batch().unwrap();
        assert_eq!(values(&taken), vec![0.0, 1.0, 2.0, 3.0]);
        assert!(started.elapsed() < Duration::from_secs(1), "a full batch must not wait for the deadline");
    }

    #[test]
    fn a_partial_batch_waits_for_the_deadline_then_goes_to_an_idle_worker() {
        let queue = Queue::new(policy(8, 150, 64));
        queue.set_worker_idle(true);
        let (e, _a) = entry(1.0, Priority::Interactive);
        let started = Instant::now();
        queue.push(e).unwrap();
        let (e, _b) = entry(2.0, Priority::Interactive);
        queue.push(e).unwrap();
        let taken = queue.next_batch().unwrap();
        let waited = started.elapsed();
        assert_eq!(values(&taken), vec![1.0, 2.0]);
        assert!(waited >= Duration::from_millis(150), "dispatched after {waited:?}, before the deadline");
        assert!(waited < Duration::from_millis(1500), "dispatched after {waited:?}, long past the deadline");
        assert!(taken.waits[0] >= Duration::from_millis(150));
    }

    #[test]
    fn while_every_worker_is_busy_a_partial_batch_keeps_filling() {
        let queue = Arc::new(Queue::new(policy(3, 0, 64)));
        let (e, _a) = entry(1.0, Priority::Interactive);
        queue.push(e).unwrap();
        let batcher = {
            let queue = queue.clone();
            std::thread::spawn(move || values(&queue.next_batch().unwrap()))
        };
        std::thread::sleep(Duration::from_millis(100));
        let (e, _b) = entry(2.0, Priority::Interactive);
        queue.push(e).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!batcher.is_finished(), "no worker is free and the batch is not full: nothing is due");
        queue.set_worker_idle(true);
        assert_eq!(batcher.join().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn cancelled_entries_are_skipped() {
        let queue = Queue::new(policy(4, 0, 64));
        queue.set_worker_idle(true);
        let (e, a) = entry(1.0, Priority::Interactive);
        queue.push(e).unwrap();
        let (e, _b) = entry(2.0, Priority::Interactive);
        queue.push(e).unwrap();
        drop(a); // this client went away
        assert_eq!(values(&queue.next_batch().unwrap()), vec![2.0]);
    }

    #[test]
    fn interactive_entries_beyond_capacity_are_refused_but_bulk_ones_are_not() {
        let queue = Queue::new(policy(4, 0, 2));
        let mut answers = Vec::new();
        for i in 0..2 {
            let (e, a) = entry(i as f32, Priority::Interactive);
            queue.push(e).unwrap();
            answers.push(a);
        }
        let (e, _a) = entry(9.0, Priority::Interactive);
        assert!(matches!(queue.push(e), Err(EmbedError::Overloaded)));
        let (e, _b) = entry(10.0, Priority::Bulk);
        queue.push(e).unwrap();
    }

    #[test]
    fn interactive_entries_go_first_and_bulk_fills_the_rest() {
        let queue = Queue::new(policy(3, 0, 64));
        queue.set_worker_idle(true);
        let mut answers = Vec::new();
        for i in 0..4 {
            let (e, a) = entry(100.0 + i as f32, Priority::Bulk);
            queue.push(e).unwrap();
            answers.push(a);
        }
        let (e, a) = entry(1.0, Priority::Interactive);
        queue.push(e).unwrap();
        answers.push(a);
        assert_eq!(values(&queue.next_batch().unwrap()), vec![1.0, 100.0, 101.0]);
        assert_eq!(values(&queue.next_batch().unwrap()), vec![102.0, 103.0]);
    }

    #[test]
    fn a_closed_queue_serves_what_it_holds_then_ends() {
        let queue = Queue::new(policy(8, 10_000, 64));
        let (e, _a) = entry(1.0, Priority::Interactive);
        queue.push(e).unwrap();
        queue.close();
        let (e, _b) = entry(2.0, Priority::Interactive);
        assert!(matches!(queue.push(e), Err(EmbedError::Stopped)));
        assert_eq!(values(&queue.next_batch().unwrap()), vec![1.0]);
        assert!(queue.next_batch().is_none());
    }
}
