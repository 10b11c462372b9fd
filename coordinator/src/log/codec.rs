//! Encoding of [`TxRecord`] as the versioned protobuf [`pb::LogRecord`] (and of tombstones
//! and the log's identity). The field-level conversions between engine and protobuf types are
//! [`crate::mapping`]'s, shared with the gRPC API, so each enum pair has one `match`.
//!
//! Decoding is strict: a record written by a newer format, an `UNSPECIFIED` or unknown enum
//! value, an empty gid or a branch without its definition is refused with a reason naming the
//! field, so a damaged log stops startup instead of being misread.

use crate::engine::types::{BranchRecord, Outcome, Tombstone, TxRecord};
use crate::mapping::{
    branch_def_from_proto, branch_def_to_proto, branch_state_from_proto, branch_state_to_proto,
    mode_from_proto, mode_to_proto, outcome_from_proto, outcome_to_proto, phase_from_proto,
    phase_to_proto, resolution_from_proto, resolution_to_proto, retry_from_proto, retry_to_proto,
};
use prost::Message;
use treaty_proto::v1 as pb;

/// Why bytes could not be decoded into a [`TxRecord`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a protobuf `LogRecord`.
    #[error("not a valid protobuf LogRecord: {0}")]
    Malformed(String),
    /// Written by a format this build does not know (a newer treatyd, or a missing version).
    #[error("unknown format_version {found} (this build reads version {supported})")]
    UnknownVersion {
        /// The version in the record (0: missing).
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },
    /// A field holds a value the engine cannot represent.
    #[error("invalid field {field}: {reason}")]
    Invalid {
        /// Path of the field, e.g. `branches[2].state`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Encodes `rec` as a `LogRecord` with the current [`treaty_proto::LOG_FORMAT_VERSION`].
pub fn encode(rec: &TxRecord) -> Vec<u8> {
    to_proto(rec).encode_to_vec()
}

/// Decodes bytes written by [`encode`]. Never panics on bad input.
pub fn decode(bytes: &[u8]) -> Result<TxRecord, DecodeError> {
    let msg = pb::LogRecord::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    from_proto(msg)
}

/// The protobuf form of `rec`.
pub fn to_proto(rec: &TxRecord) -> pb::LogRecord {
    pb::LogRecord {
        format_version: treaty_proto::LOG_FORMAT_VERSION,
        gid: rec.gid.clone(),
        mode: mode_to_proto(rec.mode).into(),
        state: phase_to_proto(rec.phase).into(),
        branches: rec
            .branches
            .iter()
            .map(|b| pb::LogBranch {
                branch: Some(branch_def_to_proto(&b.def)),
                state: branch_state_to_proto(b.state).into(),
                attempts: b.attempts,
                last_error: b.last_error.clone(),
                resolution: b.resolution.as_ref().map(resolution_to_proto),
            })
            .collect(),
        created_unix_ms: rec.created_unix_ms,
        updated_unix_ms: rec.updated_unix_ms,
        deadline_unix_ms: rec.deadline_unix_ms,
        retry: Some(retry_to_proto(&rec.retry)),
        stuck: rec.stuck,
        seq: rec.seq,
        reason: rec.reason.clone(),
        trace_parent: rec.trace_parent.clone(),
    }
}

/// The engine form of a decoded `LogRecord`, refusing what [`decode`] refuses.
pub fn from_proto(msg: pb::LogRecord) -> Result<TxRecord, DecodeError> {
    check_version(msg.format_version)?;
    if msg.gid.is_empty() {
        return Err(invalid("gid", "empty"));
    }
    let mode = mode_from_proto(msg.mode).map_err(|e| invalid("mode", e))?;
    let phase = phase_from_proto(msg.state).map_err(|e| invalid("state", e))?;
    let retry = msg
        .retry
        .as_ref()
        .map(retry_from_proto)
        .ok_or_else(|| invalid("retry", "missing"))?;
    let mut branches = Vec::with_capacity(msg.branches.len());
    for (i, b) in msg.branches.into_iter().enumerate() {
        let state = branch_state_from_proto(b.state)
            .map_err(|e| invalid(&format!("branches[{i}].state"), e))?;
        let def = b
            .branch
            .map(branch_def_from_proto)
            .ok_or_else(|| invalid(&format!("branches[{i}].branch"), "missing"))?;
        branches.push(BranchRecord {
            def,
            state,
            attempts: b.attempts,
            last_error: b.last_error,
            resolution: b.resolution.map(resolution_from_proto),
        });
    }
    Ok(TxRecord {
        gid: msg.gid,
        mode,
        phase,
        branches,
        created_unix_ms: msg.created_unix_ms,
        updated_unix_ms: msg.updated_unix_ms,
        deadline_unix_ms: msg.deadline_unix_ms,
        retry,
        stuck: msg.stuck,
        seq: msg.seq,
        reason: msg.reason,
        // Tracing only: a value this coordinator did not write is dropped, never an error
        // that could keep a transaction from being recovered.
        trace_parent: msg
            .trace_parent
            .filter(|t| t.len() <= crate::engine::TRACE_PARENT_BYTES_MAX),
    })
}

/// Encodes a [`Tombstone`] (same format version as records).
pub fn encode_tombstone(t: &Tombstone) -> Vec<u8> {
    pb::Tombstone {
        format_version: treaty_proto::LOG_FORMAT_VERSION,
        gid: t.gid.clone(),
        outcome: outcome_to_proto(t.outcome).into(),
        fingerprint: t.fingerprint.to_vec().into(),
        collected_unix_ms: t.collected_unix_ms,
    }
    .encode_to_vec()
}

/// Decodes bytes written by [`encode_tombstone`]. Never panics on bad input.
pub fn decode_tombstone(bytes: &[u8]) -> Result<Tombstone, DecodeError> {
    let msg = pb::Tombstone::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    check_version(msg.format_version)?;
    if msg.gid.is_empty() {
        return Err(invalid("gid", "empty"));
    }
    let outcome = match outcome_from_proto(msg.outcome) {
        Ok(o @ (Outcome::Committed | Outcome::Aborted)) => o,
        _ => return Err(invalid("outcome", format!("not final: {}", msg.outcome))),
    };
    let fingerprint: [u8; 32] = msg.fingerprint[..].try_into().map_err(|_| {
        invalid(
            "fingerprint",
            format!("{} bytes, want 32", msg.fingerprint.len()),
        )
    })?;
    Ok(Tombstone {
        gid: msg.gid,
        outcome,
        fingerprint,
        collected_unix_ms: msg.collected_unix_ms,
    })
}

/// Encodes a log's identity record.
pub fn encode_meta(log_id: &str, created_unix_ms: u64) -> Vec<u8> {
    pb::LogMeta {
        format_version: treaty_proto::LOG_FORMAT_VERSION,
        log_id: log_id.to_string(),
        created_unix_ms,
    }
    .encode_to_vec()
}

/// The log id in bytes written by [`encode_meta`].
pub fn decode_meta(bytes: &[u8]) -> Result<String, DecodeError> {
    let msg = pb::LogMeta::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    check_version(msg.format_version)?;
    if uuid::Uuid::parse_str(&msg.log_id).is_err() {
        return Err(invalid("log_id", format!("not a UUID: {:?}", msg.log_id)));
    }
    Ok(msg.log_id)
}

/// Refuses a format this build does not read (a newer treatyd, or a missing version).
fn check_version(found: u32) -> Result<(), DecodeError> {
    if found != treaty_proto::LOG_FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion {
            found,
            supported: treaty_proto::LOG_FORMAT_VERSION,
        });
    }
    Ok(())
}

fn invalid(field: &str, reason: impl ToString) -> DecodeError {
    DecodeError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::{BranchDef, BranchState, Mode, Phase, Resolution, RetryPolicy};
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn sample() -> TxRecord {
        TxRecord {
            gid: "g-1".into(),
            mode: Mode::Saga,
            phase: Phase::Compensating,
            branches: vec![BranchRecord {
                def: BranchDef {
                    endpoint: "http://127.0.0.1:7801".into(),
                    handler: "debit".into(),
                    payload: Bytes::from_static(b"\x00\x01pay"),
                    compensation_payload: Bytes::from_static(b"undo"),
                },
                state: BranchState::InDoubt,
                attempts: 3,
                last_error: "connection refused".into(),
                resolution: Some(Resolution {
                    operator: "ops@example".into(),
                    unix_ms: 4,
                    reason: "refunded by hand".into(),
                }),
            }],
            created_unix_ms: 1,
            updated_unix_ms: 2,
            deadline_unix_ms: 3,
            retry: RetryPolicy::default(),
            stuck: true,
            seq: 9,
            reason: Some("step 0 (debit at http://127.0.0.1:7801) failed: no such account".into()),
            trace_parent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    fn random_string(rng: &mut StdRng, max_len: usize) -> String {
        const ALPHABET: &[char] = &['a', 'Z', '0', '-', '_', '/', ' ', 'é', '✓', '\u{0}'];
        let len = rng.gen_range(0..=max_len);
        (0..len)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
            .collect()
    }

    fn random_bytes(rng: &mut StdRng, max_len: usize) -> Bytes {
        let len = rng.gen_range(0..=max_len);
        Bytes::from((0..len).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>())
    }

    /// Edge values are over-represented: 0 and MAX are where varint bugs live.
    fn random_u64(rng: &mut StdRng) -> u64 {
        match rng.gen_range(0..4) {
            0 => 0,
            1 => u64::MAX,
            _ => rng.gen(),
        }
    }

    fn random_record(rng: &mut StdRng) -> TxRecord {
        let mut gid = random_string(rng, 40);
        if gid.is_empty() {
            gid.push('g');
        }
        let branches = (0..rng.gen_range(0..6))
            .map(|_| BranchRecord {
                def: BranchDef {
                    endpoint: random_string(rng, 30),
                    handler: random_string(rng, 10),
                    payload: random_bytes(rng, 64),
                    compensation_payload: random_bytes(rng, 64),
                },
                state: BranchState::ALL[rng.gen_range(0..BranchState::ALL.len())],
                attempts: rng.gen(),
                last_error: random_string(rng, 20),
                resolution: rng.gen_bool(0.2).then(|| Resolution {
                    operator: random_string(rng, 8),
                    unix_ms: rng.gen(),
                    reason: random_string(rng, 20),
                }),
            })
            .collect();
        TxRecord {
            gid,
            mode: Mode::ALL[rng.gen_range(0..Mode::ALL.len())],
            phase: Phase::ALL[rng.gen_range(0..Phase::ALL.len())],
            branches,
            created_unix_ms: random_u64(rng),
            updated_unix_ms: random_u64(rng),
            deadline_unix_ms: random_u64(rng),
            retry: RetryPolicy {
                initial_backoff_ms: random_u64(rng),
                max_backoff_ms: random_u64(rng),
                stuck_after_attempts: rng.gen(),
            },
            stuck: rng.gen(),
            seq: random_u64(rng),
            trace_parent: rng.gen_bool(0.5).then(|| random_string(rng, 55)),
            reason: rng.gen_bool(0.5).then(|| random_string(rng, 30)),
        }
    }

    #[test]
    fn sample_round_trips_and_carries_the_format_version() {
        let rec = sample();
        let bytes = encode(&rec);
        assert_eq!(decode(&bytes), Ok(rec));
        let msg = pb::LogRecord::decode(&bytes[..]).expect("protobuf");
        assert_eq!(msg.format_version, treaty_proto::LOG_FORMAT_VERSION);
    }

    #[test]
    fn a_record_without_a_reason_decodes_as_none_and_an_empty_one_stays_empty() {
        // What a treatyd from before reasons wrote: field 12 absent.
        let mut old = to_proto(&sample());
        old.reason = None;
        let bytes = old.encode_to_vec();
        assert_eq!(decode(&bytes).expect("old record").reason, None);
        let mut rec = sample();
        rec.reason = Some(String::new());
        assert_eq!(decode(&encode(&rec)), Ok(rec));
    }

    #[test]
    fn a_record_without_a_trace_parent_decodes_as_none_and_an_oversized_one_is_dropped() {
        // What a treatyd from before traces wrote (or one without --otlp-endpoint): field 13
        // absent.
        let mut old = to_proto(&sample());
        old.trace_parent = None;
        let rec = decode(&old.encode_to_vec()).expect("old record");
        assert_eq!(rec.trace_parent, None);
        assert_eq!(rec.reason, sample().reason, "the rest decodes unchanged");
        // Not something this coordinator writes: dropped, the record still recovers.
        let mut odd = to_proto(&sample());
        odd.trace_parent = Some("x".repeat(crate::engine::TRACE_PARENT_BYTES_MAX + 1));
        assert_eq!(
            decode(&odd.encode_to_vec()).expect("record").trace_parent,
            None
        );
    }

    #[test]
    fn many_random_records_round_trip() {
        let seed = 0x7e47_1a2b;
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..5_000 {
            let rec = random_record(&mut rng);
            let bytes = encode(&rec);
            assert_eq!(
                decode(&bytes).as_ref(),
                Ok(&rec),
                "record {i} (seed {seed:#x})"
            );
        }
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x6a7b);
        for _ in 0..2_000 {
            let garbage: Vec<u8> = (0..rng.gen_range(0..100)).map(|_| rng.gen()).collect();
            let _ = decode(&garbage);
            let bytes = encode(&random_record(&mut rng));
            let cut = rng.gen_range(0..=bytes.len());
            let _ = decode(&bytes[..cut]);
        }
    }

    #[test]
    fn unspecified_and_unknown_enums_are_refused_with_a_reason() {
        let mut msg = to_proto(&sample());
        msg.state = 0;
        let err = decode(&msg.encode_to_vec()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid field state: TxState is UNSPECIFIED (0); a value is required"
        );

        let mut msg = to_proto(&sample());
        msg.branches[0].state = 42;
        let err = decode(&msg.encode_to_vec()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid field branches[0].state: unknown BranchState value 42"
        );

        let mut msg = to_proto(&sample());
        msg.mode = 0;
        assert!(matches!(
            decode(&msg.encode_to_vec()),
            Err(DecodeError::Invalid { field, .. }) if field == "mode"
        ));
    }

    #[test]
    fn unknown_versions_are_refused() {
        for v in [0, treaty_proto::LOG_FORMAT_VERSION + 1, u32::MAX] {
            let mut msg = to_proto(&sample());
            msg.format_version = v;
            assert_eq!(
                decode(&msg.encode_to_vec()),
                Err(DecodeError::UnknownVersion {
                    found: v,
                    supported: treaty_proto::LOG_FORMAT_VERSION
                })
            );
        }
    }

    #[test]
    fn missing_fields_are_refused() {
        let mut msg = to_proto(&sample());
        msg.gid.clear();
        assert_eq!(
            decode(&msg.encode_to_vec()).unwrap_err().to_string(),
            "invalid field gid: empty"
        );

        let mut msg = to_proto(&sample());
        msg.retry = None;
        assert_eq!(
            decode(&msg.encode_to_vec()).unwrap_err().to_string(),
            "invalid field retry: missing"
        );

        let mut msg = to_proto(&sample());
        msg.branches[0].branch = None;
        assert_eq!(
            decode(&msg.encode_to_vec()).unwrap_err().to_string(),
            "invalid field branches[0].branch: missing"
        );
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode(b"\xff\xff\xff"),
            Err(DecodeError::Malformed(_))
        ));
    }
}
