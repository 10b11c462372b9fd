//! Participant metrics registered in the host service's registry count what the barrier
//! decided: a duplicate delivery is answered from its row and counted as `repeat`.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tonic::Request;
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::Participant as _;
use treaty_sdk::sled::SledStore;
use treaty_sdk::{BranchContext, HandlerResult, Participant, Saga, Txn};

fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

#[tokio::test]
async fn registered_participant_metrics_count_a_duplicate_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_dir(dir.path(), "business").unwrap();
    let participant = Participant::builder(store)
        .saga(
            "book",
            Saga::new()
                .execute(
                    async |_: &BranchContext,
                           _: &mut Txn<'_, SledStore>,
                           _: &[u8]|
                           -> HandlerResult { Ok(()) },
                )
                .compensate(
                    async |_: &BranchContext,
                           _: &mut Txn<'_, SledStore>,
                           _: &[u8]|
                           -> HandlerResult { Ok(()) },
                ),
        )
        .build()
        .unwrap();
    let mut registry = Registry::default();
    participant.register_metrics(&mut registry);
    let scrape = || {
        let mut s = String::new();
        encode(&mut s, &registry).unwrap();
        s
    };
    let before = scrape();
    let repeats_before = value(
        &before,
        r#"treaty_participant_barrier_decisions_total{rule="repeat"}"#,
    )
    .unwrap_or(0.0);

    let request = || {
        Request::new(pb::BranchRequest {
            gid: "dup-1".into(),
            branch_id: 0,
            handler: "book".into(),
            attempt: 1,
            payload: bytes::Bytes::from_static(b"seat 12A"),
            ..Default::default()
        })
    };
    for _ in 0..2 {
        let r = participant.execute(request()).await.unwrap().into_inner();
        assert_eq!(r.result(), pb::ExecuteResult::Succeeded, "{}", r.message);
    }

    let after = scrape();
    assert_eq!(
        value(
            &after,
            r#"treaty_participant_deliveries_total{op="execute",answer="succeeded"}"#
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            r#"treaty_participant_barrier_decisions_total{rule="repeat"}"#
        ),
        Some(repeats_before + 1.0),
        "the second delivery is a duplicate, answered from its row: {after}"
    );
    assert_eq!(
        value(
            &after,
            r#"treaty_participant_delivery_duration_seconds_count{op="execute"}"#
        ),
        Some(2.0),
        "{after}"
    );
    assert_eq!(value(&after, "treaty_participant_failed"), Some(0.0));
}
