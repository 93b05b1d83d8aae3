//! `loansync deletes list`: the records sweeps found deleted from the source (or no
//! longer selected), which are not sent: the analytics API has no delete.

use super::error::AppError;
use super::report::Report;
use crate::domain::EntityKind;
use crate::ledger::{self, reads::DeletedRow};
use serde::Serialize;
use sqlx::PgPool;

/// The deleted records, by entity and id.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct DeletesReport {
    pub rows: Vec<DeletedRow>,
}

/// The deleted records of `entity` (all when `None`), at most `limit`.
pub async fn list(
    pool: &PgPool,
    entity: Option<EntityKind>,
    limit: i64,
) -> Result<DeletesReport, AppError> {
    Ok(DeletesReport {
        rows: ledger::reads::list_deleted(pool, entity, limit).await?,
    })
}

/// As JSON, an array of `{entity, id, detected_at, sync_id}`; as text, a table.
impl Report for DeletesReport {
    /// With `json`, the JSON; otherwise the table on stdout and how many rows it holds on
    /// stderr, so that the table stays a table for scripts.
    fn print(&self, json: bool) -> Result<(), AppError> {
        if json {
            println!("{}", self.json()?);
        } else {
            print!("{}", self.render());
            eprintln!(
                "{} deleted record(s) listed; not sent: the analytics API has no delete",
                self.rows.len()
            );
        }
        Ok(())
    }

    fn exit_code(&self) -> u8 {
        0
    }

    fn render(&self) -> String {
        let mut out = format!("{:<10} {:>12}  {:<25}  sync\n", "entity", "id", "detected");
        for r in &self.rows {
            out.push_str(&format!(
                "{:<10} {:>12}  {:<25}  {}\n",
                r.entity,
                r.id,
                r.detected_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                r.sync_id
            ));
        }
        out
    }
}
