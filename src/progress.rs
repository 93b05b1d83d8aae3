//! Progress of a running sync for people: a bar per entity on a terminal, a plain line
//! every few seconds otherwise (logs, CI, cron).

use crate::ledger;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Watches `sync_id` until `done` resolves, then draws the final state once more.
pub async fn watch(pool: PgPool, sync_id: String, done: tokio::sync::watch::Receiver<bool>) {
    if std::io::stderr().is_terminal() {
        bars(pool, sync_id, done).await
    } else {
        lines(pool, sync_id, done).await
    }
}

async fn bars(pool: PgPool, sync_id: String, mut done: tokio::sync::watch::Receiver<bool>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{bar:40}] {pos:>8}/{len:<8} {elapsed:>5} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars = Vec::new();
    loop {
        if let Ok(progress) = ledger::reads::entity_progress(&pool, &sync_id).await {
            if bars.is_empty() {
                for p in &progress {
                    let b = multi.add(ProgressBar::new(p.total.max(0) as u64));
                    b.set_style(style.clone());
                    b.set_prefix(p.entity.as_str());
                    bars.push(b);
                }
            }
            for (b, p) in bars.iter().zip(&progress) {
                b.set_length(p.total.max(0) as u64);
                b.set_position((p.success + p.failed).max(0) as u64);
                if p.failed > 0 {
                    b.set_message(format!("{} failed", p.failed));
                }
            }
        }
        if *done.borrow() {
            break;
        }
        tokio::select! {
            _ = done.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    for b in bars {
        b.finish();
    }
}

async fn lines(pool: PgPool, sync_id: String, mut done: tokio::sync::watch::Receiver<bool>) {
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = done.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if let Ok(progress) = ledger::reads::entity_progress(&pool, &sync_id).await {
            let parts: Vec<String> = progress
                .iter()
                .map(|p| format!("{} {}/{}", p.entity.plural(), p.success + p.failed, p.total))
                .collect();
            eprintln!(
                "sync {sync_id}: {} ({:.0}s)",
                parts.join(", "),
                started.elapsed().as_secs_f64()
            );
        }
    }
}
