//! `treaty-chaos`: the chaos runner. A bank (several `bank-account` processes, each behind a
//! fault proxy) under a stream of concurrent 2PC and saga transfers driven by `treatyd`, while
//! a seeded nemesis SIGKILLs participants and the coordinator (also at each named failpoint)
//! and cuts, black-holes and delays connections. Then the faults stop, every transaction must
//! end, and the bank is checked (see `chaos/check.rs` for the invariants).
//!
//! ```text
//! TREATY_SEED=42 TREATY_CHAOS_SECS=600 cargo run --release -p treaty-tests --bin treaty-chaos
//! ```
//!
//! The code is in [`chaos`] (this file is the entry point only).

#[path = "../chaos/mod.rs"]
mod chaos;

fn main() -> std::process::ExitCode {
    chaos::main()
}
