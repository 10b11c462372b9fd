//! Participant-side retention: the sweep of barrier rows (DESIGN.md section 7: "barrier rows
//! may be swept only when no delivery for them can still arrive and the coordinator's
//! tombstone of the gid outlives them").
//!
//! Off by default (rows are kept forever); on with [`crate::ParticipantBuilder::retention`]
//! for a store that [`BarrierStore::sweeps`] ([`crate::sled::SledStore`] does).
//!
//! # What is swept, and why it is safe
//!
//! The unit is a gid: all its rows here go at once, replaced by a small marker
//! ([`crate::barrier::Swept`]: the gid, the coordinator log that drove it, when). A round
//! pages through the rows by gid ([`BarrierStore::sweep_page`], `batch_rows_max` rows a
//! page), and sweeps a gid only when all of this holds:
//!
//! 1. **Finished here** ([`rules::sweep_candidate`]): no branch of the gid is prepared and
//!    undecided (those belong to the in-doubt resolver); every row names the same, non-empty
//!    coordinator log and outcome endpoint (a row without a log id cannot be matched to an
//!    answer: kept).
//! 2. **Old**: every row is older than [`RetentionPolicy::horizon`], which must exceed the
//!    longest a delivery can be in flight (the coordinator's per-call timeout, 5 s by
//!    default, and its backoff cap, 30 s); the default is an hour.
//! 3. **Finished at its coordinator** ([`rules::sweep_told`]): the coordinator named by the
//!    rows (their outcome endpoint, or the configured one) answers `Outcome` from **the same
//!    log** (`log_id`), **knows** the gid and says **`finished`**: the transaction is
//!    terminal in its log and that record is on stable storage (the coordinator syncs before
//!    saying so), or only its tombstone is left. A finished transaction sends nothing more:
//!    every branch operation is done (or resolved by an operator). An unknown gid (never
//!    seen, or forgotten past its tombstone), another log, an error or no answer: kept.
//!
//! Why that suffices:
//!
//! - **No delivery is due.** The coordinator sends nothing for a finished transaction, and
//!   says `finished` only from a durable record, so no crash of it can bring back an earlier
//!   phase that would send again. Only a late duplicate can still arrive (a delayed packet,
//!   a call whose answer was lost and that the coordinator stopped waiting for).
//! - **A late duplicate changes nothing.** Every delivery reads the gid's marker before its
//!   rows and, finding it, is planned by [`rules::plan_swept`]: no business code, nothing
//!   written; `Prepare`/`Execute` are `REFUSED`/`FAILED` (the coordinator that finished the
//!   gid ignores them), `Abort`/`Compensate` and a `Commit` from the same log are `DONE`
//!   (every branch here was decided before the sweep, and that log sends `Commit` only for
//!   a committed transaction). Without the marker a late `Prepare`/`Execute` would find no
//!   row and run the business code a second time.
//! - **The coordinator's tombstone outlives the rows.** The gid is swept only while its
//!   coordinator still knows it (record, then tombstone for `--tombstone-retention-secs`):
//!   for that long a `Begin` reusing the gid is answered from the tombstone and never
//!   reaches a participant. After it, a reuse starts a new transaction, which the marker
//!   refuses (safely: it aborts or compensates) until the marker expires. Set
//!   [`RetentionPolicy::swept_marker_ttl`] above the coordinator's `--retention-secs` plus
//!   `--tombstone-retention-secs` (97 days by default; the default TTL is 100 days), so that
//!   the marker outlives the tombstone and the marker is the only thing that expires last:
//!   by then no packet of the old transaction survives (TCP drops segments older than its
//!   maximum segment lifetime, minutes).
//! - **No race with a delivery.** [`BarrierStore::sweep_gid`] writes the marker first (from
//!   then on no row of the gid can be written), reads the rows again and deletes them only
//!   if they are exactly those judged; otherwise it removes the marker and keeps them.
//!
//! A gid whose coordinator forgot it before it was swept (the participant was down longer
//! than the coordinator's tombstone retention) is kept forever: counted in
//! [`SweepReport::unknown`], for an operator to look at.

use std::collections::HashSet;
use std::time::Duration;

use crate::barrier::rules::{self, CoordinatorSays, Keep};
use crate::barrier::{now_unix_ms, BarrierRow, Swept};
use crate::error::ParticipantError;
use crate::participant::Participant;
use crate::store::BarrierStore;

/// How a participant sweeps its barrier rows: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// Rows younger than this are kept, whatever the coordinator says: longer than any
    /// delivery can be in flight (the coordinator's call timeout and backoff cap). Default
    /// 1 hour.
    pub horizon: Duration,
    /// How long the marker of a swept gid refuses late deliveries: above the coordinator's
    /// `--retention-secs` plus `--tombstone-retention-secs`. Default 100 days.
    pub swept_marker_ttl: Duration,
    /// Time between two rounds. Default 10 minutes.
    pub interval: Duration,
    /// Rows read per page (a gid is never split). Default 1000.
    pub batch_rows_max: usize,
    /// Gids asked about per round at most (each is one `Outcome` call), and markers expired
    /// per round at most. Default 10 000.
    pub gids_per_round_max: usize,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            horizon: Duration::from_secs(3600),
            swept_marker_ttl: Duration::from_secs(100 * 24 * 3600),
            interval: Duration::from_secs(600),
            batch_rows_max: 1000,
            gids_per_round_max: 10_000,
        }
    }
}

impl RetentionPolicy {
    /// The default policy with rows kept at least `horizon`.
    pub fn with_horizon(horizon: Duration) -> RetentionPolicy {
        RetentionPolicy {
            horizon,
            ..RetentionPolicy::default()
        }
    }

    /// This policy with markers kept `ttl`.
    pub fn swept_marker_ttl(mut self, ttl: Duration) -> RetentionPolicy {
        self.swept_marker_ttl = ttl;
        self
    }

    /// This policy with rounds every `interval`.
    pub fn interval(mut self, interval: Duration) -> RetentionPolicy {
        self.interval = interval;
        self
    }

    /// This policy with pages of `rows` rows and at most `gids` gids asked per round.
    pub fn batches(mut self, rows: usize, gids: usize) -> RetentionPolicy {
        self.batch_rows_max = rows;
        self.gids_per_round_max = gids;
        self
    }

    pub(crate) fn check(&self) -> Result<(), ParticipantError> {
        if self.interval.is_zero() || self.batch_rows_max == 0 || self.gids_per_round_max == 0 {
            return Err(ParticipantError::Config(
                "retention: interval, batch_rows_max and gids_per_round_max must be more than \
                 zero"
                    .into(),
            ));
        }
        if self.swept_marker_ttl < self.horizon {
            return Err(ParticipantError::Config(format!(
                "retention: swept_marker_ttl ({:?}) must be at least the horizon ({:?}); it \
                 must outlive the coordinator's tombstones",
                self.swept_marker_ttl, self.horizon
            )));
        }
        Ok(())
    }
}

/// What one sweep round did ([`Participant::sweep`]), gid by gid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Gids whose rows were replaced by a marker.
    pub swept_gids: usize,
    /// Rows deleted.
    pub swept_rows: usize,
    /// Markers expired.
    pub markers_expired: usize,
    /// Gids kept: a row younger than the horizon.
    pub young: usize,
    /// Gids kept: a branch prepared and undecided here.
    pub open: usize,
    /// Gids kept: a row without a coordinator log id, or rows naming several coordinators.
    pub unidentified: usize,
    /// Gids kept: their coordinator could not be asked or did not answer.
    pub unanswered: usize,
    /// Gids kept: the answer came from another log than the one that drove them.
    pub wrong_log: usize,
    /// Gids kept: their coordinator does not know them (kept forever unless it learns
    /// them: look at these).
    pub unknown: usize,
    /// Gids kept: not finished at their coordinator yet.
    pub not_finished: usize,
    /// Gids kept: their rows changed during the round.
    pub changed: usize,
    /// Whether the round stopped at `gids_per_round_max` before the last page.
    pub truncated: bool,
}

impl SweepReport {
    fn keep(&mut self, why: Keep) {
        match why {
            Keep::Young => self.young += 1,
            Keep::Open => self.open += 1,
            Keep::NoLogId | Keep::Mixed => self.unidentified += 1,
            Keep::Unanswered => self.unanswered += 1,
            Keep::WrongLog => self.wrong_log += 1,
            Keep::Unknown => self.unknown += 1,
            Keep::NotFinished => self.not_finished += 1,
            Keep::Changed => self.changed += 1,
        }
    }
}

impl<S: BarrierStore> Participant<S> {
    /// One sweep round with the configured [`RetentionPolicy`] (see the module docs): pages
    /// through the rows by gid, asks each candidate gid's coordinator, replaces the rows of
    /// finished gids by a marker, then expires old markers. Fails on a storage error, and
    /// with [`ParticipantError::Config`] when no policy is configured.
    pub async fn sweep(&self) -> Result<SweepReport, ParticipantError> {
        let Some(policy) = self.retention_policy().cloned() else {
            return Err(ParticipantError::Config(
                "sweep needs a retention policy (ParticipantBuilder::retention)".into(),
            ));
        };
        let store = self.store();
        let mut report = SweepReport::default();
        let mut cursor: Option<String> = None;
        let mut asked = 0usize;
        // Coordinators that did not answer this round are not asked again in it: an
        // unreachable one would cost a call timeout per gid.
        let mut silent: HashSet<String> = HashSet::new();
        'pages: loop {
            let page = store
                .sweep_page(cursor.clone(), policy.batch_rows_max)
                .await?;
            for rows in page.rows.chunk_by(|a, b| a.gid == b.gid) {
                if asked >= policy.gids_per_round_max {
                    report.truncated = true;
                    break 'pages;
                }
                let now = now_unix_ms();
                if let Err(why) =
                    rules::sweep_candidate(rows, now, policy.horizon.as_millis() as u64)
                {
                    report.keep(why);
                    continue;
                }
                asked += 1;
                match self.sweep_one(rows, &mut silent).await? {
                    Ok(()) => {
                        report.swept_gids += 1;
                        report.swept_rows += rows.len();
                    }
                    Err(why) => report.keep(why),
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let cutoff = now_unix_ms().saturating_sub(policy.swept_marker_ttl.as_millis() as u64);
        report.markers_expired = store
            .expire_swept(cutoff, policy.gids_per_round_max)
            .await?;
        Ok(report)
    }

    /// Asks the coordinator of one candidate gid and sweeps it if it says finished.
    async fn sweep_one(
        &self,
        rows: &[BarrierRow],
        silent: &mut HashSet<String>,
    ) -> Result<Result<(), Keep>, ParticipantError> {
        let first = &rows[0];
        let uri = match (first.outcome_endpoint.as_str(), self.coordinator_uri()) {
            ("", Some(uri)) => uri.to_string(),
            ("", None) => return Ok(Err(Keep::Unanswered)),
            (named, _) => named.to_string(),
        };
        if silent.contains(&uri) {
            return Ok(Err(Keep::Unanswered));
        }
        let answer = self.ask_outcome(&uri, &first.gid).await;
        if answer.is_none() {
            silent.insert(uri.clone());
        }
        let answer = answer.map(|a| CoordinatorSays {
            log_id: a.log_id,
            known: a.known,
            finished: a.finished,
        });
        if let Err(why) = rules::sweep_told(&first.log_id, answer.as_ref()) {
            if why == Keep::WrongLog {
                tracing::warn!(gid = %first.gid, endpoint = %uri, "barrier rows kept: the coordinator answering is another log than the one that drove the gid");
            }
            return Ok(Err(why));
        }
        let marker = Swept::new(first.gid.clone(), first.log_id.clone(), now_unix_ms());
        if self.store().sweep_gid(rows.to_vec(), marker).await? {
            tracing::debug!(gid = %first.gid, rows = rows.len(), "barrier rows swept");
            Ok(Ok(()))
        } else {
            Ok(Err(Keep::Changed))
        }
    }

    /// Starts the sweeper task (a round every [`RetentionPolicy::interval`], the first one
    /// after one interval), if a policy is configured. [`Participant::serve`] does this
    /// itself; call it when you serve [`Participant::into_service`] in your own server, and
    /// abort the handle on shutdown.
    pub fn spawn_sweeper(&self) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.retention_policy()?.interval;
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match me.sweep().await {
                    Ok(r) if r.swept_gids == 0 && r.markers_expired == 0 => {}
                    Ok(r) => tracing::info!(
                        gids = r.swept_gids,
                        rows = r.swept_rows,
                        markers_expired = r.markers_expired,
                        unknown = r.unknown,
                        "swept barrier rows of finished transactions"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "barrier sweep failed; will retry next round")
                    }
                }
            }
        }))
    }
}
