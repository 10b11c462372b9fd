//! Trip booking: flight, hotel and car services, each a saga participant with a `book`
//! handler (execute books, compensate cancels), and a journal of what each did, in order.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use treaty_sdk::{refuse, saga_fn, Participant, SdkError};

/// What the services did, in the order they did it. Shared by the three in-process services.
///
/// A sled transaction may run its closure more than once, so an entry is only added the first
/// time (per service, gid and action); steps of one saga run one after the other, so the
/// order of first occurrence is the order of the saga.
#[derive(Clone, Default)]
pub struct Journal {
    inner: Arc<Mutex<(Vec<String>, HashSet<String>)>>,
}

impl Journal {
    fn record(&self, service: &str, gid: &str, action: &str) {
        let mut j = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if j.1.insert(format!("{service}/{gid}/{action}")) {
            j.0.push(format!("{service}: {action}"));
        }
    }

    /// The entries so far.
    pub fn entries(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

/// One booking service (`kind` is flight, hotel or car) with its own sled store in `dir`.
/// With `fail`, every booking is refused ("no availability").
pub fn service(
    kind: &'static str,
    dir: &Path,
    coordinator: &str,
    fail: bool,
    journal: Journal,
) -> Result<Participant, SdkError> {
    std::fs::create_dir_all(dir).map_err(|e| SdkError::Storage(sled::Error::Io(e)))?;
    let db = sled::open(dir)?;
    let tree = db.open_tree("bookings")?;
    let (j1, j2) = (journal.clone(), journal);
    Participant::builder(db, tree, dir)
        .coordinator(coordinator)
        .saga(
            "book",
            saga_fn(
                move |ctx, tree, payload| {
                    if fail {
                        j1.record(kind, &ctx.gid, "refused");
                        return Err(refuse(format!("no {kind} availability")));
                    }
                    tree.insert(ctx.gid.as_bytes(), payload)?;
                    j1.record(kind, &ctx.gid, "booked");
                    Ok(())
                },
                move |ctx, tree, _payload| {
                    tree.remove(ctx.gid.as_bytes())?;
                    j2.record(kind, &ctx.gid, "cancelled");
                    Ok(())
                },
            ),
        )
        .build()
}
