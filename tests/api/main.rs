//! Integration tests through the front door: one binary, one module per area.

mod errors;
mod formats;
mod helpers;
mod search;
