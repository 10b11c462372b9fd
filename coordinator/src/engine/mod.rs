//! The protocol engine: pure state machines for 2PC (presumed abort) and saga.
pub mod types;
