//! The body of a webhook `POST`, checked as a signed request's (first byte odd) or an
//! unsigned one's.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, body)) = data.split_first() else {
        return;
    };
    let _ = nexo_worker::fuzzing::fuzz_post_body(body, first & 1 == 1);
});
