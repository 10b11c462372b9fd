//! The protocol engine: pure state machines for 2PC (presumed abort) and saga.
//!
//! Sans-I/O: [`machine::Tx::handle`] takes events and returns commands; the runtime
//! (`crate::runtime`) owns sockets, files and time, and the simulation drives the same code
//! with a simulated network, clock and log. Nothing here awaits, sleeps, reads a clock or does
//! I/O.
//!
//! - [`machine`]: what every transaction shares ([`Tx`], [`Event`], [`Command`], gates on
//!   forced writes, retries, recovery, operator resolution) and the internal `Protocol`
//!   trait each shape implements.
//! - `two_phase`: two-phase commit, presumed abort. `saga`: sagas. One file per shape.
//! - [`admission`]: what to answer about a gid (`Begin` and `Outcome`), shared with the
//!   simulation.
//! - [`types`]: the engine's own record types (no protobuf here).
pub mod admission;
pub mod machine;
mod saga;
mod two_phase;
pub mod types;

pub use admission::{answer_outcome, decide_begin, is_finished, BeginDecision, Known};
#[cfg(feature = "mutations")]
pub use machine::Mutations;
pub use machine::{Command, Event, NewTx, Op, Reply, Tx};
pub use types::*;

#[cfg(test)]
mod tests;
