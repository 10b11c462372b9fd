//! Trip booking: flight, hotel and car services, each a saga participant with one `book`
//! handler (execute books, compensate cancels), and a journal of what each did, in order.
//!
//! # The journal, and why its order can be trusted
//!
//! Each service writes its journal entries into its own sled tree **inside the handler's
//! transaction**, next to the booking itself and the SDK's barrier row: an entry exists if and
//! only if the change it describes was applied, exactly once (the barrier keeps duplicates
//! from running the handler again).
//!
//! The three services have three trees, so a per-tree counter cannot order entries across
//! services. Each entry is stamped with a sequence number from a [`Clock`] shared by the
//! services of this process, a Lamport-style clock: `seq = max(clock + 1, last seq in this
//! tree + 1)`, and the clock moves up to `seq`. The tree's last seq is stored in the tree
//! (key `journal-seq`), so a reused data directory continues where it left off.
//!
//! sled may run a transaction's closure more than once; each run takes a fresh number, and
//! only the run that commits leaves one. Numbers are therefore never reused, some are skipped,
//! and the order is right: the coordinator sends a saga's next operation (the next step, or a
//! compensation) only after the previous one answered, and the SDK answers only after the
//! transaction committed, so a later operation always takes its number after the earlier one
//! took its own.
//!
//! The alternative, ordering by the time the barrier row was written, was rejected: rows carry
//! Unix milliseconds, and on one machine two steps often complete within the same millisecond
//! (ties), and the wall clock may step backwards.
//!
//! A refused booking is the one thing that cannot be journaled in the tree: a refusal rolls
//! the handler's transaction back, and its durable trace is the barrier row (execute →
//! FAILED) that the SDK writes on its own. The refusing run takes a number from the same
//! clock and keeps it in memory ([`Refusals`]), which is enough for this one-process example
//! that prints the journal right after the outcome; [`journal`] reports a refusal only when
//! the barrier row confirms it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sled::transaction::TransactionalTree;
use treaty_sdk::sled::SledStore;
use treaty_sdk::{
    refuse, Answer, HandlerError, HandlerResult, Op, Participant, ParticipantError, Saga,
    StoreError,
};

/// The sled tree (in each service's db) holding bookings, the journal and barrier rows.
pub const TREE: &str = "bookings";

/// The handler name every booking service registers.
pub const HANDLER: &str = "book";

const SEQ_KEY: &[u8] = b"journal-seq";

/// The process-wide journal clock shared by the booking services (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Clock(Arc<AtomicU64>);

impl Clock {
    /// Takes the next number: above every number taken before and above `floor`.
    fn tick(&self, floor: u64) -> u64 {
        let seq = (self.0.fetch_add(1, Ordering::SeqCst) + 1).max(floor + 1);
        self.0.fetch_max(seq, Ordering::SeqCst);
        seq
    }

    /// Moves the clock up to at least `seq` (at startup, from a tree's stored counter).
    fn observe(&self, seq: u64) {
        self.0.fetch_max(seq, Ordering::SeqCst);
    }
}

/// Refused bookings not recorded in any tree: (gid, branch) → clock value of the refusing run.
/// A later run of the same refusal replaces the value, which keeps it ordered before the
/// compensations that follow it.
#[derive(Clone, Debug, Default)]
pub struct Refusals(Arc<Mutex<HashMap<(String, u32), u64>>>);

impl Refusals {
    fn record(&self, gid: &str, branch_id: u32, seq: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.insert((gid.to_string(), branch_id), seq);
    }

    fn get(&self, gid: &str, branch_id: u32) -> Option<u64> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(gid.to_string(), branch_id)).copied()
    }
}

/// One journal entry: what a service did for a saga, and when in the process-wide order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// The clock value: entries sort by it.
    pub seq: u64,
    /// flight, hotel or car.
    pub service: String,
    /// booked, refused or cancelled.
    pub action: String,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.service, self.action)
    }
}

fn journal_prefix(gid: &str) -> Vec<u8> {
    let mut k = format!("journal/{gid}").into_bytes();
    k.push(0);
    k
}

fn booking_key(gid: &str) -> Vec<u8> {
    format!("booking/{gid}").into_bytes()
}

fn stored_seq(v: &[u8]) -> Result<u64, sled::Error> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| {
        sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("corrupt journal sequence: {} bytes, expected 8", v.len()),
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Appends `action` to the journal of `gid`, in the handler's transaction.
fn append(tx: &TransactionalTree, clock: &Clock, gid: &str, action: &str) -> HandlerResult {
    let last = match tx.get(SEQ_KEY)? {
        // Corrupt: answered RETRY (and logged) by the SDK, never guessed at.
        Some(v) => stored_seq(&v).map_err(HandlerError::retry)?,
        None => 0,
    };
    let seq = clock.tick(last);
    tx.insert(SEQ_KEY, &seq.to_be_bytes())?;
    let mut k = journal_prefix(gid);
    k.extend_from_slice(&seq.to_be_bytes());
    tx.insert(k, action.as_bytes())?;
    Ok(())
}

/// One booking service: its tree (to read the journal back) and its participant.
pub struct Service {
    /// flight, hotel or car.
    pub kind: &'static str,
    /// The [`TREE`] tree of this service's db.
    pub tree: sled::Tree,
    /// The participant, with the [`HANDLER`] saga handler registered.
    pub participant: Participant<SledStore>,
    refusals: Refusals,
}

impl Service {
    /// Opens the service `kind` (flight, hotel or car) with its own sled store in `dir`.
    /// With `fail`, every booking is refused ("no availability").
    pub fn open(
        kind: &'static str,
        dir: &Path,
        coordinator: &str,
        fail: bool,
        clock: Clock,
    ) -> Result<Service, ParticipantError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::new(format!("creating {}", dir.display()), e))?;
        let store = SledStore::open_dir(dir, TREE)?;
        let tree = store.tree().clone();
        if let Some(v) = tree.get(SEQ_KEY).map_err(StoreError::from)? {
            clock.observe(stored_seq(&v).map_err(StoreError::from)?);
        }
        let refusals = Refusals::default();
        let (c1, c2, r) = (clock.clone(), clock, refusals.clone());
        let participant = Participant::builder(store)
            .coordinator(coordinator)
            .saga(
                HANDLER,
                Saga::<SledStore>::new()
                    .execute(async move |ctx, tx, payload| {
                        if fail {
                            r.record(&ctx.gid, ctx.branch_id, c1.tick(0));
                            return Err(refuse(format!("no {kind} availability")));
                        }
                        tx.insert(booking_key(&ctx.gid), payload)?;
                        append(tx, &c1, &ctx.gid, "booked")
                    })
                    .compensate(async move |ctx, tx, _payload| {
                        tx.remove(booking_key(&ctx.gid))?;
                        append(tx, &c2, &ctx.gid, "cancelled")
                    }),
            )
            .build()?;
        Ok(Service {
            kind,
            tree,
            participant,
            refusals,
        })
    }

    /// What this service did for `gid`: its journal entries, plus the refusal if the barrier
    /// recorded one and this process saw it happen.
    pub fn entries(&self, gid: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let prefix = journal_prefix(gid);
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            out.push(Entry {
                seq: stored_seq(&k[prefix.len()..])?,
                service: self.kind.to_string(),
                action: String::from_utf8_lossy(&v).into_owned(),
            });
        }
        for row in self.participant.store().try_rows(gid)? {
            if row.op != Op::Execute || row.answer != Answer::Failed {
                continue;
            }
            // A FAILED row without a refusal seen here is a null compensation (the
            // compensation came first): the step never ran, nothing to report.
            if let Some(seq) = self.refusals.get(gid, row.branch_id) {
                out.push(Entry {
                    seq,
                    service: self.kind.to_string(),
                    action: "refused".to_string(),
                });
            }
        }
        Ok(out)
    }
}

/// The journal of `gid` over `services`, in the order things happened.
pub fn journal(services: &[Service], gid: &str) -> Result<Vec<Entry>, StoreError> {
    let mut all = Vec::new();
    for s in services {
        all.extend(s.entries(gid)?);
    }
    all.sort();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_back_and_respects_the_tree() {
        let c = Clock::default();
        assert_eq!(c.tick(0), 1);
        assert_eq!(c.tick(0), 2);
        assert_eq!(c.tick(10), 11);
        assert_eq!(c.tick(0), 12);
        c.observe(5);
        assert_eq!(c.tick(0), 13);
    }

    /// Drives the three services directly (as the coordinator would for `--fail-at car`)
    /// and reads the journal back.
    #[tokio::test]
    async fn the_journal_shows_compensations_in_reverse_order() {
        use treaty_proto::v1 as pb;
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let mut services = Vec::new();
        let mut clients = Vec::new();
        for kind in ["flight", "hotel", "car"] {
            let s = Service::open(
                kind,
                &dir.path().join(kind),
                "http://127.0.0.1:1",
                kind == "car",
                clock.clone(),
            )
            .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let uri = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(
                s.participant
                    .clone()
                    .serve(listener, std::future::pending()),
            );
            clients.push(
                pb::participant_client::ParticipantClient::connect(uri)
                    .await
                    .unwrap(),
            );
            services.push(s);
        }
        let req = |branch_id: u32| pb::BranchRequest {
            gid: "trip-1".into(),
            branch_id,
            handler: HANDLER.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            attempt: 1,
            deadline_unix_ms: 0,
            ..Default::default()
        };
        for b in 0..3u32 {
            let r = clients[b as usize]
                .execute(req(b))
                .await
                .unwrap()
                .into_inner();
            let want = if b == 2 {
                pb::ExecuteResult::Failed
            } else {
                pb::ExecuteResult::Succeeded
            };
            assert_eq!(r.result(), want, "{}", r.message);
            // A duplicate runs nothing and journals nothing.
            clients[b as usize].execute(req(b)).await.unwrap();
        }
        for b in [2u32, 1, 0] {
            let r = clients[b as usize]
                .compensate(req(b))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{}", r.message);
        }
        let got: Vec<String> = journal(&services, "trip-1")
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "flight: booked",
                "hotel: booked",
                "car: refused",
                "hotel: cancelled",
                "flight: cancelled"
            ]
        );
        assert!(journal(&services, "other").unwrap().is_empty());
    }
}
