//! The workload: a stream of concurrent bank transfers, 2PC and saga mixed, with client-chosen
//! gids, each resubmitted with the same gid while its outcome is unknown.
//!
//! Shape of a transfer (chosen so that the "no negative balance" check is exact, see
//! `check.rs`): one to three **debits** from distinct accounts, then one **credit** of their
//! sum to another account. In a saga the debits run first, so a business failure (insufficient
//! funds) can only come from a debit and only debits are compensated: a compensated debit
//! gives money back and cannot take a balance below zero. A saga credit is compensated only
//! when the saga's deadline passes while the credit is in doubt; most sagas get a deadline
//! far longer than any fault, a few a short one on purpose (that path must be exercised too,
//! and the checker accounts for it precisely).
//!
//! With `reuse` on (the retention mode, where treatyd collects finished records after a
//! second), a worker sometimes resubmits the gid of one of its finished transfers instead of a
//! new one: once with the same body (the coordinator must answer the logged outcome with
//! `existing = true`, and nothing may run again) and once with a different body (it must be
//! refused with ALREADY_EXISTS). What it was answered is kept in a [`Reuse`] for the checker.
//!
//! About one transfer in ten is **doomed**: its last debit asks for more money than exists,
//! so it must abort. Doomed sagas have three debits, so two steps have run when the third
//! fails and two compensations are due (the case a "skip one compensation" bug gets wrong).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use treaty_examples::bank::Leg as Payload;
use treaty_sdk::{Branch, Client, ClientError, Outcome, Step};

/// More money than the whole bank holds: a debit of this much always fails.
pub const DOOM: i64 = 1_000_000_000_000;

/// How long a submit waits for the outcome before moving on (the outcome is read at the end).
const SUBMIT_WAIT: Duration = Duration::from_secs(3);

/// An account: which bank instance, which name there.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Account {
    pub inst: usize,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    TwoPhase,
    Saga,
}

/// One branch of a transfer: `amount` < 0 debits the account, > 0 credits it.
#[derive(Clone, Debug)]
pub struct Leg {
    pub account: Account,
    pub amount: i64,
}

impl Leg {
    pub fn handler(&self, mode: Mode) -> &'static str {
        match (mode, self.amount < 0) {
            (Mode::TwoPhase, true) => "debit",
            (Mode::TwoPhase, false) => "credit",
            (Mode::Saga, true) => "saga-debit",
            (Mode::Saga, false) => "saga-credit",
        }
    }

    fn payload(&self) -> Vec<u8> {
        Payload::payload(&self.account.name, self.amount.abs())
    }
}

/// A transfer as the client defined it; branch `i` is `legs[i]`.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub gid: String,
    pub mode: Mode,
    pub legs: Vec<Leg>,
    pub deadline: Duration,
    pub doomed: bool,
}

/// The outcome `submit_and_wait` told the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Told {
    Committed,
    Aborted,
    /// The wait bound passed first: nothing promised.
    Pending,
}

impl From<Outcome> for Told {
    fn from(o: Outcome) -> Told {
        match o {
            Outcome::Committed => Told::Committed,
            Outcome::Aborted => Told::Aborted,
            _ => Told::Pending,
        }
    }
}

/// What the client was told when it submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// `Begin` answered: the transaction is durably recorded, and its outcome is as told.
    Accepted(Told),
    /// No answer even after resubmitting until the give-up time: may or may not exist.
    Unknown,
    /// The coordinator said no: nothing may have been applied.
    Rejected(String),
}

/// A transfer and what happened when it was submitted.
#[derive(Clone, Debug)]
pub struct Record {
    pub transfer: Transfer,
    pub submitted: Submitted,
    /// How many submissions ended with an unknown outcome (each one was resubmitted).
    pub unknown_answers: u32,
}

/// A random transfer over `accounts` (at least 4).
pub fn generate(rng: &mut StdRng, accounts: &[Account], gid: String) -> Transfer {
    let mode = if rng.gen_bool(0.5) {
        Mode::TwoPhase
    } else {
        Mode::Saga
    };
    let doomed = rng.gen_bool(0.1);
    let debits = if doomed && mode == Mode::Saga {
        3
    } else {
        match rng.gen_range(0..10) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        }
    };
    let picked = rand::seq::index::sample(rng, accounts.len(), debits + 1);
    let mut legs: Vec<Leg> = Vec::with_capacity(debits + 1);
    let mut sum = 0;
    for (i, a) in picked.iter().enumerate() {
        let account = accounts[a].clone();
        if i < debits {
            let amount = if doomed && i == debits - 1 {
                DOOM
            } else {
                rng.gen_range(1..=100)
            };
            sum += amount;
            legs.push(Leg {
                account,
                amount: -amount,
            });
        } else {
            legs.push(Leg {
                account,
                amount: sum,
            });
        }
    }
    let deadline_ms = match mode {
        // Short deadlines make some transactions abort on time while a fault lasts.
        Mode::TwoPhase if rng.gen_bool(0.2) => rng.gen_range(1500..3000),
        Mode::TwoPhase => 30_000,
        Mode::Saga if rng.gen_bool(0.1) => 2500,
        Mode::Saga => 60_000,
    };
    Transfer {
        gid,
        mode,
        legs,
        deadline: Duration::from_millis(deadline_ms),
        doomed,
    }
}

/// A resubmission of a finished transfer's gid, and what the coordinator answered.
#[derive(Clone, Debug)]
pub struct Reuse {
    pub gid: String,
    /// The same definition as the first submission (else: the first leg's amount changed).
    pub same_body: bool,
    pub answer: ReuseAnswer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReuseAnswer {
    /// `Begin` answered.
    Answered { existing: bool, told: Told },
    /// ALREADY_EXISTS.
    GidExists,
    /// Any other status (the coordinator was down, a timeout): says nothing.
    Failed(String),
}

/// `t` with another definition for the same gid: the first leg's amount changed.
fn bumped(t: &Transfer) -> Transfer {
    let mut other = t.clone();
    if let Some(leg) = other.legs.first_mut() {
        leg.amount += leg.amount.signum();
    }
    other
}

/// Resubmit a finished transfer's gid, with its own body or another one.
async fn resubmit(client: &Client, t: &Transfer, endpoints: &[String], same_body: bool) -> Reuse {
    let sent = if same_body { t.clone() } else { bumped(t) };
    let answer = match submit_once(client, &sent, endpoints).await {
        Ok(s) => ReuseAnswer::Answered {
            existing: s.existing,
            told: s.outcome.into(),
        },
        Err(ClientError::GidExists { .. }) => ReuseAnswer::GidExists,
        Err(e) => ReuseAnswer::Failed(e.to_string()),
    };
    Reuse {
        gid: t.gid.clone(),
        same_body,
        answer,
    }
}

/// Submit once; the outcome told when `Begin` answered.
async fn submit_once(
    client: &Client,
    t: &Transfer,
    endpoints: &[String],
) -> Result<treaty_sdk::Submitted, ClientError> {
    match t.mode {
        Mode::TwoPhase => {
            let mut b = client.two_phase().gid(&t.gid).deadline(t.deadline);
            for l in &t.legs {
                b = b.branch(
                    Branch::new(endpoints[l.account.inst].clone(), l.handler(t.mode))
                        .payload(l.payload()),
                );
            }
            b.submit_and_wait(SUBMIT_WAIT).await
        }
        Mode::Saga => {
            let mut b = client.saga().gid(&t.gid).deadline(t.deadline);
            for l in &t.legs {
                b = b.step(
                    Step::new(endpoints[l.account.inst].clone(), l.handler(t.mode))
                        .payload(l.payload())
                        .compensation(l.payload()),
                );
            }
            b.submit_and_wait(SUBMIT_WAIT).await
        }
    }
}

/// Submit `t`, resubmitting with the same gid while the outcome is unknown, until the
/// coordinator answers or `give_up_at` passes.
pub async fn submit(
    client: &Client,
    t: Transfer,
    endpoints: &[String],
    rng: &mut StdRng,
    give_up_at: Instant,
) -> Record {
    let mut unknown_answers = 0;
    let submitted = loop {
        match submit_once(client, &t, endpoints).await {
            Ok(s) => break Submitted::Accepted(s.outcome.into()),
            Err(ClientError::Rejected { code, message }) => {
                break Submitted::Rejected(format!("{code:?}: {message}"))
            }
            // The same gid with another definition: never resubmit, it will not change.
            Err(e @ ClientError::GidExists { .. }) => break Submitted::Rejected(e.to_string()),
            // OutcomeUnknown (or a failure to even reach the coordinator): resubmit the same
            // definition with the same gid; Begin is idempotent.
            Err(_) => {
                unknown_answers += 1;
                if Instant::now() >= give_up_at {
                    break Submitted::Unknown;
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..300))).await;
            }
        }
    };
    Record {
        transfer: t,
        submitted,
        unknown_answers,
    }
}

/// What one client did.
#[derive(Default)]
pub struct WorkerLog {
    pub records: Vec<Record>,
    pub reuses: Vec<Reuse>,
}

/// A finished transfer old enough for retention (1 s, collected every second) to have
/// replaced its record by a tombstone, most of the time.
const REUSE_AGE: Duration = Duration::from_millis(2500);

/// One client: transfers one after the other until `stop_at`, each resolved (or given up at
/// `give_up_at`). With `reuse`, one turn in five resubmits an old finished gid instead (see
/// the module doc). Its random choices come from `seed` alone.
#[allow(clippy::too_many_arguments)]
pub async fn worker(
    seed: u64,
    worker: usize,
    client: Client,
    endpoints: Vec<String>,
    accounts: Vec<Account>,
    stop_at: Instant,
    give_up_at: Instant,
    reuse: bool,
) -> WorkerLog {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(worker as u64 + 1)));
    let mut out = WorkerLog::default();
    // Indexes into out.records of finished transfers, with when they finished.
    let mut finished: Vec<(usize, Instant)> = Vec::new();
    let mut k = 0u64;
    while Instant::now() < stop_at {
        if reuse && rng.gen_bool(0.2) {
            let old: Vec<usize> = finished
                .iter()
                .filter(|(_, at)| at.elapsed() >= REUSE_AGE)
                .map(|&(i, _)| i)
                .collect();
            if !old.is_empty() {
                let i = old[rng.gen_range(0..old.len())];
                let t = out.records[i].transfer.clone();
                let same_first = rng.gen_bool(0.5);
                for same_body in [same_first, !same_first] {
                    out.reuses
                        .push(resubmit(&client, &t, &endpoints, same_body).await);
                }
                continue;
            }
        }
        let gid = format!("chaos-{seed}-w{worker}-{k}");
        k += 1;
        let t = generate(&mut rng, &accounts, gid);
        let r = submit(&client, t, &endpoints, &mut rng, give_up_at).await;
        if matches!(
            r.submitted,
            Submitted::Accepted(Told::Committed | Told::Aborted)
        ) {
            finished.push((out.records.len(), Instant::now()));
        }
        out.records.push(r);
    }
    out
}
