//! Command-line conventions (issue 11): every setting in `--help`, shell completions,
//! `--json` outcomes, and exit codes that a script can tell apart.

use crate::harness::{loansync_process, seeded_db, settings_for, small, stub};
use loansync::stub_api::Faults;

#[tokio::test]
async fn help_lists_every_setting_and_completions_are_generated() {
    let bin = env!("CARGO_BIN_EXE_loansync");
    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for v in loansync::config::env::ENV_VARS {
        assert!(text.contains(v.name), "--help does not show {}", v.name);
    }
    assert!(text.contains("ETL_BATCH_SIZE_LOANS") && text.contains("[default: 100, 1..=10000]"));
    let bash = std::process::Command::new(bin)
        .args(["completions", "bash"])
        .env("ETL_BATCH_SIZE_LOANS", "not a number") // completions need no settings
        .output()
        .unwrap();
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_loansync") && script.contains("watermark"));
    // A usage error is clap's 2, distinct from every sync outcome (10 and up).
    let usage = std::process::Command::new(bin)
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_json_reports_the_outcome_for_scripts() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults {
        reject_every_nth: 5,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let out = loansync_process(&db, &settings, &stub.url())
        .args(["sync", "--full", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(loansync::app::EXIT_PARTIAL)),
        "{out:?}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "partial_success");
    let failed: i64 = summary["progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["failed"].as_i64().unwrap())
        .sum();
    assert!(failed > 0, "{summary}");
}
