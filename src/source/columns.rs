//! Every source column loansync reads, in one table ([`SOURCE_COLUMNS`]): the table, the
//! column and the type PostgreSQL reports for it (`information_schema.columns.udt_name`),
//! derived from what the statements of `sql/` select, join, filter and aggregate. The
//! never-send columns customers' `has_bvn` / `has_nin` are computed from are in it too:
//! the statements read them, even though their values never leave the database.
//!
//! [`drift`] compares the table with the database in one query: a table or column gone
//! or renamed, or a type changed, is found before the first row is read (by `loansync
//! check` and by the planner before it plans), instead of failing every record of a sync
//! one by one. The integration tests (`tests/it/drift.rs`) keep the table honest: every
//! statement of the source still prepares once every column not in the table is dropped,
//! and each column in it is read by some statement.

use sqlx::PgConnection;

/// One column a statement of `sql/` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceColumn {
    pub table: &'static str,
    pub column: &'static str,
    /// The `udt_name` the statements are written for; `a|b` when either does (an id cast
    /// to `int8` in the statement reads the same from `int4` and `int8`).
    pub udt: &'static str,
}

impl SourceColumn {
    /// Whether a column of type `found` can be read as the statements read this one.
    pub fn accepts(&self, found: &str) -> bool {
        self.udt.split('|').any(|t| t == found)
    }
}

const fn c(table: &'static str, column: &'static str, udt: &'static str) -> SourceColumn {
    SourceColumn { table, column, udt }
}

const OFFICERS: &str = "accounts_customuser";
const CUSTOMERS: &str = "ajo_ajouser";
const LOANS: &str = "loans_ajoloan";
const REPAYMENTS: &str = "loans_ajoloanrepayment";
const SCHEDULES: &str = "loans_ajoloanschedule";

/// An id or foreign key the statements cast to `int8`.
const ID: &str = "int4|int8";

/// Every source column the statements of `sql/` read (`ids_*.sql`, `rows_*.sql`, and
/// through them the chunk loader, the sweep and the planner's id span), table by table.
pub const SOURCE_COLUMNS: &[SourceColumn] = &[
    // rows_officer.sql, ids_officer.sql; rows_loan.sql joins the loan's agent.
    c(OFFICERS, "id", ID),
    c(OFFICERS, "email", "varchar"),
    c(OFFICERS, "username", "varchar"),
    c(OFFICERS, "customer_user_id", "int8"),
    c(OFFICERS, "user_type", "varchar"),
    c(OFFICERS, "account_type", "varchar"),
    c(OFFICERS, "user_phone", "varchar"),
    c(OFFICERS, "user_branch", "varchar"),
    c(OFFICERS, "kyc_level", "int2|int4"),
    c(OFFICERS, "performance_status", "varchar"),
    c(OFFICERS, "referral_code", "varchar"),
    c(OFFICERS, "referrals_count", "int4"),
    c(OFFICERS, "call_agent_id", "int4"),
    c(OFFICERS, "is_call_agent", "bool"),
    c(OFFICERS, "is_call_agent_admin", "bool"),
    c(OFFICERS, "is_ajo_admin", "bool"),
    c(OFFICERS, "bucket", "jsonb"),
    c(OFFICERS, "bucket_designation", "varchar"),
    c(OFFICERS, "pnd", "bool"),
    c(OFFICERS, "address", "varchar"),
    c(OFFICERS, "date_joined", "timestamptz"),
    c(OFFICERS, "last_login", "timestamptz"),
    // rows_customer.sql, ids_customer_*.sql; rows_officer.sql counts customers by
    // user_id, rows_loan.sql joins the borrower.
    c(CUSTOMERS, "id", ID),
    c(CUSTOMERS, "phone_number", "varchar"),
    c(CUSTOMERS, "first_name", "varchar"),
    c(CUSTOMERS, "last_name", "varchar"),
    c(CUSTOMERS, "alias", "varchar"),
    c(CUSTOMERS, "alt_phone", "varchar"),
    c(CUSTOMERS, "gender", "varchar"),
    c(CUSTOMERS, "marital_status", "varchar"),
    c(CUSTOMERS, "dob", "date"),
    c(CUSTOMERS, "state", "varchar"),
    c(CUSTOMERS, "lga", "varchar"),
    c(CUSTOMERS, "address", "varchar"),
    c(CUSTOMERS, "bus_stop", "varchar"),
    c(CUSTOMERS, "landmark", "varchar"),
    c(CUSTOMERS, "trade", "varchar"),
    c(CUSTOMERS, "trade_location", "varchar"),
    c(CUSTOMERS, "bvn", "varchar"),
    c(CUSTOMERS, "nin", "varchar"),
    c(CUSTOMERS, "longitude", "float8"),
    c(CUSTOMERS, "latitude", "float8"),
    c(CUSTOMERS, "location_state", "varchar"),
    c(CUSTOMERS, "location_city", "varchar"),
    c(CUSTOMERS, "location_country", "varchar"),
    c(CUSTOMERS, "location_address", "varchar"),
    c(CUSTOMERS, "onboarding_verified", "bool"),
    c(CUSTOMERS, "bvn_verified", "bool"),
    c(CUSTOMERS, "onboarding_complete", "bool"),
    c(CUSTOMERS, "onboarding_stage", "varchar"),
    c(CUSTOMERS, "total_money_saved", "float8"),
    c(CUSTOMERS, "total_money_withdrawn", "float8"),
    c(CUSTOMERS, "total_withdrawals", "int4"),
    c(CUSTOMERS, "loandisk_borrower_id", "varchar"),
    c(CUSTOMERS, "branch_name", "varchar"),
    c(CUSTOMERS, "age", "int4"),
    c(CUSTOMERS, "provider", "varchar"),
    c(CUSTOMERS, "date_created", "timestamptz"),
    c(CUSTOMERS, "date_modified", "timestamptz"),
    c(CUSTOMERS, "lite_user_id", ID),
    c(CUSTOMERS, "user_id", ID),
    // rows_loan.sql, ids_loan_*.sql.
    c(LOANS, "id", ID),
    c(LOANS, "agent_id", ID),
    c(LOANS, "borrower_id", ID),
    c(LOANS, "eligibility_id", ID),
    c(LOANS, "guarantor_id", ID),
    c(LOANS, "borrower_full_name", "varchar"),
    c(LOANS, "borrower_phone_number", "varchar"),
    c(LOANS, "guarantor_full_name", "varchar"),
    c(LOANS, "guarantor_phone_number", "varchar"),
    c(LOANS, "amount", "float8"),
    c(LOANS, "amount_disbursed", "float8"),
    c(LOANS, "amount_saved", "float8"),
    c(LOANS, "bnpl_amount", "float8"),
    c(LOANS, "loan_type", "varchar"),
    c(LOANS, "application_type", "varchar"),
    c(LOANS, "status", "varchar"),
    c(LOANS, "performance_status", "varchar"),
    c(LOANS, "loan_behavior", "varchar"),
    c(LOANS, "total_paid_amount", "float8"),
    c(LOANS, "total_outstanding_balance", "float8"),
    c(LOANS, "last_paid_amount", "float8"),
    c(LOANS, "interest_rate", "float8"),
    c(LOANS, "interest_amount", "float8"),
    c(LOANS, "processing_fee", "float8"),
    c(LOANS, "nem_fee", "float8"),
    c(LOANS, "repayment_amount", "float8"),
    c(LOANS, "principal_repayment", "float8"),
    c(LOANS, "expected_repayment_count", "int4"),
    c(LOANS, "count_of_recorded_repayments", "int4"),
    c(LOANS, "daily_repayment_amount", "float8"),
    c(LOANS, "principal_daily_repayment", "float8"),
    c(LOANS, "is_disbursed", "bool"),
    c(LOANS, "date_disbursed", "timestamptz"),
    c(LOANS, "start_date", "date"),
    c(LOANS, "end_date", "date"),
    c(LOANS, "expected_end_date", "date"),
    c(LOANS, "actual_end_date", "date"),
    c(LOANS, "date_completed", "timestamptz"),
    c(LOANS, "tenor", "varchar"),
    c(LOANS, "tenor_in_days", "int4"),
    c(LOANS, "repayment_type", "varchar"),
    c(LOANS, "loandisk_loan_id", "varchar"),
    c(LOANS, "unique_loan_ref", "varchar"),
    c(LOANS, "loan_ref", "varchar"),
    c(LOANS, "escrow_amount", "float8"),
    c(LOANS, "escrow_settled", "bool"),
    c(LOANS, "date_created", "timestamptz"),
    c(LOANS, "date_modified", "timestamptz"),
    // rows_repayment.sql, ids_repayment_*.sql; rows_loan.sql's repayment aggregate and
    // ids_loan_incremental.sql.
    c(REPAYMENTS, "id", ID),
    c(REPAYMENTS, "agent_id", ID),
    c(REPAYMENTS, "borrower_id", ID),
    c(REPAYMENTS, "ajo_loan_id", ID),
    c(REPAYMENTS, "repayment_type", "varchar"),
    c(REPAYMENTS, "loan_amount", "float8"),
    c(REPAYMENTS, "repayment_amount", "float8"),
    c(REPAYMENTS, "health_insurance", "float8"),
    c(REPAYMENTS, "paid_date", "timestamptz"),
    c(REPAYMENTS, "repayment_ref", "uuid"),
    c(REPAYMENTS, "settlement_status", "bool"),
    c(REPAYMENTS, "ledger_amount", "float8"),
    c(REPAYMENTS, "comment", "varchar"),
    c(REPAYMENTS, "borrower_notified", "bool"),
    c(REPAYMENTS, "marked_as", "varchar"),
    c(REPAYMENTS, "expected_recovery_amt", "float8"),
    c(REPAYMENTS, "applied_to_loan", "bool"),
    c(REPAYMENTS, "date_created", "timestamptz"),
    c(REPAYMENTS, "date_modified", "timestamptz"),
    // rows_loan.sql's schedule aggregate, ids_loan_incremental.sql.
    c(SCHEDULES, "id", ID),
    c(SCHEDULES, "loan_id", ID),
    c(SCHEDULES, "fully_paid", "bool"),
    c(SCHEDULES, "is_late", "bool"),
    c(SCHEDULES, "late_days", "int4"),
    c(SCHEDULES, "due_amount", "float8"),
    c(SCHEDULES, "paid_amount", "float8"),
    c(SCHEDULES, "amount_left", "float8"),
    c(SCHEDULES, "due_date", "date"),
    c(SCHEDULES, "date_modified", "timestamptz"),
];

/// One way the database differs from [`SOURCE_COLUMNS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The table does not exist (or this role cannot see it).
    MissingTable { table: String },
    /// The table exists without the column (dropped or renamed).
    MissingColumn {
        table: String,
        column: String,
        expected: String,
    },
    /// The column's type is not one the statements read it as.
    ChangedType {
        table: String,
        column: String,
        expected: String,
        found: String,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::MissingTable { table } => write!(f, "table {table} is missing"),
            Drift::MissingColumn {
                table,
                column,
                expected,
            } => write!(f, "{table}.{column} is missing (expected {expected})"),
            Drift::ChangedType {
                table,
                column,
                expected,
                found,
            } => write!(
                f,
                "{table}.{column} changed type: expected {expected}, found {found}"
            ),
        }
    }
}

/// The one query of [`drift`]: each column of the table with the type
/// `information_schema.columns` reports for it (NULL when it has none) and whether its
/// table resolves, as the statements' unqualified names do (`to_regclass`, the
/// `search_path`).
const DRIFT_SQL: &str = "\
SELECT e.tbl, e.col, c.udt_name::text, r.oid IS NOT NULL \
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS e(tbl, col, n) \
CROSS JOIN LATERAL (SELECT to_regclass(quote_ident(e.tbl)) AS oid) r \
LEFT JOIN pg_class k ON k.oid = r.oid \
LEFT JOIN pg_namespace s ON s.oid = k.relnamespace \
LEFT JOIN information_schema.columns c \
  ON c.table_schema = s.nspname AND c.table_name = e.tbl AND c.column_name = e.col \
ORDER BY e.n";

/// How the database differs from [`SOURCE_COLUMNS`], in the table's order, a missing
/// table once: empty when every column is there with a type the statements read. One
/// query.
pub async fn drift(conn: &mut PgConnection) -> Result<Vec<Drift>, sqlx::Error> {
    let tables: Vec<&str> = SOURCE_COLUMNS.iter().map(|c| c.table).collect();
    let columns: Vec<&str> = SOURCE_COLUMNS.iter().map(|c| c.column).collect();
    let found: Vec<(String, String, Option<String>, bool)> = sqlx::query_as(DRIFT_SQL)
        .bind(&tables)
        .bind(&columns)
        .fetch_all(conn)
        .await?;
    let mut out = Vec::new();
    for (expected, (table, column, udt, table_exists)) in SOURCE_COLUMNS.iter().zip(found) {
        debug_assert_eq!((expected.table, expected.column), (&*table, &*column));
        match udt {
            _ if !table_exists => {
                let missing = Drift::MissingTable { table };
                if !out.contains(&missing) {
                    out.push(missing);
                }
            }
            None => out.push(Drift::MissingColumn {
                table,
                column,
                expected: expected.udt.to_string(),
            }),
            Some(found) if !expected.accepts(&found) => out.push(Drift::ChangedType {
                table,
                column,
                expected: expected.udt.to_string(),
                found,
            }),
            Some(_) => {}
        }
    }
    Ok(out)
}

/// The message of a schema that drifted: what differs, and what it means.
pub fn drift_message(drifts: &[Drift]) -> String {
    let list: Vec<String> = drifts.iter().map(Drift::to_string).collect();
    format!(
        "source schema drift: {}; loansync reads these columns as listed in \
         src/source/columns.rs: a release that reads the new schema is needed, nothing is synced until then",
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_columns_are_listed_once_with_a_known_type() {
        let mut seen = std::collections::HashSet::new();
        for col in SOURCE_COLUMNS {
            assert!(seen.insert((col.table, col.column)), "{col:?} twice");
            for t in col.udt.split('|') {
                assert!(
                    [
                        "int2",
                        "int4",
                        "int8",
                        "varchar",
                        "text",
                        "bool",
                        "float8",
                        "date",
                        "timestamptz",
                        "uuid",
                        "jsonb"
                    ]
                    .contains(&t),
                    "{col:?}"
                );
            }
        }
        assert!(ID.split('|').all(|t| c("t", "id", ID).accepts(t)));
        assert!(!c("t", "amount", "float8").accepts("numeric"));
    }

    #[test]
    fn drift_is_said_naming_the_column_and_what_changed() {
        let m = drift_message(&[
            Drift::ChangedType {
                table: LOANS.into(),
                column: "amount".into(),
                expected: "float8".into(),
                found: "numeric".into(),
            },
            Drift::MissingColumn {
                table: CUSTOMERS.into(),
                column: "date_modified".into(),
                expected: "timestamptz".into(),
            },
            Drift::MissingTable {
                table: SCHEDULES.into(),
            },
        ]);
        assert!(
            m.contains("loans_ajoloan.amount changed type: expected float8, found numeric"),
            "{m}"
        );
        assert!(
            m.contains("ajo_ajouser.date_modified is missing (expected timestamptz)"),
            "{m}"
        );
        assert!(m.contains("table loans_ajoloanschedule is missing"), "{m}");
    }
}
