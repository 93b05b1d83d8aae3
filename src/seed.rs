//! `loansync seed`: deterministic synthetic data in the Django source tables, generated
//! set-based inside PostgreSQL (one `INSERT … SELECT generate_series` per table), so a
//! million rows take seconds.
//!
//! Every value derives from the row number and the seed through `hashint8`, so the same
//! seed gives the same data. The mix covers every `user_type` and both `account_type`s,
//! onboarded and not, disbursed and not, every loan status, 4–30 schedule rows per
//! disbursed loan, every repayment type, timestamps spread over 60 days, some NULLs, a
//! few non-finite floats are *not* generated (PostgreSQL stores them, but they are a
//! transform concern tested separately), and some unicode names.

use sqlx::PgPool;

/// How many rows of each kind to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SeedSpec {
    /// Rows of `accounts_customuser` (about 80% of them agents of some kind).
    pub users: i64,
    pub customers: i64,
    pub loans: i64,
    pub repayments: i64,
    pub seed: i64,
}

impl SeedSpec {
    /// Scale 1 is 20 users, 1,000 customers, 2,000 loans, 10,000 repayments; scale 100
    /// is the benchmark's dataset M (2k / 100k / 200k / 1M).
    pub fn scale(scale: f64, seed: i64) -> SeedSpec {
        let n = |base: f64| ((base * scale).round() as i64).max(1);
        SeedSpec {
            users: n(20.0),
            customers: n(1000.0),
            loans: n(2000.0),
            repayments: n(10000.0),
            seed,
        }
    }
}

/// What was created.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SeedReport {
    pub users: i64,
    pub customers: i64,
    pub loans: i64,
    pub schedules: i64,
    pub repayments: i64,
    pub seconds: f64,
}

const SEED_SQL: &str = include_str!("seed.sql");

/// Every table [`reset_source`] empties: the source tables the seed fills and those that
/// reference them. Never the ETL tables.
pub const SOURCE_TABLES: &[&str] = &[
    "loans_ajoloanrepayment",
    "loans_ajoloanschedule",
    "loans_ajoloan",
    "loans_loanguarantor",
    "loans_loaneligibility",
    "ajo_ajouser",
    "accounts_customuser_groups",
    "accounts_customuser_user_permissions",
    "accounts_customuser",
];

/// Written by [`seed`] in the transaction that fills the tables: per table, how many rows
/// it wrote and the largest id. A table holding more rows, or an id above that, holds
/// rows the seed did not write.
pub const MARKER_TABLE: &str = "loansync_seed_marker";

/// Empties the source tables loansync reads (never the ETL tables), but only in a
/// database that holds nothing but what [`seed`] wrote (or nothing at all), unless
/// `confirm_database` names the database, as `current_database()` spells it. A real
/// database is never emptied by mistake: the check and the `TRUNCATE` happen under one
/// lock, and no table outside [`SOURCE_TABLES`] is touched (no `CASCADE`).
pub async fn reset_source(pool: &PgPool, confirm_database: Option<&str>) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let current: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *tx)
        .await?;
    if let Some(name) = confirm_database
        && name != current
    {
        anyhow::bail!(
            "--confirm-database {name:?} does not name the database DATABASE_URL points at \
             ({current:?}); nothing was emptied"
        );
    }
    let tables = SOURCE_TABLES.join(", ");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *tx)
    .await?;
    if confirm_database.is_none()
        && let Some((table, rows)) = unseeded_rows(&mut tx).await?
    {
        anyhow::bail!(
            "refusing to empty database {current:?}: {table} holds {rows} row(s) that \
             `loansync seed` did not write, so this may be real data. Nothing was emptied. If the \
             database really is disposable, run again with --confirm-database {current}"
        );
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {tables} RESTART IDENTITY; DROP TABLE IF EXISTS {MARKER_TABLE}"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The first table holding rows the seed did not write, and how many at least.
async fn unseeded_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
) -> anyhow::Result<Option<(&'static str, i64)>> {
    let marked: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(MARKER_TABLE)
        .fetch_one(&mut **tx)
        .await?;
    for &table in SOURCE_TABLES {
        let (rows, max_id): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), coalesce(max(id), 0)::bigint FROM {table}"
        )))
        .fetch_one(&mut **tx)
        .await?;
        let (seeded_rows, seeded_max): (i64, i64) = if marked {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT coalesce(max(seeded_rows), 0), coalesce(max(max_id), 0) \
                 FROM {MARKER_TABLE} WHERE table_name = $1"
            )))
            .bind(table)
            .fetch_one(&mut **tx)
            .await?
        } else {
            (0, 0)
        };
        if rows > seeded_rows || max_id > seeded_max {
            let beyond: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table} WHERE id > $1"
            )))
            .bind(seeded_max)
            .fetch_one(&mut **tx)
            .await?;
            return Ok(Some((table, beyond.max(rows - seeded_rows))));
        }
    }
    Ok(None)
}

/// Fills the source tables, which must all be empty (see [`reset_source`]), and records
/// what it wrote in [`MARKER_TABLE`], in the same transaction.
pub async fn seed(pool: &PgPool, spec: SeedSpec) -> anyhow::Result<SeedReport> {
    let started = std::time::Instant::now();
    for table in SOURCE_TABLES {
        let existing: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await?;
        anyhow::ensure!(
            existing == 0,
            "{table} already holds {existing} rows: seed an empty database (use --reset)"
        );
    }
    let mut tx = pool.begin().await?;
    // Parameters reach the script as settings read with current_setting().
    for (k, v) in [
        ("loansync.seed", spec.seed),
        ("loansync.users", spec.users),
        ("loansync.customers", spec.customers),
        ("loansync.loans", spec.loans),
        ("loansync.repayments", spec.repayments),
    ] {
        sqlx::query("SELECT set_config($1, $2, true)")
            .bind(k)
            .bind(v.to_string())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::raw_sql(SEED_SQL).execute(&mut *tx).await?;
    let marks = SOURCE_TABLES
        .iter()
        .map(|t| format!("SELECT '{t}', count(*), coalesce(max(id), 0)::bigint FROM {t}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {MARKER_TABLE} (
             table_name text PRIMARY KEY,
             seeded_rows bigint NOT NULL,
             max_id bigint NOT NULL,
             seeded_at timestamptz NOT NULL DEFAULT now()
         );
         COMMENT ON TABLE {MARKER_TABLE} IS 'Written by loansync seed: the rows it wrote. loansync seed --reset empties only a database holding nothing else.';
         DELETE FROM {MARKER_TABLE};
         INSERT INTO {MARKER_TABLE} (table_name, seeded_rows, max_id) {marks};"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    sqlx::raw_sql(
        "ANALYZE accounts_customuser, ajo_ajouser, loans_ajoloan, loans_ajoloanschedule, loans_ajoloanrepayment",
    )
    .execute(pool)
    .await?;
    let count = |t: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {t}")))
            .fetch_one(pool)
            .await
    };
    Ok(SeedReport {
        users: count("accounts_customuser").await?,
        customers: count("ajo_ajouser").await?,
        loans: count("loans_ajoloan").await?,
        schedules: count("loans_ajoloanschedule").await?,
        repayments: count("loans_ajoloanrepayment").await?,
        seconds: started.elapsed().as_secs_f64(),
    })
}
