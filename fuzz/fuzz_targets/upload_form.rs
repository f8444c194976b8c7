//! A `POST /gallery` body through the multipart parser and the form rules
//! (parts, labels, metadata, limits): any input must give a valid form or a
//! 4xx error, never a panic or a 5xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lookalike::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::check_upload_form(data);
});
