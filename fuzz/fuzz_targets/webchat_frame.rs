//! A text frame from the web chat page (WebSocket text frames are UTF-8).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = std::str::from_utf8(data) {
        let _ = nexo_worker::fuzzing::fuzz_client_frame(frame);
    }
});
