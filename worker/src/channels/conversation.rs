//! Conversation ids the server issues. A conversation id is an identity: whoever
//! presents it continues that conversation (its history) and, where no other identity
//! exists, is its sender (its memories). So ids are random and long enough that
//! nobody can guess another's, and a client that did not get one from the server can
//! only present one of the same shape (which it then has to itself).

/// Random bytes in an id: 128 bits, far beyond guessing.
const ID_BYTES: usize = 16;

/// How an issued id looks, for error messages.
pub(crate) const SHAPE: &str = "32 lowercase hexadecimal characters";

/// A new, unguessable conversation id: [`ID_BYTES`] from the operating system's
/// random source, as lowercase hex.
pub(crate) fn issue() -> String {
    let mut bytes = [0u8; ID_BYTES];
    // The OS random source failing is not something a process can work around; no id
    // from a weaker source is better than a guessable one.
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    hex::encode(bytes)
}

/// Whether `id` has the shape of an issued id (it may still be one the client made
/// up, which is fine: it cannot be anyone else's unless they shared it).
pub(crate) fn is_well_formed(id: &str) -> bool {
    id.len() == 2 * ID_BYTES && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_ids_are_well_formed_and_distinct() {
        let a = issue();
        let b = issue();
        assert!(is_well_formed(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn short_or_foreign_ids_are_not_well_formed() {
        for id in [
            "",
            "a",
            "c-1",
            "0192d3c4-0000-7000-8000-000000000000",
            &"A".repeat(32),
            &"a".repeat(31),
            &"a".repeat(33),
            &format!("{}g", "a".repeat(31)),
        ] {
            assert!(!is_well_formed(id), "{id}");
        }
    }
}
