//! Several coordinators on one PostgreSQL log (`--postgres --coordinators N`, N > 1).
//!
//! ```text
//!  worker w ──connect_any(rotated by w)──▶ treatyd 0 ─┐
//!                                          treatyd 1 ─┼──▶ one log database (treaty_log)
//!                                          treatyd 2 ─┘
//!  bank i ──Outcome (in-doubt inquiries)──▶ treatyd (i mod N)
//! ```
//!
//! Every treatyd runs with a short lease ([`SHARED_LOG_ARGS`]), so that a coordinator the nemesis
//! kills or pauses has its transactions taken over by another within a campaign. Each
//! worker's client fails over across all of them ([`worker_client`], the order rotated per
//! worker so that the load spreads); a bank's in-doubt inquiries go to one coordinator, which
//! may not own the transaction: any coordinator answers for the shared log.
//!
//! The nemesis SIGKILLs (and restarts) and SIGSTOPs (and SIGCONTs) any one coordinator
//! ([`Cluster::pick_coordinator`]); about a third of these faults last past the lease, so
//! that another coordinator takes over. `--pause-past-lease` (checker tests) makes every
//! coordinator pause freeze coordinator 0 until the log shows its epoch declared dead and its
//! transactions claimed ([`pause_past_lease`]), then resume it: a coordinator that writes
//! without the fence (the `skip_fence` mutation) writes records it no longer owns.
//!
//! # The check: no transaction driven by two coordinators at once
//!
//! Each record row of `treaty_tx` keeps `owners`, every epoch that wrote or claimed it, in
//! order (an epoch is appended when the writer or claimer differs from the last one). An
//! epoch never comes back to life (a coordinator that is fenced or restarts joins as a new
//! epoch), and a claim needs the previous owner's epoch dead; so an epoch that appears again
//! after a different one (A, B, A) means a coordinator that had lost the transaction wrote it
//! again: two coordinators drove it at once. [`judge`] flags that, and a row whose `owner` is
//! not the last of its `owners` (the two are written together). It also counts the takeovers
//! (each change of epoch in a history), reported in the summary.

use super::check::Violation;
use super::cluster::{lock, Cluster, FaultCounts};
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use treaty_sdk::{Client, ClientOptions};
use treaty_tests::Treatyd;

/// treatyd's extra flags when several share the log: a lease of 1.5 s, short so that
/// takeovers happen within a campaign (renewed every third of it; others claim every 500 ms).
pub const SHARED_LOG_ARGS: [&str; 2] = ["--lease-ms", "1500"];

/// How much a coordinator kill or pause that is meant to outlast the lease adds to the
/// nemesis's usual duration: past the lease plus one claim interval.
const PAST_LEASE_EXTRA: Duration = Duration::from_millis(2500);

/// Start coordinators 1..`n` with coordinator 0's binary, flags and environment.
pub fn start_others(
    bin: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Vec<Treatyd>, String> {
    (1..n)
        .map(|i| {
            Treatyd::start_from(
                bin.to_path_buf(),
                &dir.join(format!("treatyd{i}")),
                args,
                env,
            )
            .map_err(|e| format!("cannot start coordinator {i}: {e}"))
        })
        .collect()
}

/// Every coordinator's URI, coordinator 0 first.
pub fn uris(first: &str, others: &[Treatyd]) -> Vec<String> {
    std::iter::once(first.to_string())
        .chain(others.iter().map(Treatyd::uri))
        .collect()
}

impl Cluster {
    /// Every coordinator, coordinator 0 (`treatyd`) first.
    pub fn coordinators(&self) -> impl Iterator<Item = &Mutex<Treatyd>> {
        std::iter::once(&self.treatyd).chain(self.others.iter())
    }

    /// Every coordinator's URI, coordinator 0 first (restarts keep the address).
    pub fn coordinator_uris(&self) -> Vec<String> {
        std::iter::once(self.treatyd_uri.clone())
            .chain(self.others.iter().map(|t| lock(t).uri()))
            .collect()
    }

    /// The coordinator a nemesis action hits, and how long the fault lasts (`usual`, or
    /// past the lease about one time in three). With one coordinator: it, for `usual`,
    /// without drawing from `rng` (so a seed replays the same schedule as before).
    pub fn pick_coordinator(
        &self,
        rng: &mut StdRng,
        usual: Duration,
    ) -> (Duration, &Mutex<Treatyd>) {
        if self.others.is_empty() {
            return (usual, &self.treatyd);
        }
        let i = rng.gen_range(0..=self.others.len());
        let lasts = if rng.gen_bool(0.35) {
            usual + PAST_LEASE_EXTRA
        } else {
            usual
        };
        eprintln!("[chaos] coordinator {i} for {lasts:?}");
        let t = if i == 0 {
            &self.treatyd
        } else {
            &self.others[i - 1]
        };
        (lasts, t)
    }

    /// Whether coordinator pauses are [`pause_past_lease`] (`--pause-past-lease`).
    pub fn pause_past_lease(&self) -> bool {
        !self.others.is_empty()
            && self
                .opts
                .postgres
                .as_ref()
                .is_some_and(|m| m.pause_past_lease)
    }
}

/// Worker `w`'s client: with several coordinators, one that fails over across all of them,
/// starting at coordinator `w mod N`; with one, a clone of `one`.
pub async fn worker_client(cluster: &Cluster, one: &Client, w: usize) -> Result<Client, String> {
    let mut uris = cluster.coordinator_uris();
    if uris.len() == 1 {
        return Ok(one.clone());
    }
    let n = uris.len();
    uris.rotate_left(w % n);
    Client::connect_any(uris, &ClientOptions::new())
        .await
        .map_err(|e| format!("cannot connect to the coordinators: {e}"))
}

/// The epochs alive in `treaty_coordinators` for the treatyd at `uri` (its name there: its
/// advertised URL, else its listen address and pid).
async fn alive_epochs(
    db: &tokio_postgres::Client,
    uri: &str,
    pid: u32,
) -> Result<Vec<i64>, String> {
    let like = format!("% (pid {pid})");
    Ok(db
        .query(
            "SELECT epoch FROM treaty_coordinators WHERE alive AND (name = $1 OR name LIKE $2)",
            &[&uri, &like],
        )
        .await
        .map_err(|e| format!("reading treaty_coordinators: {e}"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Whether every epoch in `epochs` is dead and owns no unfinished record any more.
async fn taken_over(db: &tokio_postgres::Client, epochs: &[i64]) -> Result<bool, String> {
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM treaty_coordinators WHERE alive AND epoch = ANY($1)) \
             + (SELECT count(*) FROM treaty_tx WHERE active AND owner = ANY($1))",
            &[&epochs],
        )
        .await
        .map_err(|e| format!("reading the takeover: {e}"))?;
    Ok(row.get::<_, i64>(0) == 0)
}

/// How long [`pause_past_lease`] holds PostgreSQL still before freezing coordinator 0.
const QUEUE_WRITES_FOR: Duration = Duration::from_millis(800);

/// `--pause-past-lease`: SIGSTOP coordinator 0 (under load, so with transactions in flight
/// and writes queued), wait until the log shows its epoch dead and its unfinished records
/// claimed by others (bounded: 20 s), then SIGCONT it. A fenced coordinator writes nothing
/// more; one without the fence writes what it had queued, over the new owners.
pub fn pause_past_lease(
    cluster: &Cluster,
    t0: Instant,
    counts: &mut FaultCounts,
) -> Result<(), String> {
    let Some(url) = cluster.log_db.clone() else {
        return Ok(());
    };
    let t = lock(&cluster.treatyd);
    if t.proc.pid() == 0 {
        return Ok(());
    }
    let pid = t.proc.pid();
    let uri = t.uri();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connect to {url}: {e}"))?;
        let conn = tokio::spawn(conn);
        let epochs = alive_epochs(&db, &uri, pid).await?;
        if epochs.is_empty() {
            eprintln!(
                "[chaos {:6.1}s] coordinator 0 (pid {pid}) has no live epoch: not paused",
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
        eprintln!(
            "[chaos {:6.1}s] SIGSTOP coordinator 0 (epochs {epochs:?}) until taken over",
            t0.elapsed().as_secs_f64()
        );
        // Writes queue up in coordinator 0 while PostgreSQL stands still for a moment (well
        // within every lease); it is frozen with them queued, then PostgreSQL goes on.
        if let Some(pg) = &cluster.pg {
            let pg = lock(pg);
            pg.pause(true);
            // Blocking this thread (the nemesis's own) while holding the server's lock.
            std::thread::sleep(QUEUE_WRITES_FOR);
            let _ = nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGSTOP);
            pg.pause(false);
        }
        let _ = nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGSTOP);
        counts.coordinator_pauses += 1;
        let paused = Instant::now();
        let mut over = false;
        while paused.elapsed() < Duration::from_secs(20) {
            // A failed read (the nemesis may have paused PostgreSQL just before) is retried.
            if taken_over(&db, &epochs).await.unwrap_or(false) {
                over = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGCONT);
        if over {
            counts.paused_past_takeover += 1;
        }
        eprintln!(
            "[chaos {:6.1}s] SIGCONT coordinator 0 after {:?} (taken over: {over})",
            t0.elapsed().as_secs_f64(),
            paused.elapsed()
        );
        drop(db);
        let _ = conn.await;
        Ok(())
    })
}

/// What the ownership check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Record rows read.
    pub gids: u64,
    /// Changes of owning epoch over all histories (claims by another coordinator, or by a
    /// coordinator's own later epoch).
    pub takeovers: u64,
    pub violations: Vec<Violation>,
}

/// Read every record's `(gid, owner, owners)` from the log database at `url` and [`judge`].
pub async fn check(url: &str) -> Result<Report, String> {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    let conn = tokio::spawn(conn);
    let rows = db
        .query("SELECT gid, owner, owners FROM treaty_tx ORDER BY gid", &[])
        .await
        .map_err(|e| format!("SELECT gid, owner, owners FROM treaty_tx: {e}"))?;
    drop(db);
    let _ = conn.await;
    let rows: Vec<(String, i64, Vec<i64>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(judge(&rows))
}

/// The ownership rules over `(gid, owner, owners)` rows (see the module documentation).
pub fn judge(rows: &[(String, i64, Vec<i64>)]) -> Report {
    let mut report = Report {
        gids: rows.len() as u64,
        ..Report::default()
    };
    for (gid, owner, owners) in rows {
        let mut bad = |what: String| {
            report.violations.push(Violation {
                gid: Some(gid.clone()),
                what,
            })
        };
        report.takeovers += owners.windows(2).filter(|w| w[0] != w[1]).count() as u64;
        if let Some(last) = owners.last() {
            if last != owner {
                bad(format!(
                    "owner {owner} is not the last of its owners history {owners:?}"
                ));
            }
        }
        for (i, e) in owners.iter().enumerate() {
            let came_back = owners[..i]
                .iter()
                .rposition(|x| x == e)
                .is_some_and(|j| owners[j..i].iter().any(|x| x != e));
            if came_back {
                bad(format!(
                    "driven by two coordinators at once: epoch {e} wrote again after another \
                     epoch took the transaction over (owners history {owners:?})"
                ));
                break;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::judge;

    fn row(owner: i64, owners: &[i64]) -> (String, i64, Vec<i64>) {
        ("g".into(), owner, owners.to_vec())
    }

    #[test]
    fn an_epoch_writing_again_after_a_takeover_is_flagged() {
        let r = judge(&[row(1, &[1, 2, 1])]);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].what.contains("two coordinators"), "{r:?}");
        assert_eq!(r.takeovers, 2);
        let r = judge(&[row(3, &[1, 2, 3, 1, 3])]);
        assert_eq!(r.violations.len(), 1, "{r:?}");
    }

    #[test]
    fn takeovers_in_any_epoch_order_are_fine() {
        let r = judge(&[
            row(1, &[1]),
            row(3, &[1, 3]),
            row(2, &[3, 2]),
            row(4, &[1, 3, 2, 4]),
            row(0, &[]),
        ]);
        assert!(r.violations.is_empty(), "{r:?}");
        assert_eq!((r.gids, r.takeovers), (5, 5));
    }

    #[test]
    fn an_owner_that_is_not_the_last_of_the_history_is_flagged() {
        let r = judge(&[row(1, &[1, 2])]);
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].what.contains("not the last"), "{r:?}");
    }
}
