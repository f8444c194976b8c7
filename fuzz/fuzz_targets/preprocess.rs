//! Image bytes through decoding and preprocessing, as every upload and query
//! goes: any input must give prepared pixels of the right shape or a typed
//! error, never a panic, a hang or an allocation past the limits.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use lookalike::fuzzing;
use lookalike::preprocess::Preprocessor;

static PREPROCESSOR: LazyLock<Preprocessor> = LazyLock::new(fuzzing::preprocessor);

fuzz_target!(|data: &[u8]| {
    fuzzing::check_preprocess(&PREPROCESSOR, data);
});
