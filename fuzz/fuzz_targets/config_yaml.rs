//! The worker's config file and the catalog file, through the loader that reports
//! problems with file and line: any text is a config, a catalog, or a located error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    // `${VAR}` references expand to nothing known, like unset variables.
    let _ = nexo_worker::config::parse(path, text, |_| None);
    let _ = nexo_worker::config::parse_catalog(path, text);
});
