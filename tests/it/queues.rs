//! Queue settings that change: queues that exist with other arguments (an earlier
//! `ETL_DELIVERY_LIMIT`, a queue made by hand) are used as the broker has them, the
//! difference is reported, and loansync's own delivery limit applies at once.

use crate::harness::TestApp;
use crate::harness::{
    InProcess, assert_books_balance, assert_delivered_all, expected_full, seeded_db, settings_for,
    small, stub, wait_syncs_finished, worker_process,
};
use crate::support::{amqp_url, wait_for};
use loansync::app::connect_broker_with;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::amqp::{ArgumentMismatch, BrokerHealth};
use loansync::stub_api::Faults;
use loansync::telemetry::{Metrics, Telemetry};
use std::sync::Arc;
use std::time::Duration;

fn full() -> PlanRequest {
    PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    }
}

fn limit_differs(queue: &str, broker: &str, wanted: &str) -> ArgumentMismatch {
    ArgumentMismatch {
        queue: queue.into(),
        argument: "x-delivery-limit".into(),
        broker: broker.into(),
        wanted: wanted.into(),
    }
}

/// `etl_queue_arguments_mismatch{queue}`; `None` before the queue was declared.
fn mismatch_gauge(metrics: &Metrics, queue: &str) -> Option<i64> {
    metrics
        .value("etl_queue_arguments_mismatch", &[("queue", queue)])
        .map(|v| v as i64)
}

/// Deployed with `ETL_DELIVERY_LIMIT=3`, restarted with 7: the queues keep the broker's
/// limit of 5, the process starts, says so, and a sync runs end to end on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_with_a_higher_delivery_limit_uses_the_queues_as_they_are() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;

    let before = settings_for(&db, &stub.url(), &[("ETL_DELIVERY_LIMIT", "3")]);
    let telemetry = Telemetry::fresh();
    let first = connect_broker_with(&before, BrokerHealth::with_telemetry(telemetry.clone()))
        .await
        .unwrap();
    assert_eq!(first.argument_mismatches(), &[]);
    let t = first.topology.clone();
    assert_eq!(mismatch_gauge(&telemetry, &t.chunks), Some(0));
    first.close().await;

    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[("ETL_DELIVERY_LIMIT", "7")],
    ));
    let broker = connect_broker_with(&settings, BrokerHealth::with_telemetry(telemetry.clone()))
        .await
        .expect("a changed ETL_DELIVERY_LIMIT must not stop loansync");
    assert_eq!(
        broker.argument_mismatches(),
        &[
            limit_differs(&t.plan, "5", "9"),
            limit_differs(&t.chunks, "5", "9"),
        ]
    );
    assert_eq!(mismatch_gauge(&telemetry, &t.plan), Some(1));
    assert_eq!(mismatch_gauge(&telemetry, &t.chunks), Some(1));
    assert_eq!(mismatch_gauge(&telemetry, &t.dead), Some(0));

    // A planner and two workers with the new settings, on the queues as they are.
    let running = InProcess::start(&db, &settings).await;
    broker.publish_json(&t.plan, &[full()]).await.unwrap();
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let expected = expected_full(&db.pool).await;
    assert_delivered_all(&stub.received(), &expected);
    assert_books_balance(&db.pool).await;
    broker.close().await;
    running.shutdown().await;
}

/// Deployed with `ETL_DELIVERY_LIMIT=7` (the broker's limit 9), restarted with 2: a
/// chunk started twice already gives up at its next start, as the new limit says,
/// though the broker would deliver it seven more times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_with_a_lower_delivery_limit_gives_up_at_the_new_limit() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;

    let before = settings_for(&db, &stub.url(), &[("ETL_DELIVERY_LIMIT", "7")]);
    connect_broker_with(&before, BrokerHealth::default())
        .await
        .unwrap()
        .close()
        .await;

    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[("ETL_DELIVERY_LIMIT", "2")],
    ));
    let broker = connect_broker_with(&settings, BrokerHealth::default())
        .await
        .unwrap();
    let t = broker.topology.clone();
    assert_eq!(
        broker.argument_mismatches(),
        &[
            limit_differs(&t.plan, "9", "4"),
            limit_differs(&t.chunks, "9", "4"),
        ]
    );
    let PlanOutcome::Planned { .. } = planner::plan_sync(&db.pool, &settings, &full(), &broker)
        .await
        .unwrap()
    else {
        panic!("not planned")
    };
    // One loan chunk was started twice before the restart.
    let hit =
        sqlx::query("UPDATE loansync_chunk SET attempts = 2 WHERE entity = 'loan' AND seq = 0")
            .execute(&db.pool)
            .await
            .unwrap();
    assert_eq!(hit.rows_affected(), 1);

    let running = InProcess::start(&db, &settings).await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success", "{:?}", h[0].error_message);
    assert_eq!(h[0].counts(EntityKind::Loan).2, 20, "the chunk's 20 loans");
    let failures: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT error_code::text, error_message FROM etl_folder_etlsyncerror",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "CHUNK_GAVE_UP");
    assert!(
        failures[0].1.contains("ETL_DELIVERY_LIMIT 2"),
        "{failures:?}"
    );
    wait_for(
        "the chunk in the dead-letter queue",
        Duration::from_secs(20),
        || async { broker.queue_depth(&t.dead).await.unwrap() == 1 },
    )
    .await;
    assert_books_balance(&db.pool).await;
    broker.close().await;
    running.shutdown().await;
}

/// A queue made by hand as a classic queue without dead-lettering: every argument that
/// differs is reported (the dead-letter ones too), and messages still go through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_made_with_other_arguments_is_used_and_every_difference_reported() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    let db = TestApp::with_source_schema().await;
    let prefix = db.queue_prefix();
    let chunks = format!("{prefix}.chunks");
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("classic")),
    );
    channel
        .queue_declare(
            ShortString::from(chunks.as_str()),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    let _ = conn.close(200, ShortString::from("bye")).await;

    let broker = loansync::queue::amqp::Broker::connect(&amqp_url(), &prefix, 9)
        .await
        .expect("an existing queue with other arguments must not stop loansync");
    let found: Vec<(&str, &str, &str, &str)> = broker
        .argument_mismatches()
        .iter()
        .map(|m| {
            (
                m.queue.as_str(),
                m.argument.as_str(),
                m.broker.as_str(),
                m.wanted.as_str(),
            )
        })
        .collect();
    for expected in [
        (chunks.as_str(), "x-queue-type", "classic", "quorum"),
        (chunks.as_str(), "x-dead-letter-exchange", "none", ""),
        (
            chunks.as_str(),
            "x-dead-letter-routing-key",
            "none",
            &*format!("{prefix}.dead"),
        ),
    ] {
        assert!(found.contains(&expected), "{expected:?} not in {found:?}");
    }
    assert!(
        found.iter().all(|m| m.0 == chunks),
        "only {chunks} differs: {found:?}"
    );
    // Counted in the process-wide registry, the one a broker connects with by default.
    assert_eq!(
        mismatch_gauge(&Telemetry::global(), &chunks),
        Some(found.len() as i64)
    );

    broker.publish_bytes(&chunks, b"still works").await.unwrap();
    let mut consumer = broker.raw_consumer(&chunks, 1, "test").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery")
        .expect("consumer open")
        .unwrap();
    assert_eq!(d.body(), b"still works");
    d.settle(&broker, &chunks, loansync::queue::Disposition::Ack)
        .await
        .unwrap();
    consumer.close().await;
    broker.close().await;
}

/// The planner's publishing hands many publishes to the connection at once: 2,500 chunk
/// jobs (more than the publishes in flight and the confirms awaited at a time) all
/// arrive, each once, in the order they were published, and every one was confirmed
/// before `publish_chunks` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_chunk_jobs_published_at_once_arrive_once_each_in_order() {
    use loansync::domain::ChunkJob;
    use loansync::queue::{ChunkPublisher, Consumer, Disposition};
    let db = crate::harness::TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let broker = connect_broker_with(&settings, BrokerHealth::default())
        .await
        .unwrap();
    let t = broker.topology.clone();
    let jobs: Vec<ChunkJob> = (0..2_500)
        .map(|seq| ChunkJob {
            sync_id: "publish-order".into(),
            entity: EntityKind::Repayment,
            seq,
        })
        .collect();
    broker.publish_chunks(&jobs).await.unwrap();
    assert_eq!(
        broker.queue_depth(&t.chunks).await.unwrap(),
        2_500,
        "all confirmed and queued"
    );

    let mut consumer = broker
        .consumer(&t.chunks, 500, "order-check", Duration::from_millis(10))
        .await
        .unwrap();
    let mut seen = Vec::with_capacity(jobs.len());
    while seen.len() < jobs.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a delivery within 30 s")
            .expect("the consumer is open")
            .unwrap();
        let job: ChunkJob = serde_json::from_slice(d.body()).unwrap();
        seen.push(job.seq);
        d.settle(Disposition::Ack).await.unwrap();
    }
    assert_eq!(seen, (0..2_500).collect::<Vec<i32>>());
    wait_for("the queue to be empty", Duration::from_secs(30), || async {
        broker.queue_depth(&t.chunks).await.unwrap() == 0
    })
    .await;
    broker.close().await;
}

/// A dead letter that no queue takes (the dead-letter queue deleted by hand) is an
/// error, as any other publish the broker cannot route: the message it stands for is
/// not acked and goes back to its queue, instead of being acked and dropped unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_no_queue_takes_is_an_error_and_its_message_stays() {
    use lapin::options::QueueDeleteOptions;
    use lapin::types::ShortString;
    use loansync::queue::Disposition;

    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let broker = connect_broker_with(&settings, BrokerHealth::default())
        .await
        .unwrap();
    let t = broker.topology.clone();
    broker
        .publish_bytes(&t.chunks, b"never works")
        .await
        .unwrap();
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete(
            ShortString::from(t.dead.as_str()),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, ShortString::from("bye")).await;

    let mut consumer = broker.raw_consumer(&t.chunks, 1, "test").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a delivery")
        .expect("consumer open")
        .unwrap();
    let err = d
        .settle(&broker, &t.chunks, Disposition::DeadLetter("test".into()))
        .await
        .expect_err("a dead letter no queue takes must not settle the message");
    assert!(format!("{err:#}").contains("could not route"), "{err:#}");
    // Never acked: closing the consumer puts it back.
    consumer.close().await;
    wait_for(
        "the message back in its queue",
        Duration::from_secs(20),
        || async { broker.queue_depth(&t.chunks).await.unwrap() == 1 },
    )
    .await;
    broker.close().await;
}

/// A worker that dies after receiving a chunk job and before starting it returns the job
/// without an attempt counted in the ledger, and RabbitMQ drops a message returned more
/// than its queue's `x-delivery-limit` times (`ETL_DELIVERY_LIMIT` + 2 when the queue was
/// made), which would leave its chunk unsettled and its sync running for good. A worker
/// puts the job back as a fresh copy first, at `ETL_DELIVERY_LIMIT` returns or two
/// before the queue's own limit, whichever comes first: here the queues were made with
/// a limit of 2 (4 on the broker) and the workers run with 20. Seven workers dying at
/// receipt one after the other lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunk_jobs_whose_workers_die_before_starting_them_are_never_dropped_by_the_broker() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(
        &db,
        &stub.url(),
        &[("ETL_DELIVERY_LIMIT", "2")],
    ));
    let broker = connect_broker_with(&settings, BrokerHealth::default())
        .await
        .unwrap();
    let t = broker.topology.clone();
    let PlanOutcome::Planned { .. } = planner::plan_sync(&db.pool, &settings, &full(), &broker)
        .await
        .unwrap()
    else {
        panic!("not planned")
    };
    let jobs = broker.queue_depth(&t.chunks).await.unwrap();
    for _ in 0..7 {
        let mut worker = worker_process(&db, &settings, &stub.url());
        worker
            .env("ETL_DELIVERY_LIMIT", "20")
            .env(loansync::failpoints::ENV, "worker::received=kill");
        let died = tokio::time::timeout(Duration::from_secs(60), async {
            worker.spawn().unwrap().wait().await.unwrap()
        })
        .await
        .expect("the armed worker dies at its first chunk job");
        assert!(!died.success());
    }
    // The broker returns a killed worker's unacked jobs once it has seen the connection
    // close, not at once; and a worker killed between confirming a renewed copy and
    // acking the old one leaves both (the ledger counts a chunk once). So: every job
    // back, perhaps twice, and none dead-lettered.
    wait_for(
        "the killed workers' chunk jobs back in the queue",
        Duration::from_secs(30),
        || async { broker.queue_depth(&t.chunks).await.unwrap() >= jobs },
    )
    .await;
    assert_eq!(
        broker.queue_depth(&t.dead).await.unwrap(),
        0,
        "no chunk job dropped by the broker"
    );
    let _running = InProcess::start(&db, &settings).await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    assert_delivered_all(&stub.received(), &expected_full(&db.pool).await);
    assert_books_balance(&db.pool).await;
}
