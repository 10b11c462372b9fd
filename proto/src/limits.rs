//! Hard limits shared by every Treaty process: what a participant built on `treaty-sdk`
//! accepts, and therefore the most a coordinator may be configured to send.
//!
//! The coordinator's own limits (DESIGN.md section 2) are configurable and usually smaller;
//! these are the ceilings above which a participant refuses a request, because the values
//! become parts of its storage keys and rows. A coordinator configured above them would start
//! transactions whose branches every participant refuses, so it must refuse such a
//! configuration at start.

/// Longest gid, in bytes, a participant accepts (the gid is part of every barrier key).
/// The coordinator's limit is configurable (default 128 bytes) and must not exceed this.
pub const GID_BYTES_MAX: usize = 1024;

/// Longest handler name, log id and outcome endpoint, in bytes, a participant accepts (each
/// is stored in barrier rows or index entries, which must stay small).
pub const FIELD_BYTES_MAX: usize = 1024;
