//! The PostgreSQL barrier store against a private PostgreSQL server (`treaty-pg-harness`):
//! the conformance suite, and what only PostgreSQL does (prepared transactions, refusing a
//! server without them, in-doubt branches found after a restart).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use treaty_pg_harness::{PgOptions, PgServer};
use treaty_sdk::postgres::PgStore;
use treaty_sdk::store::conformance::{self, Harness};
use treaty_sdk::{HandlerError, HandlerResult, Txn};

/// A fresh database per store, on one server.
struct PgHarness {
    server: Mutex<PgServer>,
    next: AtomicU32,
}

impl PgHarness {
    fn start() -> Option<PgHarness> {
        let server = PgServer::start_for_test(PgOptions {
            fsync: false,
            ..PgOptions::default()
        })?;
        Some(PgHarness {
            server: Mutex::new(server),
            next: AtomicU32::new(0),
        })
    }

    fn new_database(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.server
            .lock()
            .unwrap()
            .create_database(&format!("conformance_{n}"))
            .expect("create a database")
    }
}

impl Harness for PgHarness {
    type Store = PgStore;

    async fn open(&self) -> PgStore {
        let url = self.new_database();
        let store = PgStore::connect(&url).await.expect("open the store");
        store
            .pool()
            .get()
            .await
            .expect("a connection")
            .batch_execute("CREATE TABLE marks (key text PRIMARY KEY)")
            .await
            .expect("the business table");
        store
    }

    async fn write_mark<'a, 't>(tx: &'a mut Txn<'t, PgStore>, key: &'a str) -> HandlerResult {
        tx.execute(
            "INSERT INTO marks (key) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&key],
        )
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }

    async fn has_mark(store: &PgStore, key: &str) -> bool {
        let conn = store.pool().get().await.expect("a connection");
        conn.query_opt("SELECT 1 FROM marks WHERE key = $1", &[&key])
            .await
            .expect("read the business table")
            .is_some()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_passes_the_conformance_suite() {
    let Some(h) = PgHarness::start() else { return };
    conformance::run_all(&h).await;
}
