//! Secrets and personal identifiers: a full run through real planner and worker processes
//! with debug logging never prints the API key, the database password or a never-send
//! value, and no payload carries a never-send key.

use crate::harness::{assert_delivered_all, expected_full, seeded_db, small, wait_syncs_finished};
use crate::support::amqp_url;
use loansync::queue::amqp::Broker;
use loansync::stub_api::{self, Faults, StubConfig};
use std::process::Stdio;
use std::time::Duration;

const API_KEY: &str = "k3y-Sh0uld-N3ver-Be-Pr1nted";
const DB_PASSWORD: &str = "pw-Sh0uld-N3ver-Be-Pr1nted";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_or_never_send_value_reaches_a_log_line_or_a_payload() {
    let db = seeded_db(small()).await;
    let stub = stub_api::spawn(
        StubConfig {
            api_key: API_KEY.into(),
            faults: Faults::default(),
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    // Trust authentication ignores the password, so it can be anything, and must not show.
    let db_url = db
        .url
        .replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1);
    let prefix = db.queue_prefix();
    let spawn = |cmd: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"))
            .args(cmd.split(' '))
            .env("DATABASE_URL", &db_url)
            .env("AMQP_URL", amqp_url())
            .env("ETL_QUEUE_PREFIX", &prefix)
            .env("ANALYTICS_API_URL", stub.url())
            .env("ANALYTICS_API_KEY", API_KEY)
            .env("RUST_LOG", "debug")
            .env("LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("loansync process")
    };
    // Debug logging fills a pipe quickly: drain each process's output while it runs.
    let drain = |child: &mut tokio::process::Child| {
        use tokio::io::AsyncReadExt;
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let _ = tokio::join!(out.read_to_end(&mut a), err.read_to_end(&mut b));
            a.extend(b);
            String::from_utf8_lossy(&a).into_owned()
        })
    };
    let mut planner = spawn("planner");
    let mut worker = spawn("worker");
    let readers = [drain(&mut planner), drain(&mut worker)];
    let trigger = spawn("trigger --full").wait_with_output().await.unwrap();
    assert!(trigger.status.success());
    wait_syncs_finished(&db.pool, 1).await;
    let mut logs = String::from_utf8_lossy(&trigger.stdout).into_owned();
    logs += &String::from_utf8_lossy(&trigger.stderr);
    for mut child in [planner, worker] {
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("exits on SIGTERM")
            .unwrap();
        assert!(status.success());
    }
    for r in readers {
        logs += &r.await.unwrap();
    }
    assert!(
        logs.lines().count() > 20,
        "suspiciously few log lines: {logs}"
    );
    assert!(logs.contains("sync_id"), "chunk lines carry their sync id");

    // Values that exist in the database only in never-send columns.
    let secrets: Vec<String> = sqlx::query_scalar(
        "SELECT v FROM ( \
           (SELECT bvn AS v FROM ajo_ajouser WHERE bvn IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT nin FROM ajo_ajouser WHERE nin IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT lite_transaction_pin FROM ajo_ajouser WHERE lite_transaction_pin IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT image FROM ajo_ajouser WHERE image IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT password FROM accounts_customuser LIMIT 3) UNION ALL \
           (SELECT user_password FROM accounts_customuser WHERE user_password IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT bvn_number FROM accounts_customuser WHERE bvn_number IS NOT NULL LIMIT 3) UNION ALL \
           (SELECT repayment_meta_response FROM loans_ajoloanrepayment WHERE repayment_meta_response IS NOT NULL LIMIT 3) \
         ) s",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(secrets.len() >= 20, "the seed lacks never-send values");
    for needle in secrets
        .iter()
        .map(String::as_str)
        .chain([API_KEY, DB_PASSWORD])
    {
        assert!(!logs.contains(needle), "a log line carries {needle:?}");
    }
    // Payloads: the stub refuses (and counts) any record carrying a never-send key; none
    // did, and everything arrived.
    let received = stub.received();
    assert_eq!(received.forbidden, 0);
    let expected = expected_full(&db.pool).await;
    assert_delivered_all(&received, &expected);
    let admin = Broker::connect(&amqp_url(), &prefix, 7).await.unwrap();
    admin.delete_topology().await.unwrap();
    admin.close().await;
}
