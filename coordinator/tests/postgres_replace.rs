//! A coordinator over a PostgreSQL log replaces its failed runtime in the same process when the
//! database comes back (`server::Ended::Replace`): what a client connected BEFORE the outage
//! sees. Its HTTP/2 connection (a participant polling `Outcome`, an SDK client's pooled
//! channel) must be served by the new runtime once it serves, not by the failed one forever;
//! and a `Watch` stream open on the failed runtime must end with UNAVAILABLE (so the client
//! watches again) rather than hang.
//!
//! The coordinator runs in-process (`server::run_with`) over a private PostgreSQL server
//! (`treaty-pg-harness`) that the test kills and restarts. Without PostgreSQL installed the
//! test skips with a message outside CI and fails in CI (`CI=true`).

use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use treaty_coordinator::config::Config;
use treaty_coordinator::log::postgres::{PgLog, PgLogOptions};
use treaty_coordinator::log::LogStore;
use treaty_coordinator::server::{run_with, Extras};
use treaty_pg_harness::{PgOptions, PgServer};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;

type Health = tonic_health::pb::health_check_response::ServingStatus;

/// Poll `check` every 50 ms until it returns `Some`, for at most `bound`.
async fn wait_until<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(uri: &str) -> Option<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(uri.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()
}

/// The Coordinator service's health, asked on a NEW connection (what a fresh client sees).
async fn fresh_health(uri: &str) -> Option<Health> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(connect(uri).await?);
    let r = c
        .check(tonic_health::pb::HealthCheckRequest {
            service: "treaty.v1.Coordinator".into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status())
}

/// A `Get` of `gid` on a NEW connection succeeds.
async fn fresh_get(uri: &str, gid: &str) -> Option<pb::Transaction> {
    let mut c = CoordinatorClient::new(connect(uri).await?);
    c.get(pb::GetRequest { gid: gid.into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// A saga whose only step calls a port nobody listens on: it stays Active (retrying) for as
/// long as the test runs, so it is live in every runtime and worth watching.
fn begin_stuck_saga(gid: &str) -> pb::BeginRequest {
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    pb::BeginRequest {
        gid: gid.into(),
        mode: pb::Mode::Saga.into(),
        branches: vec![pb::Branch {
            endpoint: format!("http://127.0.0.1:{nobody}"),
            handler: "never".into(),
            payload: b"{}".to_vec().into(),
            compensation_payload: b"{}".to_vec().into(),
        }],
        deadline_ms: 600_000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_before_database_outages_is_served_by_the_runtime_that_replaces_the_failed_one(
) {
    // fsync on (the default): the harness then also turns synchronous_commit on, without
    // which a killed server loses commits it acknowledged.
    let Some(mut pg) = PgServer::start_for_test(PgOptions::default()) else {
        return;
    };
    let url = pg.create_database("treaty").expect("create database");
    let log: Arc<dyn LogStore> = Arc::new(
        PgLog::open(&url, PgLogOptions::default())
            .await
            .expect("open the PostgreSQL log"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        shutdown_grace: Duration::from_secs(2),
        ..Config::default()
    };
    let server = tokio::spawn(run_with(listener, log, config, Extras::default(), async {
        let _ = stopped.await;
    }));

    // One channel, one HTTP/2 connection, made now and used throughout.
    let channel = wait_until("the coordinator to serve", Duration::from_secs(30), || {
        connect(&uri)
    })
    .await;
    let mut client = CoordinatorClient::new(channel.clone());
    let gid = "replace-watched".to_string();
    client
        .begin(begin_stuck_saga(&gid))
        .await
        .expect("begin on the channel");

    for outage in 1..=2 {
        // A watch open on this runtime: it must end when the runtime fails.
        let mut watch = client
            .watch(pb::WatchRequest { gid: gid.clone() })
            .await
            .unwrap_or_else(|e| panic!("outage {outage}: watch: {e:?}"))
            .into_inner();
        let first = watch.next().await.expect("a first snapshot");
        assert_eq!(first.expect("snapshot").gid, gid);
        // A health watch on the same connection (as a load balancer keeps one open).
        let mut health_watch = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "treaty.v1.Coordinator".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("outage {outage}: health watch: {e:?}"))
            .into_inner();
        let next_health =
            async |stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
                   want: Health| {
                tokio::time::timeout(Duration::from_secs(60), async {
                    loop {
                        match stream.next().await {
                            Some(Ok(r)) if r.status() == want => return,
                            Some(Ok(_)) => continue,
                            other => panic!("outage {outage}: the health watch ended: {other:?}"),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("outage {outage}: the health watch never said {want:?}"))
            };
        next_health(&mut health_watch, Health::Serving).await;

        tokio::task::block_in_place(|| pg.kill());
        // The failed runtime ends the watch with UNAVAILABLE, within a bound: a client
        // waiting on it would otherwise never learn it must watch again.
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match watch.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => return Some(status.code()),
                    None => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!("outage {outage}: a watch on the failed runtime neither ended nor failed")
        });
        assert_eq!(
            ended,
            Some(tonic::Code::Unavailable),
            "outage {outage}: a watch on the failed runtime must end with UNAVAILABLE"
        );
        wait_until("NOT_SERVING", Duration::from_secs(30), || async {
            (fresh_health(&uri).await == Some(Health::NotServing)).then_some(())
        })
        .await;
        next_health(&mut health_watch, Health::NotServing).await;

        tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
        // Serving again, as a new connection sees it.
        wait_until("serving again", Duration::from_secs(60), || async {
            let serving = fresh_health(&uri).await == Some(Health::Serving);
            (serving && fresh_get(&uri, &gid).await.is_some()).then_some(())
        })
        .await;

        // The health watch opened before the outage follows the new runtime.
        next_health(&mut health_watch, Health::Serving).await;
        // The connection made before the outage is served by the new runtime: its first
        // call succeeds (no retry).
        let got = client
            .get(pb::GetRequest { gid: gid.clone() })
            .await
            .unwrap_or_else(|e| {
                panic!("outage {outage}: a Get on the connection made before the outage: {e:?}")
            })
            .into_inner();
        assert_eq!(got.gid, gid);
        assert_eq!(
            got.state,
            pb::TxState::Active as i32,
            "outage {outage}: the saga is live in the new runtime"
        );
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "treaty.v1.Coordinator".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("outage {outage}: health on the old connection: {e:?}"))
            .into_inner()
            .status();
        assert_eq!(
            status,
            Health::Serving,
            "outage {outage}: health on the connection made before the outage"
        );
    }

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("stops within its grace")
        .expect("server task")
        .expect("a clean stop");
}
