//! Treaty's runnable examples, and the pieces of them that tests reuse.
//!
//! - [`bank`]: account handlers (2PC `debit`/`credit`, saga `saga-debit`/`saga-credit`) over a
//!   sled tree, and the `Bank` inspection service. Binaries: `bank-account` (one instance of
//!   the account service) and `bank` (transfer and balances CLI).
//! - [`trip`]: flight, hotel and car booking services for the `trip` saga binary.

pub mod bank;
pub mod trip;

/// Generated code of `proto/bank.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("treaty.examples.bank.v1");
}
