//! Treaty's coordinator.
pub mod engine;
pub mod log;
