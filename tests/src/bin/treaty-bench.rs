//! `treaty-bench`: throughput, latency and scale figures for Treaty, measured against the bare
//! gRPC bound of the same machine at the same moment.
//!
//! Process layout (everything on 127.0.0.1, OS-assigned ports):
//!
//! ```text
//!   treaty-bench (client, C tasks)  --Begin(wait)-->  treatyd  --Prepare/Commit/Execute-->  participant 0
//!                                                              \------------------------->  participant 1 ...
//! ```
//!
//! One no-op participant process per branch index (`treaty-bench participant`), because in a
//! real deployment each branch of a transaction is a different service: treatyd then holds one
//! HTTP/2 channel per participant, as it would in production. The participants answer at once
//! and store nothing, so what is measured is the coordinator (its log, its engine, its gRPC).
//!
//! The bare gRPC bound runs in the same invocation with the same processes and concurrency:
//! the client calls the participants' `Commit` directly (a trivial unary call), spread over the
//! participants as treatyd's calls are.
//!
//! treatyd's log counters (flushes, forced writes) are read from the one line it logs at
//! shutdown (`log stats at shutdown`, JSON log format), after the bench sends SIGTERM: no new
//! API, no extra port, and the count covers the daemon's whole life, which the bench controls.
//!
//! The code is in [`bench`] (this file is the command line only).

#[path = "../bench/mod.rs"]
mod bench;

fn main() -> std::process::ExitCode {
    bench::main()
}
