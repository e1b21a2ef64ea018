//! The nexo operator. Controllers for `Agent`, `Channel`, `Extension` and `WorkerPool`
//! arrive with the operator issue; until then this binary only says so.

fn main() {
    eprintln!(
        "nexo-operator {}: controllers are not implemented yet; see the project README",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
