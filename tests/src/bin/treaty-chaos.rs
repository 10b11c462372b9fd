//! `treaty-chaos`: the chaos runner. A bank (several `bank-account` processes, each behind a
//! fault proxy) under a stream of concurrent 2PC and saga transfers driven by `treatyd`, while
//! a seeded nemesis SIGKILLs participants and the coordinator (also at each named failpoint)
//! and cuts, black-holes and delays connections. Then the faults stop, every transaction must
//! end, and the bank is checked (see `chaos/check.rs` for the invariants). Extra modes:
//! `--sync-faults`, `--retention`, `--power-cut`; `--all` runs every one of them at once.
//!
//! ```text
//! TREATY_SEED=42 TREATY_CHAOS_SECS=600 cargo run --release -p treaty-tests --bin treaty-chaos
//! # the long campaign: every mode and nemesis together
//! TREATY_CHAOS_SECS=1800 cargo run --release -p treaty-tests --bin treaty-chaos -- --all
//! ```
//!
//! The code is in [`chaos`] (this file is the entry point only).

#[path = "../chaos/mod.rs"]
mod chaos;

fn main() -> std::process::ExitCode {
    chaos::main()
}
