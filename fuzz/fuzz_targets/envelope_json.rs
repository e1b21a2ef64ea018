//! An envelope from the broker: any bytes either fail to parse or parse into an
//! envelope that survives a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexo_api::Envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_json(data) {
        let again = Envelope::from_json(&envelope.to_json()).expect("a written envelope reads");
        assert_eq!(again, envelope);
    }
});
