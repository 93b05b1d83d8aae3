//! The one mapping from an entity to its counter columns in `etl_folder_etlsynchistory`
//! (Django's `total_loans`, `loans_success`, `loans_failed`, ...). The plan's totals and
//! the finalizer build the names from here; the statements that name them by hand are
//! `roll_up_counters.sql` (a `FILTER` per entity), `insert_history.sql` (every column
//! zero), `last_sync_per_type.sql` (the sums), checked against this mapping by a unit
//! test, and `reads::entity_progress` (a column each, in one statement).

use crate::domain::EntityKind;

/// One entity's counter columns in the history table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryColumns {
    /// Records planned: `total_<plural>`.
    pub total: &'static str,
    /// Records delivered: `<plural>_success`.
    pub success: &'static str,
    /// Records failed: `<plural>_failed`.
    pub failed: &'static str,
}

impl EntityKind {
    /// This entity's counter columns in `etl_folder_etlsynchistory`.
    pub fn history_columns(self) -> HistoryColumns {
        match self {
            EntityKind::Loan => HistoryColumns {
                total: "total_loans",
                success: "loans_success",
                failed: "loans_failed",
            },
            EntityKind::Repayment => HistoryColumns {
                total: "total_repayments",
                success: "repayments_success",
                failed: "repayments_failed",
            },
            EntityKind::Customer => HistoryColumns {
                total: "total_customers",
                success: "customers_success",
                failed: "customers_failed",
            },
            EntityKind::Officer => HistoryColumns {
                total: "total_officers",
                success: "officers_success",
                failed: "officers_failed",
            },
        }
    }
}

/// `a + b + c + d` over one counter column of every entity, e.g. the records that
/// succeeded in a sync: `sum_of(|c| c.success)`.
pub fn sum_of(column: fn(HistoryColumns) -> &'static str) -> String {
    EntityKind::ALL
        .iter()
        .map(|e| column(e.history_columns()))
        .collect::<Vec<_>>()
        .join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_columns_are_the_plural_and_the_sql_files_name_the_same() {
        let migration = include_str!("../../migrations/20261125000001_etl_tracking_tables.sql");
        for e in EntityKind::ALL {
            let c = e.history_columns();
            let p = e.plural();
            assert_eq!(c.total, format!("total_{p}"));
            assert_eq!(c.success, format!("{p}_success"));
            assert_eq!(c.failed, format!("{p}_failed"));
            for column in [c.total, c.success, c.failed] {
                assert!(migration.contains(column), "{column} in the migration");
                assert!(
                    super::super::sql::INSERT_HISTORY.contains(column),
                    "{column} in insert_history.sql"
                );
            }
            for column in [c.success, c.failed] {
                let set = format!("{column} = c.{column}");
                assert!(
                    super::super::sql::ROLL_UP_COUNTERS
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .contains(&set),
                    "roll_up_counters.sql: {set}"
                );
                let sum = if column == c.success {
                    "succeeded"
                } else {
                    "failed"
                };
                let filter =
                    format!("sum({sum}) FILTER (WHERE entity = '{e}'), 0)::int4 AS {column}");
                assert!(
                    super::super::sql::ROLL_UP_COUNTERS
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .contains(&filter),
                    "roll_up_counters.sql: {filter}"
                );
                assert!(super::super::sql::LAST_SYNC_PER_TYPE.contains(&format!("h.{column}")));
            }
        }
        assert_eq!(
            sum_of(|c| c.failed),
            "officers_failed + customers_failed + loans_failed + repayments_failed"
        );
    }
}
