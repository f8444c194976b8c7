//! Helping users keep the gallery clean: finding near-copies across the whole
//! gallery (`duplicates`), as scans that run beside searches (`scans`).

pub mod duplicates;
pub mod scans;

pub use duplicates::{group_pairs, DuplicateGroup, NearPair};
pub use scans::{ScanError, ScanRecord, ScanState};
