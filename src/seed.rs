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

/// Empties the source tables loansync reads (never the ETL tables).
pub async fn reset_source(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::raw_sql(
        "TRUNCATE loans_ajoloanrepayment, loans_ajoloanschedule, loans_ajoloan, loans_loanguarantor, \
         loans_loaneligibility, ajo_ajouser, accounts_customuser RESTART IDENTITY CASCADE",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Fills the source tables. They must be empty (see [`reset_source`]).
pub async fn seed(pool: &PgPool, spec: SeedSpec) -> anyhow::Result<SeedReport> {
    let started = std::time::Instant::now();
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts_customuser")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        existing == 0,
        "accounts_customuser already holds {existing} rows: seed an empty database (use --reset)"
    );
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
