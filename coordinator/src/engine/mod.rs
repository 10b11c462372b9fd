//! The protocol engine: pure state machines for 2PC (presumed abort) and saga.
//!
//! Sans-I/O: [`machine::Tx::handle`] takes events and returns commands; the runtime
//! (`crate::runtime`) owns sockets, files and time, and the simulation drives the same code
//! with a simulated network, clock and log. Nothing here awaits, sleeps, reads a clock or does
//! I/O.
pub mod admission;
pub mod machine;
pub mod types;

pub use admission::{answer_outcome, decide_begin, BeginDecision, Known};
pub use machine::{Command, Event, Mutations, NewTx, Op, Reply, Tx};
pub use types::*;

#[cfg(test)]
mod tests;
