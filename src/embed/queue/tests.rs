//! The batching rule's cases, in milliseconds.

use std::sync::Arc;

use super::*;

fn policy(max_batch: usize, max_delay_ms: u64, capacity: usize) -> BatchPolicy {
    BatchPolicy { max_batch, max_delay: Duration::from_millis(max_delay_ms), capacity, max_bulk_batch: max_batch }
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
    queue.worker_ready();
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
    queue.worker_ready();
    assert_eq!(batcher.join().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn cancelled_entries_are_skipped() {
    let queue = Queue::new(policy(4, 0, 64));
    queue.worker_ready();
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
fn interactive_entries_go_first_in_batches_of_their_own() {
    let queue = Queue::new(policy(3, 0, 64));
    let mut answers = Vec::new();
    for i in 0..4 {
        let (e, a) = entry(100.0 + i as f32, Priority::Bulk);
        queue.push(e).unwrap();
        answers.push(a);
    }
    let (e, a) = entry(1.0, Priority::Interactive);
    queue.push(e).unwrap();
    answers.push(a);
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![1.0]);
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![100.0, 101.0, 102.0]);
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![103.0]);
}

#[test]
fn a_bulk_batch_is_cut_only_for_a_free_worker() {
    let queue = Arc::new(Queue::new(policy(2, 0, 64)));
    let mut answers = Vec::new();
    for i in 0..4 {
        let (e, a) = entry(100.0 + i as f32, Priority::Bulk);
        queue.push(e).unwrap();
        answers.push(a);
    }
    let batcher = {
        let queue = queue.clone();
        std::thread::spawn(move || values(&queue.next_batch().unwrap()))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!batcher.is_finished(), "a full bulk batch waits, uncut, while every worker is busy");
    // A search arriving now goes into the next batch, ahead of the bulk work.
    let (e, a) = entry(1.0, Priority::Interactive);
    queue.push(e).unwrap();
    answers.push(a);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!batcher.is_finished(), "a partial interactive batch waits for a free worker");
    queue.worker_ready();
    assert_eq!(batcher.join().unwrap(), vec![1.0]);
}

#[test]
fn a_batch_cut_for_a_busy_worker_is_held_for_the_next_one_to_come_free() {
    let queue = Queue::new(policy(2, 0, 64));
    let mut answers = Vec::new();
    for i in 0..4 {
        let (e, a) = entry(i as f32, Priority::Interactive);
        queue.push(e).unwrap();
        answers.push(a);
    }
    assert_eq!(values(&queue.next_batch().unwrap()), vec![0.0, 1.0]); // full: cut and held
    queue.worker_ready(); // the worker takes the held batch: it is not free for another
    assert_eq!(queue.lock().idle_workers, 0);
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![2.0, 3.0]);
}

#[test]
fn a_batch_takes_at_most_its_bulk_share() {
    let queue = Queue::new(BatchPolicy { max_bulk_batch: 2, ..policy(4, 0, 64) });
    let mut answers = Vec::new();
    for i in 0..5 {
        let (e, a) = entry(100.0 + i as f32, Priority::Bulk);
        queue.push(e).unwrap();
        answers.push(a);
    }
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![100.0, 101.0]);
    for i in 0..3 {
        let (e, a) = entry(i as f32, Priority::Interactive);
        queue.push(e).unwrap();
        answers.push(a);
    }
    queue.worker_ready();
    assert_eq!(values(&queue.next_batch().unwrap()), vec![0.0, 1.0, 2.0]);
    queue.worker_ready();
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
