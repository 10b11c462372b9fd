//! What `treaty` prints: serde views of the SDK's domain types (the `--json` form, stable
//! lowercase names, times in unix ms) and the human tables built from the same views.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use treaty_sdk::{BranchState, BranchStatus, Mode, Outcome, TransactionStatus, TxState};

/// A transaction as `--json` prints it.
#[derive(Serialize, Debug, Clone)]
pub struct TxView {
    pub gid: String,
    /// `2pc` or `saga`.
    pub mode: &'static str,
    /// `active`, `committing`, `aborting`, `compensating`, `committed` or `aborted`.
    pub state: &'static str,
    /// `pending`, `committed` or `aborted`.
    pub outcome: &'static str,
    pub stuck: bool,
    /// Why it aborted or compensated, when it did.
    pub reason: Option<String>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub deadline_unix_ms: Option<u64>,
    pub branches: Vec<BranchView>,
}

/// One branch as `--json` prints it.
#[derive(Serialize, Debug, Clone)]
pub struct BranchView {
    pub branch_id: u32,
    pub endpoint: String,
    pub handler: String,
    /// `pending`, `in_doubt`, `prepared`, `refused`, `succeeded`, `failed`, `committed` or
    /// `aborted`.
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub resolution: Option<ResolutionView>,
}

/// An operator's resolution of a branch.
#[derive(Serialize, Debug, Clone)]
pub struct ResolutionView {
    pub operator: String,
    pub unix_ms: u64,
    pub reason: String,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::TwoPhase => "2pc",
        Mode::Saga => "saga",
        _ => "unknown",
    }
}

fn state_name(s: TxState) -> &'static str {
    match s {
        TxState::Active => "active",
        TxState::Committing => "committing",
        TxState::Aborting => "aborting",
        TxState::Compensating => "compensating",
        TxState::Committed => "committed",
        TxState::Aborted => "aborted",
        _ => "unknown",
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Pending => "pending",
        Outcome::Committed => "committed",
        Outcome::Aborted => "aborted",
    }
}

fn branch_state_name(s: BranchState) -> &'static str {
    match s {
        BranchState::Pending => "pending",
        BranchState::InDoubt => "in_doubt",
        BranchState::Prepared => "prepared",
        BranchState::Refused => "refused",
        BranchState::Succeeded => "succeeded",
        BranchState::Failed => "failed",
        BranchState::Committed => "committed",
        BranchState::Aborted => "aborted",
        _ => "unknown",
    }
}

impl From<&BranchStatus> for BranchView {
    fn from(b: &BranchStatus) -> Self {
        BranchView {
            branch_id: b.branch_id,
            endpoint: b.endpoint.clone(),
            handler: b.handler.clone(),
            state: branch_state_name(b.state),
            attempts: b.attempts,
            last_error: b.last_error.clone(),
            resolution: b.resolution.as_ref().map(|r| ResolutionView {
                operator: r.operator.clone(),
                unix_ms: ms(r.at),
                reason: r.reason.clone(),
            }),
        }
    }
}

impl From<&TransactionStatus> for TxView {
    fn from(t: &TransactionStatus) -> Self {
        TxView {
            gid: t.gid.clone(),
            mode: mode_name(t.mode),
            state: state_name(t.state),
            outcome: outcome_name(t.outcome),
            stuck: t.stuck,
            reason: t.reason.clone(),
            created_unix_ms: ms(t.created_at),
            updated_unix_ms: ms(t.updated_at),
            deadline_unix_ms: t.deadline.map(ms),
            branches: t.branches.iter().map(BranchView::from).collect(),
        }
    }
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("views serialize")
    );
}

/// `30s`, `5m`, `2h`, `1d`, `500ms`: a number and a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit: write e.g. 30s, 5m, 2h, 1d or 500ms"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then a unit, e.g. 30s"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h or d)")),
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `2026-11-30 13:07:45Z` (UTC).
pub fn fmt_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How long ago `unix_ms` was, roughly: `42s`, `7m`, `3h`, `2d`.
fn age(unix_ms: u64) -> String {
    let now = ms(SystemTime::now());
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, (c, &w)) in cells.into_iter().zip(&width).enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// The `list` table.
pub fn list_table(txs: &[TxView]) -> String {
    if txs.is_empty() {
        return "no transactions match\n".into();
    }
    let rows: Vec<Vec<String>> = txs
        .iter()
        .map(|t| {
            vec![
                t.gid.clone(),
                t.mode.into(),
                t.state.into(),
                t.outcome.into(),
                if t.stuck { "STUCK" } else { "" }.into(),
                age(t.created_unix_ms),
                cut(t.reason.as_deref().unwrap_or(""), 80),
            ]
        })
        .collect();
    table(
        &["GID", "MODE", "STATE", "OUTCOME", "STUCK", "AGE", "REASON"],
        &rows,
    )
}

/// The `show` page.
pub fn show(t: &TxView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "gid       {}", t.gid);
    let _ = writeln!(out, "mode      {}", t.mode);
    let _ = writeln!(out, "state     {} (outcome {})", t.state, t.outcome);
    if t.stuck {
        let _ = writeln!(
            out,
            "stuck     yes: a phase-two call keeps failing (retry: `treaty retry`; a \
             participant gone for good: `treaty resolve`)"
        );
    }
    if let Some(why) = &t.reason {
        let _ = writeln!(out, "reason    {why}");
    }
    let _ = writeln!(
        out,
        "created   {} ({} ago)",
        fmt_time(t.created_unix_ms),
        age(t.created_unix_ms)
    );
    let _ = writeln!(out, "updated   {}", fmt_time(t.updated_unix_ms));
    if let Some(d) = t.deadline_unix_ms {
        let _ = writeln!(out, "deadline  {}", fmt_time(d));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = t
        .branches
        .iter()
        .map(|b| {
            vec![
                b.branch_id.to_string(),
                b.handler.clone(),
                b.endpoint.clone(),
                b.state.into(),
                b.attempts.to_string(),
                b.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "BRANCH",
            "HANDLER",
            "ENDPOINT",
            "STATE",
            "ATTEMPTS",
            "LAST ERROR",
        ],
        &rows,
    ));
    for b in &t.branches {
        if let Some(r) = &b.resolution {
            let _ = writeln!(
                out,
                "branch {} resolved by hand by {} at {}: {}",
                b.branch_id,
                r.operator,
                fmt_time(r.unix_ms),
                r.reason
            );
        }
    }
    out
}

/// One line of `watch`.
pub fn watch_line(t: &TxView) -> String {
    let branches: Vec<String> = t
        .branches
        .iter()
        .map(|b| format!("{}={}", b.branch_id, b.state))
        .collect();
    let mut line = format!(
        "{} {} {} outcome={} branches: {}",
        fmt_time(t.updated_unix_ms),
        t.gid,
        t.state,
        t.outcome,
        branches.join(" ")
    );
    if t.stuck {
        line.push_str(" STUCK");
    }
    if let Some(why) = &t.reason {
        let _ = write!(line, " reason: {why}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_time(1_796_044_065_000), "2026-11-30 13:07:45Z");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn long_reasons_are_cut_in_the_list() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
