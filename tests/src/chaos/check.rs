//! The checker: what must hold once every fault has stopped and every transaction is terminal.
//!
//! It reads three independent sources: what the client was told (the workload's records), the
//! coordinator's final state of each gid (`Get`), and what each participant recorded (its
//! barrier rows and its balances). Rules, each reported with the seed and the gid:
//!
//! 1. **Nothing stuck, nothing lost.** Every transfer the client saw accepted, or whose outcome
//!    stayed unknown, is terminal at the coordinator (an unknown one may also be absent: then
//!    it never began, and no participant may have a row for it). A transfer the client saw
//!    rejected is unknown to the coordinator and has no rows.
//! 2. **All or nothing, per branch, from the barrier rows.** 2PC committed: every branch has
//!    `prepare=prepared` and a commit row, no abort row. 2PC aborted: no commit row, and every
//!    branch has an abort row (so no money stays held). Saga committed: every step
//!    `execute=succeeded`, no compensate row. Saga aborted: every step that succeeded has a
//!    compensate row. Rows sit only on the instance the branch was sent to, and only for gids
//!    the workload submitted.
//! 3. **No effect applied twice, none lost.** Barrier rows are unique per
//!    `(gid, branch, op)` by construction (it is their key), so the effects are checked
//!    through the money itself: each account's final balance equals its opening balance plus
//!    the legs of the *committed* transfers, exactly, and nothing is held.
//! 4. **Total money unchanged** (balances plus held).
//! 5. **No negative balance**, stated precisely. Every debit checks funds (2PC reserves them
//!    at prepare), so a balance can go below zero only by undoing a saga credit whose money
//!    was spent meanwhile: sagas have no isolation, and a compensation must succeed. The
//!    workload runs credits last, so a credit is compensated only when its saga's deadline
//!    passed while the credit was in doubt. A negative balance is therefore a violation
//!    unless the account received such compensated credits, and it may not be lower than
//!    minus their sum.

use super::workload::{Account, Mode, Record, Submitted};
use std::collections::{BTreeMap, HashMap, HashSet};
use treaty_tests::bank::BarrierRow;

/// The coordinator's last word on a gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Final {
    Committed,
    Aborted,
    /// `Get` said NOT_FOUND.
    NotFound,
    /// Still not terminal when the drain bound ran out (the state's name).
    NotTerminal(String),
}

/// What the checker reads after the run.
pub struct Observed {
    pub finals: HashMap<String, Final>,
    /// Per bank instance: every barrier row.
    pub rows: Vec<Vec<BarrierRow>>,
    /// Per bank instance: account -> (balance, held).
    pub balances: Vec<BTreeMap<String, (i64, i64)>>,
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub gid: Option<String>,
    pub what: String,
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    pub committed: u64,
    pub aborted: u64,
    /// Outcome unknown to the client and the gid unknown to the coordinator: never began.
    pub never_begun: u64,
    pub rejected: u64,
    /// Saga credits undone after they took effect (the only legitimate source of a negative
    /// balance).
    pub compensated_credits: u64,
    /// Accounts below zero, all explained by compensated credits.
    pub negative_accounts: u64,
}

impl Verdict {
    fn bad(&mut self, gid: Option<&str>, what: String) {
        self.violations.push(Violation {
            gid: gid.map(str::to_string),
            what,
        });
    }
}

/// One branch's rows on the instance it belongs to: op -> answer.
type Ops = BTreeMap<String, String>;

/// (gid, branch) -> every row for it: (instance, op, answer).
type RowIndex<'a> = HashMap<(&'a str, u32), Vec<(usize, &'a str, &'a str)>>;

pub fn check(records: &[Record], openings: &BTreeMap<Account, i64>, obs: &Observed) -> Verdict {
    let mut v = Verdict::default();
    let mut index: RowIndex = HashMap::new();
    for (inst, rows) in obs.rows.iter().enumerate() {
        for r in rows {
            index
                .entry((r.gid.as_str(), r.branch_id))
                .or_default()
                .push((inst, r.op.as_str(), r.answer.as_str()));
        }
    }
    let branches: HashMap<&str, usize> = records
        .iter()
        .map(|r| (r.transfer.gid.as_str(), r.transfer.legs.len()))
        .collect();
    let submitted: HashSet<&str> = branches.keys().copied().collect();
    // gid -> how many of its row keys name a branch id it does not have (one pass: the
    // index holds hundreds of thousands of rows in a long campaign).
    let mut beyond: HashMap<&str, usize> = HashMap::new();
    for &(g, b) in index.keys() {
        if branches.get(g).is_some_and(|&n| b as usize >= n) {
            *beyond.entry(g).or_default() += 1;
        }
    }
    let mut foreign: Vec<&str> = index
        .keys()
        .map(|(g, _)| *g)
        .filter(|g| !submitted.contains(g))
        .collect();
    foreign.sort_unstable();
    foreign.dedup();
    for g in foreign {
        v.bad(
            Some(g),
            "barrier rows for a gid the workload never submitted".into(),
        );
    }

    let mut expected: BTreeMap<Account, i64> = openings.clone();
    let mut compensated_credit: BTreeMap<Account, i64> = BTreeMap::new();
    for rec in records {
        let t = &rec.transfer;
        let gid = t.gid.as_str();
        // The rows of each branch, from the instance it was sent to; rows elsewhere are wrong.
        let mut ops: Vec<Ops> = Vec::with_capacity(t.legs.len());
        for (b, leg) in t.legs.iter().enumerate() {
            let mut mine = Ops::new();
            for &(inst, op, answer) in index.get(&(gid, b as u32)).into_iter().flatten() {
                if inst == leg.account.inst {
                    mine.insert(op.to_string(), answer.to_string());
                } else {
                    v.bad(
                        Some(gid),
                        format!(
                            "branch {b} belongs to bank {} but bank {inst} has a {op} row for it",
                            leg.account.inst
                        ),
                    );
                }
            }
            ops.push(mine);
        }
        let extra = beyond.get(gid).copied().unwrap_or(0);
        if extra > 0 {
            v.bad(
                Some(gid),
                format!(
                    "rows for {extra} branch ids beyond its {} branches",
                    t.legs.len()
                ),
            );
        }
        let any_rows = ops.iter().any(|o| !o.is_empty());
        let fin = obs.finals.get(gid).cloned();
        match (&rec.submitted, fin) {
            (Submitted::Rejected(why), f) => {
                v.rejected += 1;
                if f != Some(Final::NotFound) {
                    v.bad(
                        Some(gid),
                        format!("the client was told rejected ({why}) but the coordinator has it: {f:?}"),
                    );
                }
                if any_rows {
                    v.bad(
                        Some(gid),
                        format!("the client was told rejected ({why}) but participants have rows: {ops:?}"),
                    );
                }
            }
            (s, Some(Final::NotFound)) => {
                if *s == Submitted::Accepted {
                    v.bad(
                        Some(gid),
                        "lost: Begin was answered, but the coordinator does not know the gid"
                            .into(),
                    );
                } else {
                    v.never_begun += 1;
                }
                if any_rows {
                    v.bad(
                        Some(gid),
                        format!("unknown to the coordinator, yet participants have rows: {ops:?}"),
                    );
                }
            }
            (_, None) => v.bad(Some(gid), "the coordinator's state was never read".into()),
            (_, Some(Final::NotTerminal(state))) => v.bad(
                Some(gid),
                format!("stuck: still {state} after every fault ended and the drain bound passed"),
            ),
            (_, Some(Final::Committed)) => {
                v.committed += 1;
                for leg in &t.legs {
                    *expected.entry(leg.account.clone()).or_default() += leg.amount;
                }
                if t.doomed {
                    v.bad(
                        Some(gid),
                        "committed although one debit asks for more money than exists".into(),
                    );
                }
                for (b, o) in ops.iter().enumerate() {
                    let ok = match t.mode {
                        Mode::TwoPhase => {
                            has(o, "prepare", "prepared")
                                && o.contains_key("commit")
                                && !o.contains_key("abort")
                        }
                        Mode::Saga => {
                            has(o, "execute", "succeeded") && !o.contains_key("compensate")
                        }
                    };
                    if !ok {
                        v.bad(
                            Some(gid),
                            format!("committed, but branch {b} recorded {o:?}: not all-or-nothing"),
                        );
                    }
                }
            }
            (_, Some(Final::Aborted)) => {
                v.aborted += 1;
                for (b, o) in ops.iter().enumerate() {
                    let ok = match t.mode {
                        Mode::TwoPhase => !o.contains_key("commit") && o.contains_key("abort"),
                        Mode::Saga => {
                            !has(o, "execute", "succeeded") || o.contains_key("compensate")
                        }
                    };
                    if !ok {
                        v.bad(
                            Some(gid),
                            format!("aborted, but branch {b} recorded {o:?}: an effect was left in place"),
                        );
                    }
                    let leg = &t.legs[b];
                    if t.mode == Mode::Saga
                        && leg.amount > 0
                        && has(o, "execute", "succeeded")
                        && o.contains_key("compensate")
                    {
                        v.compensated_credits += 1;
                        *compensated_credit.entry(leg.account.clone()).or_default() += leg.amount;
                    }
                }
            }
        }
    }

    // The money.
    let mut total_open = 0i64;
    let mut total_now = 0i64;
    for (acct, &open) in openings {
        total_open += open;
        let Some(&(balance, held)) = obs.balances.get(acct.inst).and_then(|b| b.get(&acct.name))
        else {
            v.bad(
                None,
                format!("account {} on bank {} is missing", acct.name, acct.inst),
            );
            continue;
        };
        total_now += balance + held;
        if held != 0 {
            v.bad(
                None,
                format!(
                    "account {} holds {held} although every transaction has ended",
                    acct.name
                ),
            );
        }
        let want = expected.get(acct).copied().unwrap_or(open);
        if balance != want {
            v.bad(
                None,
                format!(
                    "account {}: balance {balance}, but opening {open} plus the committed transfers \
                     make {want} (difference {}): an effect was applied twice, lost, or left \
                     behind by an aborted transfer",
                    acct.name,
                    balance - want
                ),
            );
        }
        if balance < 0 {
            let allowed = compensated_credit.get(acct).copied().unwrap_or(0);
            if balance < -allowed {
                v.bad(
                    None,
                    format!(
                        "account {}: negative balance {balance}, and only {allowed} of saga credits \
                         were compensated on it (the one legitimate way below zero)",
                        acct.name
                    ),
                );
            } else {
                v.negative_accounts += 1;
            }
        }
    }
    if total_now != total_open {
        v.bad(
            None,
            format!(
                "total money changed: {total_open} at the start, {total_now} at the end (balances + held)"
            ),
        );
    }
    v
}

fn has(o: &Ops, op: &str, answer: &str) -> bool {
    o.get(op).is_some_and(|a| a == answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::{Leg, Transfer};
    use std::time::Duration;

    fn acct(inst: usize, name: &str) -> Account {
        Account {
            inst,
            name: name.into(),
        }
    }

    /// A transfer of 10 from a (bank 0) to b (bank 1).
    fn transfer(gid: &str, mode: Mode) -> Record {
        Record {
            transfer: Transfer {
                gid: gid.into(),
                mode,
                legs: vec![
                    Leg {
                        account: acct(0, "a"),
                        amount: -10,
                    },
                    Leg {
                        account: acct(1, "b"),
                        amount: 10,
                    },
                ],
                deadline: Duration::from_secs(1),
                doomed: false,
            },
            submitted: Submitted::Accepted,
            unknown_answers: 0,
        }
    }

    fn row(gid: &str, b: u32, op: &str, answer: &str) -> BarrierRow {
        BarrierRow {
            gid: gid.into(),
            branch_id: b,
            op: op.into(),
            answer: answer.into(),
        }
    }

    fn openings() -> BTreeMap<Account, i64> {
        [(acct(0, "a"), 100), (acct(1, "b"), 100)].into()
    }

    fn observed(
        fin: Final,
        rows0: Vec<BarrierRow>,
        rows1: Vec<BarrierRow>,
        a: i64,
        b: i64,
    ) -> Observed {
        Observed {
            finals: [("g".to_string(), fin)].into(),
            rows: vec![rows0, rows1],
            balances: vec![
                [("a".to_string(), (a, 0))].into(),
                [("b".to_string(), (b, 0))].into(),
            ],
        }
    }

    fn whats(v: &Verdict) -> Vec<String> {
        v.violations.iter().map(|x| x.what.clone()).collect()
    }

    #[test]
    fn a_clean_2pc_commit_passes() {
        let obs = observed(
            Final::Committed,
            vec![
                row("g", 0, "prepare", "prepared"),
                row("g", 0, "commit", "done"),
            ],
            vec![
                row("g", 1, "prepare", "prepared"),
                row("g", 1, "commit", "done"),
            ],
            90,
            110,
        );
        let v = check(&[transfer("g", Mode::TwoPhase)], &openings(), &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
        assert_eq!(v.committed, 1);
    }

    #[test]
    fn a_saga_abort_with_a_step_left_uncompensated_is_caught_twice() {
        // The debit ran and was never compensated: rows and money both show it.
        let obs = observed(
            Final::Aborted,
            vec![row("g", 0, "execute", "succeeded")],
            vec![
                row("g", 1, "execute", "failed"),
                row("g", 1, "compensate", "done"),
            ],
            90,
            100,
        );
        let v = check(&[transfer("g", Mode::Saga)], &openings(), &obs);
        let w = whats(&v);
        assert!(
            w.iter().any(|x| x.contains("effect was left in place")),
            "{w:?}"
        );
        assert!(w.iter().any(|x| x.contains("total money changed")), "{w:?}");
    }

    #[test]
    fn a_2pc_commit_missing_on_one_branch_is_caught() {
        let obs = observed(
            Final::Committed,
            vec![
                row("g", 0, "prepare", "prepared"),
                row("g", 0, "commit", "done"),
            ],
            vec![row("g", 1, "prepare", "prepared")],
            90,
            100,
        );
        let v = check(&[transfer("g", Mode::TwoPhase)], &openings(), &obs);
        assert!(whats(&v).iter().any(|x| x.contains("not all-or-nothing")));
    }

    #[test]
    fn an_effect_applied_twice_shows_in_the_balance() {
        let obs = observed(
            Final::Committed,
            vec![row("g", 0, "execute", "succeeded")],
            vec![row("g", 1, "execute", "succeeded")],
            90,
            120,
        );
        let v = check(&[transfer("g", Mode::Saga)], &openings(), &obs);
        assert!(
            whats(&v).iter().any(|x| x.contains("difference 10")),
            "{:?}",
            whats(&v)
        );
    }

    #[test]
    fn stuck_lost_and_rejected_with_effects_are_caught() {
        let stuck = observed(
            Final::NotTerminal("ACTIVE".into()),
            vec![],
            vec![],
            100,
            100,
        );
        let v = check(&[transfer("g", Mode::Saga)], &openings(), &stuck);
        assert!(whats(&v).iter().any(|x| x.contains("stuck")));

        let lost = observed(Final::NotFound, vec![], vec![], 100, 100);
        let v = check(&[transfer("g", Mode::Saga)], &openings(), &lost);
        assert!(whats(&v).iter().any(|x| x.contains("lost")));

        let mut rejected = transfer("g", Mode::Saga);
        rejected.submitted = Submitted::Rejected("InvalidArgument".into());
        let obs = observed(
            Final::NotFound,
            vec![row("g", 0, "execute", "succeeded")],
            vec![],
            90,
            100,
        );
        let v = check(&[rejected], &openings(), &obs);
        assert!(whats(&v).iter().any(|x| x.contains("told rejected")));
    }

    #[test]
    fn a_negative_balance_is_allowed_only_up_to_compensated_credits() {
        // Saga g (a -> b, 10) is aborted by its deadline after its credit ran; meanwhile
        // saga h spent that money (b -> a, 10, committed). Undoing g's credit takes b to -10:
        // legitimate, no isolation in a saga.
        let mut openings = openings();
        openings.insert(acct(1, "b"), 0);
        let mut h = transfer("h", Mode::Saga);
        h.transfer.legs = vec![
            Leg {
                account: acct(1, "b"),
                amount: -10,
            },
            Leg {
                account: acct(0, "a"),
                amount: 10,
            },
        ];
        let records = [transfer("g", Mode::Saga), h];
        let rows0 = vec![
            row("g", 0, "execute", "succeeded"),
            row("g", 0, "compensate", "done"),
            row("h", 1, "execute", "succeeded"),
        ];
        let rows1 = vec![
            row("g", 1, "execute", "succeeded"),
            row("g", 1, "compensate", "done"),
            row("h", 0, "execute", "succeeded"),
        ];
        let mut obs = observed(Final::Aborted, rows0, rows1, 110, -10);
        obs.finals.insert("h".into(), Final::Committed);
        let v = check(&records, &openings, &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
        assert_eq!((v.compensated_credits, v.negative_accounts), (1, 1));
        // Lower than minus the compensated credits: a violation.
        obs.balances[1].insert("b".into(), (-11, 0));
        obs.balances[0].insert("a".into(), (111, 0));
        let v = check(&records, &openings, &obs);
        assert!(
            whats(&v).iter().any(|x| x.contains("negative balance -11")),
            "{:?}",
            whats(&v)
        );
    }
}
