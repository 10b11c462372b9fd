//! `lazyfs-probe DIR COUNT`: opens sled at DIR and writes COUNT records, each acknowledged
//! (`ack I` on stdout) only after `SledSync::sync_blocking` returned, as the barrier and the
//! coordinator's log acknowledge forced writes. Then it writes as many records again without a
//! sync (only sled's own `flush()`), so a power cut has a torn tail to take away, prints `done`
//! and waits to be killed.
//!
//! Built normally it runs the real `SledSync`; built with the feature
//! `mutation-skip-fdatasync` it runs the broken one, which the power-cut test must catch.
//! sled's background flusher (which would `sync_all` every 500 ms) is off, so that whatever
//! survives survives because of `SledSync` alone, and the outcome does not depend on timing.

use std::io::Write;
use std::path::PathBuf;

use treaty_durable::SledSync;
use treaty_lazyfs::probe::{key, value};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, count] = args.as_slice() else {
        eprintln!("usage: lazyfs-probe DIR COUNT");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let count: u64 = count.parse().expect("COUNT is a number");
    let db = sled::Config::new()
        .path(&dir)
        .flush_every_ms(None)
        .open()
        .unwrap_or_else(|e| panic!("opening sled at {}: {e}", dir.display()));
    let sync = SledSync::new(db.clone(), &dir)
        .unwrap_or_else(|e| panic!("starting SledSync at {}: {e}", dir.display()));
    let mut out = std::io::stdout().lock();
    for i in 0..count {
        db.insert(key(i), value(i))
            .unwrap_or_else(|e| panic!("inserting record {i}: {e}"));
        sync.sync_blocking()
            .unwrap_or_else(|e| panic!("syncing record {i}: {e}"));
        writeln!(out, "ack {i}")
            .and_then(|()| out.flush())
            .expect("stdout");
    }
    for i in count..2 * count {
        db.insert(key(i), value(i))
            .unwrap_or_else(|e| panic!("inserting unacknowledged record {i}: {e}"));
    }
    // sync_file_range: reaches the filesystem as writes, never as a sync.
    db.flush().expect("flushing the unacknowledged records");
    writeln!(out, "done")
        .and_then(|()| out.flush())
        .expect("stdout");
    // Wait for SIGKILL: the power cut comes while the process is alive, as it would.
    loop {
        std::thread::park();
    }
}
