//! HMAC-SHA256 request signatures of the platforms that push to us (WhatsApp's
//! `X-Hub-Signature-256`, Slack's `X-Slack-Signature`): checked on the raw bytes
//! before anything is parsed, compared in constant time by `hmac`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Whether `signature_hex` is the HMAC-SHA256 under `secret` of `parts` joined.
pub(crate) fn matches(secret: &str, parts: &[&[u8]], signature_hex: &str) -> bool {
    let Ok(signature) = hex::decode(signature_hex) else {
        return false;
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    // `verify_slice` compares in constant time.
    mac.verify_slice(&signature).is_ok()
}

/// The hex HMAC-SHA256 of `parts` under `secret` (what a platform sends).
#[cfg(test)]
pub(crate) fn sign(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    for part in parts {
        mac.update(part);
    }
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_matches_only_its_secret_and_bytes() {
        // RFC 4231 test case 2.
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert!(matches(
            "Jefe",
            &[b"what do ya want ", b"for nothing?"],
            expected
        ));
        assert_eq!(sign("Jefe", &[b"what do ya want for nothing?"]), expected);
        assert!(!matches(
            "jefe",
            &[b"what do ya want for nothing?"],
            expected
        ));
        assert!(!matches(
            "Jefe",
            &[b"what do ya want for nothing!"],
            expected
        ));
        assert!(!matches("Jefe", &[b"x"], "not hex"));
        assert!(!matches("Jefe", &[b"x"], ""));
    }
}
