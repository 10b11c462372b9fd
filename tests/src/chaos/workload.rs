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
//! About one transfer in ten is **doomed**: its last debit asks for more money than exists,
//! so it must abort. Doomed sagas have three debits, so two steps have run when the third
//! fails and two compensations are due (the case a "skip one compensation" bug gets wrong).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use treaty_examples::bank::Leg as Payload;
use treaty_sdk::{Client, SdkError};

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

/// What the client was told when it submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// `Begin` answered: the transaction is durably recorded.
    Accepted,
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

/// Submit once; `Ok(())` when `Begin` answered.
async fn submit_once(client: &Client, t: &Transfer, endpoints: &[String]) -> Result<(), SdkError> {
    match t.mode {
        Mode::TwoPhase => {
            let mut b = client.two_phase().gid(&t.gid).deadline(t.deadline);
            for l in &t.legs {
                b = b.branch(
                    endpoints[l.account.inst].clone(),
                    l.handler(t.mode),
                    l.payload(),
                );
            }
            b.submit_and_wait(SUBMIT_WAIT).await.map(|_| ())
        }
        Mode::Saga => {
            let mut b = client.saga().gid(&t.gid).deadline(t.deadline);
            for l in &t.legs {
                b = b.step(
                    endpoints[l.account.inst].clone(),
                    l.handler(t.mode),
                    l.payload(),
                    l.payload(),
                );
            }
            b.submit_and_wait(SUBMIT_WAIT).await.map(|_| ())
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
            Ok(()) => break Submitted::Accepted,
            Err(SdkError::Rejected { code, message }) => {
                break Submitted::Rejected(format!("{code:?}: {message}"))
            }
            // The same gid with another definition: never resubmit, it will not change.
            Err(e @ SdkError::GidExists { .. }) => break Submitted::Rejected(e.to_string()),
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

/// One client: transfers one after the other until `stop_at`, each resolved (or given up at
/// `give_up_at`). Its random choices come from `seed` alone.
pub async fn worker(
    seed: u64,
    worker: usize,
    client: Client,
    endpoints: Vec<String>,
    accounts: Vec<Account>,
    stop_at: Instant,
    give_up_at: Instant,
) -> Vec<Record> {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(worker as u64 + 1)));
    let mut out = Vec::new();
    let mut k = 0u64;
    while Instant::now() < stop_at {
        let gid = format!("chaos-{seed}-w{worker}-{k}");
        k += 1;
        let t = generate(&mut rng, &accounts, gid);
        out.push(submit(&client, t, &endpoints, &mut rng, give_up_at).await);
    }
    out
}
