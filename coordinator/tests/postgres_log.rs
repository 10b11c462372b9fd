//! The PostgreSQL log store against a private PostgreSQL server (`treaty-pg-harness`): the
//! log store contract (`conformance::check_all`), group commit, and what an unreachable
//! database does to the store.
//!
//! Each test starts its own server; without PostgreSQL installed they skip with a message
//! outside CI and fail in CI (`CI=true`).

use futures::future::{BoxFuture, FutureExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use treaty_coordinator::engine::types::Phase;
use treaty_coordinator::log::conformance::{self, record};
use treaty_coordinator::log::postgres::{PgLog, PgLogOptions};
use treaty_coordinator::log::LogStore;
use treaty_pg_harness::{PgOptions, PgServer};

/// Logs on one server: a fresh log is a new database; a reopen is a new store (a new
/// connection and writer task) on the same database, as a restarted coordinator would open.
struct Backend {
    server: PgServer,
    next: AtomicUsize,
    /// The URL of each log, by identity.
    urls: std::collections::HashMap<String, String>,
}

impl conformance::Backend for Backend {
    fn name(&self) -> &str {
        "postgres"
    }

    fn open_fresh(&mut self) -> BoxFuture<'_, Arc<dyn LogStore>> {
        async move {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let url = self
                .server
                .create_database(&format!("conformance_{n}"))
                .expect("create database");
            let log = PgLog::open(&url, PgLogOptions::default())
                .await
                .expect("open the PostgreSQL log");
            self.urls.insert(log.log_id().to_string(), url);
            Arc::new(log) as Arc<dyn LogStore>
        }
        .boxed()
    }

    fn reopen(&mut self, log: Arc<dyn LogStore>) -> BoxFuture<'_, Option<Arc<dyn LogStore>>> {
        async move {
            let url = self.urls[log.log_id()].clone();
            drop(log);
            let log = PgLog::open(&url, PgLogOptions::default())
                .await
                .expect("reopen the PostgreSQL log");
            Some(Arc::new(log) as Arc<dyn LogStore>)
        }
        .boxed()
    }

    /// Not injected: PostgreSQL has no switch to fail its WAL flush. A failed commit is
    /// tested below by cutting the connection instead.
    fn fail_syncs(&mut self, _log: &Arc<dyn LogStore>, _failing: bool) -> bool {
        false
    }
}

fn server() -> Option<PgServer> {
    PgServer::start_for_test(PgOptions::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_to_the_log_store_contract() {
    let Some(server) = server() else { return };
    let mut backend = Backend {
        server,
        next: AtomicUsize::new(0),
        urls: Default::default(),
    };
    conformance::check_all(&mut backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_of_one_database_shares_the_log_identity() {
    let Some(server) = server() else { return };
    let url = server.create_database("shared").expect("create database");
    let (a, b) = tokio::join!(
        PgLog::open(&url, PgLogOptions::default()),
        PgLog::open(&url, PgLogOptions::default())
    );
    let (a, b) = (a.expect("open a"), b.expect("open b"));
    assert_eq!(a.log_id(), b.log_id(), "two coordinators, one log identity");
    a.put(record("x", Phase::Active, 1), true)
        .await
        .expect("put");
    assert_eq!(
        b.get("x").await.expect("get"),
        Some(record("x", Phase::Active, 1)),
        "a forced write of one store is read by the other"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_or_an_unreachable_database_is_an_error_not_a_panic() {
    let err = PgLog::open("mysql://x", PgLogOptions::default())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not a PostgreSQL URL"), "{err}");
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let err = PgLog::open(
        &format!("postgres://treaty@127.0.0.1:{port}/none"),
        PgLogOptions::default(),
    )
    .await
    .err()
    .expect("unreachable");
    assert!(
        err.to_string().contains(&format!(
            "connecting to PostgreSQL at 127.0.0.1:{port}/none"
        )),
        "{err}"
    );
}

/// Group commit: forced writes issued together by many tasks share PostgreSQL commits, and
/// every one of them is durable (read back by a new store, as after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_forced_puts_share_commits() {
    const N: usize = 64;
    let Some(server) = server() else { return };
    let url = server
        .create_database("group_commit")
        .expect("create database");
    let log = Arc::new(
        PgLog::open(&url, PgLogOptions::default())
            .await
            .expect("open"),
    );
    let before = log.stats();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                log.put(record(&format!("g{i:03}"), Phase::Committing, 1), true)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("forced put");
    }
    let after = log.stats();
    let commits = after.flushes - before.flushes;
    assert_eq!(after.forced_writes - before.forced_writes, N as u64);
    assert!(
        commits < N as u64 / 2,
        "{N} concurrent forced puts took {commits} synchronous commits: no group commit"
    );
    drop(log);
    let reopened = PgLog::open(&url, PgLogOptions::default())
        .await
        .expect("reopen");
    let active = reopened.scan_active(None, 1000).await.expect("scan");
    assert_eq!(active.len(), N, "every acknowledged forced put is stored");
}

/// `sslmode=require` in the URL: the log connects over TLS, the server's certificate checked
/// against `tls_ca` (`--store-ca`): without a CA it is refused with what to do, with another
/// CA the handshake fails, with the right one the log works and its connection is TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_the_log_uses_tls_checked_against_the_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (Issuer::new(params, key), path)
    };
    let (issuer, ca_path) = ca("db-ca");
    let (_, other_ca_path) = ca("other-ca");
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let Some(server) = PgServer::start_for_test(PgOptions {
        tls: Some((cert.pem().into_bytes(), key.serialize_pem().into_bytes())),
        ..PgOptions::default()
    }) else {
        return;
    };
    let plain = server.create_database("tls").expect("create database");
    let url = format!("{plain}?sslmode=require");
    let with_ca = |ca: &std::path::Path| PgLogOptions {
        tls_ca: Some(ca.to_path_buf()),
        ..PgLogOptions::default()
    };

    let err = PgLog::open(&url, PgLogOptions::default())
        .await
        .err()
        .expect("no CA given");
    assert!(err.to_string().contains("--store-ca"), "{err}");
    let err = PgLog::open(&url, with_ca(&other_ca_path))
        .await
        .err()
        .expect("a certificate from another CA is refused");
    assert!(
        err.to_string().contains("connecting to PostgreSQL"),
        "{err}"
    );

    let log = PgLog::open(&url, with_ca(&ca_path))
        .await
        .expect("TLS with the right CA");
    log.put(record("x", Phase::Active, 1), true)
        .await
        .expect("put over TLS");
    assert_eq!(log.get("x").await.expect("get").map(|r| r.seq), Some(1));
    let (client, conn) = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
        .await
        .expect("a plain connection to look");
    tokio::spawn(conn);
    let tls: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = 'tls' AND s.ssl",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);
    assert!(tls >= 1, "the log's connection is TLS");
}
