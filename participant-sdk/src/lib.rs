//! Treaty SDK.
pub mod durable;
