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
//! 6. **The outcome told to the client holds.** A transfer whose `submit_and_wait` answered
//!    COMMITTED is committed at the coordinator and, by rule 2, on every branch; one answered
//!    ABORTED is aborted at the coordinator, and no branch kept an effect (2PC: no commit row;
//!    saga: every step that succeeded is compensated). PENDING, or no answer, promises nothing.
//! 7. **Compensations in reverse step order**, from the barrier rows' `seq` (the order each
//!    instance applied its rows): for an aborted saga, of two compensated steps on the same
//!    instance the later step's compensate row comes first. (Rows of different instances
//!    have no common order; rows numbered 0 predate numbering and are not compared.)
//! 8. **A finished gid stays finished** (the retention mode). A resubmission of a finished
//!    transfer's gid with the same body is answered `existing = true` with the coordinator's
//!    final outcome (never started again: its effects are checked by rules 2 and 3, which
//!    count each transfer once); with another body it is refused with ALREADY_EXISTS. A
//!    resubmission whose call failed (coordinator down) promises nothing.

use super::workload::{Account, Mode, Record, Reuse, ReuseAnswer, Submitted, Told};
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
    /// Finished gids resubmitted with the same body and answered from the log/tombstone.
    pub reuse_same: u64,
    /// Finished gids resubmitted with another body and refused (ALREADY_EXISTS).
    pub reuse_refused: u64,
    /// Resubmissions whose call failed (no verdict possible).
    pub reuse_unanswered: u64,
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

/// (gid, branch) -> every row for it: (instance, op, answer, seq).
type RowIndex<'a> = HashMap<(&'a str, u32), Vec<(usize, &'a str, &'a str, u64)>>;

pub fn check(
    records: &[Record],
    reuses: &[Reuse],
    openings: &BTreeMap<Account, i64>,
    obs: &Observed,
) -> Verdict {
    let mut v = Verdict::default();
    let mut index: RowIndex = HashMap::new();
    for (inst, rows) in obs.rows.iter().enumerate() {
        for r in rows {
            index
                .entry((r.gid.as_str(), r.branch_id))
                .or_default()
                .push((inst, r.op.as_str(), r.answer.as_str(), r.seq));
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
        // Per branch: the seq of its compensate row (saga), when numbered.
        let mut compensated_at: Vec<Option<u64>> = vec![None; t.legs.len()];
        for (b, leg) in t.legs.iter().enumerate() {
            let mut mine = Ops::new();
            for &(inst, op, answer, seq) in index.get(&(gid, b as u32)).into_iter().flatten() {
                if inst == leg.account.inst {
                    if op == "compensate" && seq > 0 {
                        compensated_at[b] = Some(seq);
                    }
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
        // Rule 6: what the client was told.
        if let Submitted::Accepted(told @ (Told::Committed | Told::Aborted)) = rec.submitted {
            let want = match told {
                Told::Committed => Final::Committed,
                _ => Final::Aborted,
            };
            if fin.as_ref().is_some_and(|f| *f != want) {
                v.bad(
                    Some(gid),
                    format!(
                        "the client was told {told:?}, but the coordinator's final word is {fin:?}"
                    ),
                );
            }
            if told == Told::Aborted {
                for (b, o) in ops.iter().enumerate() {
                    let kept = match t.mode {
                        Mode::TwoPhase => o.contains_key("commit"),
                        Mode::Saga => {
                            has(o, "execute", "succeeded") && !o.contains_key("compensate")
                        }
                    };
                    if kept {
                        v.bad(
                            Some(gid),
                            format!("the client was told Aborted, but branch {b} kept its effect: {o:?}"),
                        );
                    }
                }
            }
        }
        // Rule 7: compensations of one instance in reverse step order.
        if t.mode == Mode::Saga {
            for i in 0..t.legs.len() {
                for j in i + 1..t.legs.len() {
                    if t.legs[i].account.inst != t.legs[j].account.inst {
                        continue;
                    }
                    if let (Some(si), Some(sj)) = (compensated_at[i], compensated_at[j]) {
                        if sj > si {
                            v.bad(
                                Some(gid),
                                format!(
                                    "step {i} was compensated (seq {si}) before step {j} (seq {sj}) \
                                     on bank {}: compensations must run in reverse step order",
                                    t.legs[i].account.inst
                                ),
                            );
                        }
                    }
                }
            }
        }
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
                if matches!(s, Submitted::Accepted(_)) {
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
    // Rule 8: finished gids resubmitted.
    for r in reuses {
        let gid = r.gid.as_str();
        let fin = obs.finals.get(gid);
        match (&r.answer, r.same_body) {
            (ReuseAnswer::Failed(_), _) => v.reuse_unanswered += 1,
            (ReuseAnswer::Answered { existing, told }, true) => {
                v.reuse_same += 1;
                if !existing {
                    v.bad(
                        Some(gid),
                        format!("resubmitted finished with the same body, Begin started it again (existing = false, told {told:?})"),
                    );
                }
                let want = match told {
                    Told::Committed => Some(Final::Committed),
                    Told::Aborted => Some(Final::Aborted),
                    Told::Pending => None,
                };
                if want.is_some() && fin != want.as_ref() {
                    v.bad(
                        Some(gid),
                        format!("resubmitted finished with the same body, told {told:?}, but the coordinator's final word is {fin:?}"),
                    );
                }
            }
            (ReuseAnswer::GidExists, true) => v.bad(
                Some(gid),
                "resubmitted finished with the same body, refused with ALREADY_EXISTS (the same definition must get the logged outcome)".into(),
            ),
            (ReuseAnswer::Answered { existing, told }, false) => v.bad(
                Some(gid),
                format!("resubmitted finished with another body, and Begin accepted it (existing = {existing}, told {told:?}) instead of ALREADY_EXISTS"),
            ),
            (ReuseAnswer::GidExists, false) => v.reuse_refused += 1,
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
    use crate::workload::{Leg, Transfer};
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
            submitted: Submitted::Accepted(Told::Pending),
            unknown_answers: 0,
        }
    }

    fn row(gid: &str, b: u32, op: &str, answer: &str) -> BarrierRow {
        seq_row(gid, b, op, answer, 0)
    }

    fn seq_row(gid: &str, b: u32, op: &str, answer: &str, seq: u64) -> BarrierRow {
        BarrierRow {
            gid: gid.into(),
            branch_id: b,
            op: op.into(),
            answer: answer.into(),
            seq,
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
        let v = check(&[transfer("g", Mode::TwoPhase)], &[], &openings(), &obs);
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
        let v = check(&[transfer("g", Mode::Saga)], &[], &openings(), &obs);
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
        let v = check(&[transfer("g", Mode::TwoPhase)], &[], &openings(), &obs);
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
        let v = check(&[transfer("g", Mode::Saga)], &[], &openings(), &obs);
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
        let v = check(&[transfer("g", Mode::Saga)], &[], &openings(), &stuck);
        assert!(whats(&v).iter().any(|x| x.contains("stuck")));

        let lost = observed(Final::NotFound, vec![], vec![], 100, 100);
        let v = check(&[transfer("g", Mode::Saga)], &[], &openings(), &lost);
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
        let v = check(&[rejected], &[], &openings(), &obs);
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
        let v = check(&records, &[], &openings, &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
        assert_eq!((v.compensated_credits, v.negative_accounts), (1, 1));
        // Lower than minus the compensated credits: a violation.
        obs.balances[1].insert("b".into(), (-11, 0));
        obs.balances[0].insert("a".into(), (111, 0));
        let v = check(&records, &[], &openings, &obs);
        assert!(
            whats(&v).iter().any(|x| x.contains("negative balance -11")),
            "{:?}",
            whats(&v)
        );
    }

    #[test]
    fn a_client_told_committed_of_an_aborted_transfer_is_caught() {
        let mut t = transfer("g", Mode::TwoPhase);
        t.submitted = Submitted::Accepted(Told::Committed);
        let obs = observed(
            Final::Aborted,
            vec![
                row("g", 0, "prepare", "prepared"),
                row("g", 0, "abort", "done"),
            ],
            vec![
                row("g", 1, "prepare", "prepared"),
                row("g", 1, "abort", "done"),
            ],
            100,
            100,
        );
        let v = check(&[t.clone()], &[], &openings(), &obs);
        assert!(
            whats(&v).iter().any(|x| x.contains("told Committed")),
            "{:?}",
            whats(&v)
        );
        // Told PENDING: nothing promised, nothing wrong.
        t.submitted = Submitted::Accepted(Told::Pending);
        let v = check(&[t], &[], &openings(), &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
    }

    /// A saga of three legs on one bank: debits a, c, then credit b; the credit failed.
    fn saga_on_one_bank(comp0: u64, comp1: u64) -> (Record, Observed) {
        let mut t = transfer("g", Mode::Saga);
        t.transfer.legs = vec![
            Leg {
                account: acct(0, "a"),
                amount: -10,
            },
            Leg {
                account: acct(0, "c"),
                amount: -10,
            },
            Leg {
                account: acct(0, "b"),
                amount: 20,
            },
        ];
        let rows = vec![
            seq_row("g", 0, "execute", "succeeded", 1),
            seq_row("g", 1, "execute", "succeeded", 2),
            seq_row("g", 2, "execute", "failed", 3),
            seq_row("g", 0, "compensate", "done", comp0),
            seq_row("g", 1, "compensate", "done", comp1),
        ];
        let obs = Observed {
            finals: [("g".to_string(), Final::Aborted)].into(),
            rows: vec![rows],
            balances: vec![[
                ("a".to_string(), (100, 0)),
                ("b".to_string(), (100, 0)),
                ("c".to_string(), (100, 0)),
            ]
            .into()],
        };
        (t, obs)
    }

    #[test]
    fn compensations_in_forward_order_are_caught() {
        let openings: BTreeMap<Account, i64> = [
            (acct(0, "a"), 100),
            (acct(0, "b"), 100),
            (acct(0, "c"), 100),
        ]
        .into();
        let (t, obs) = saga_on_one_bank(5, 4);
        let v = check(std::slice::from_ref(&t), &[], &openings, &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
        let (t, obs) = saga_on_one_bank(4, 5);
        let v = check(&[t], &[], &openings, &obs);
        assert!(
            whats(&v).iter().any(|x| x.contains("reverse step order")),
            "{:?}",
            whats(&v)
        );
    }

    #[test]
    fn a_finished_gid_started_again_or_redefined_is_caught() {
        let mut t = transfer("g", Mode::TwoPhase);
        t.submitted = Submitted::Accepted(Told::Committed);
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
        let reuse = |same_body, answer| Reuse {
            gid: "g".into(),
            same_body,
            answer,
        };
        let good = [
            reuse(
                true,
                ReuseAnswer::Answered {
                    existing: true,
                    told: Told::Committed,
                },
            ),
            reuse(false, ReuseAnswer::GidExists),
            reuse(true, ReuseAnswer::Failed("Unavailable".into())),
        ];
        let v = check(std::slice::from_ref(&t), &good, &openings(), &obs);
        assert!(v.violations.is_empty(), "{:?}", whats(&v));
        assert_eq!((v.reuse_same, v.reuse_refused), (1, 1));
        let bad = [
            reuse(
                true,
                ReuseAnswer::Answered {
                    existing: false,
                    told: Told::Committed,
                },
            ),
            reuse(
                false,
                ReuseAnswer::Answered {
                    existing: false,
                    told: Told::Aborted,
                },
            ),
        ];
        let v = check(&[t], &bad, &openings(), &obs);
        let w = whats(&v);
        assert!(w.iter().any(|x| x.contains("started it again")), "{w:?}");
        assert!(w.iter().any(|x| x.contains("another body")), "{w:?}");
    }
}
