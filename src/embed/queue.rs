//! The embedding queue and its batching rule. Every image to embed is one
//! entry with its own reply channel; the batcher thread takes entries out in
//! batches, interactive ones first, so one forward pass serves many clients.
//!
//! An interactive batch is due when `max_batch` entries wait, or when the
//! oldest has waited `max_delay` and a worker is free to run it. While every
//! worker is busy, entries keep accumulating into the next batch instead of
//! being cut into small ones that could not start any sooner.
//!
//! Bulk work never shares a batch with interactive entries and never waits
//! cut in hand for a busy worker: a bulk batch (at most `max_bulk_batch`) is
//! cut only for a worker that is free, so a search that arrives meanwhile
//! waits for at most the one bulk pass already running.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::EmbedError;
use crate::metrics;

/// Who is waiting for an embedding. Bulk work (imports, re-embedding the
/// gallery) only runs while no interactive entry waits.
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
    /// Most bulk entries in one batch. A forward pass cannot be interrupted,
    /// so a search that arrives during a bulk batch waits for all of it: a
    /// small bulk share keeps that wait short.
    pub max_bulk_batch: usize,
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
    /// Workers waiting for a batch that no cut batch is promised to yet.
    idle_workers: usize,
    /// A batch has been cut with no worker free; the next worker to come free takes it.
    held: bool,
    closed: bool,
}

impl State {
    /// The entry whose wait decides when the next batch is due: the oldest
    /// interactive one, else the oldest bulk one.
    fn oldest(&self) -> Option<&Entry> {
        self.interactive.front().or_else(|| self.bulk.front())
    }

    fn publish_depth(&self) {
        metrics::queue_depth(Priority::Interactive.as_str(), self.interactive.len());
        metrics::queue_depth(Priority::Bulk.as_str(), self.bulk.len());
    }
}

impl Queue {
    pub fn new(policy: BatchPolicy) -> Self {
        let max_batch = policy.max_batch.max(1);
        let max_bulk_batch = policy.max_bulk_batch.clamp(1, max_batch);
        let policy = BatchPolicy { max_batch, max_bulk_batch, capacity: policy.capacity.max(1), ..policy };
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
            let deadline = oldest.enqueued + self.policy.max_delay;
            let full = oldest.priority == Priority::Interactive && state.interactive.len() >= self.policy.max_batch;
            let runnable = state.idle_workers > 0 && now >= deadline;
            if full || runnable || state.closed {
                let taken = self.take(&mut state, now);
                if taken.entries.is_empty() {
                    continue; // every candidate had been cancelled
                }
                // The batch is promised to a waiting worker, or to the next to come free.
                match state.idle_workers {
                    0 => state.held = true,
                    _ => state.idle_workers -= 1,
                }
                return Some(taken);
            }
            // Wake at the deadline, or earlier on a push or a worker becoming free.
            let timeout = if now < deadline { deadline - now } else { Duration::from_secs(3600) };
            state = self.changed.wait_timeout(state, timeout).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Takes up to `max_batch` live interactive entries or, when none waits,
    /// up to `max_bulk_batch` bulk ones; entries whose client went away are
    /// dropped here, before they cost a forward pass.
    fn take(&self, state: &mut State, now: Instant) -> Taken {
        let mut taken = Taken { entries: Vec::new(), waits: Vec::new() };
        let (entries, limit) = match state.interactive.is_empty() {
            false => (&mut state.interactive, self.policy.max_batch),
            true => (&mut state.bulk, self.policy.max_bulk_batch),
        };
        while taken.entries.len() < limit {
            let Some(entry) = entries.pop_front() else { break };
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

    /// A worker is free and about to wait for its next batch: the batch held
    /// for it, if one is, else the next one cut.
    pub fn worker_ready(&self) {
        let mut state = self.lock();
        match state.held {
            true => state.held = false,
            false => state.idle_workers += 1,
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
mod tests;
