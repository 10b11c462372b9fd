//! Treaty's wire and log schema, generated from `proto/treaty/v1/*.proto`.
//!
//! - [`v1::coordinator_client`] / [`v1::coordinator_server`]: the `treaty.v1.Coordinator`
//!   service that `treatyd` serves.
//! - [`v1::participant_client`] / [`v1::participant_server`]: the `treaty.v1.Participant`
//!   service that services embedding `treaty-sdk` serve.
//! - [`v1::LogRecord`]: the coordinator's durable record of one transaction.
//! - [`limits`]: the size limits participants enforce, shared with the coordinator's
//!   configuration checks.
//! - [`trace_context`]: W3C trace context (`traceparent`) in gRPC metadata, shared by the
//!   client, `treatyd` and participants.
//!
//! `bytes` fields are [`bytes::Bytes`], so payloads are shared, not copied.

pub mod limits;
pub mod trace_context;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("treaty.v1");
}

/// The encoded `FileDescriptorSet` of every Treaty proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("treaty_descriptor");

/// The version written in [`v1::LogRecord::format_version`] by this build.
pub const LOG_FORMAT_VERSION: u32 = 1;
