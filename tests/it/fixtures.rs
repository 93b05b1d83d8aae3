//! Source rows for tests, one at a time, deterministic.
//!
//! Every helper inserts one row naming EVERY NOT NULL column (Django sets no database
//! defaults) and returns its id. Ids come from the tables' own identity sequences, so in
//! a fresh [`crate::support::TestDb`] they are 1, 2, 3, ... in insertion order; unique
//! columns (emails, phone numbers, NINs) are derived from the id.
//!
//! * Times: every `date_created` / `date_modified` / `date_joined` / `paid_date` is
//!   [`fixture_time`] (2026-01-01T00:00:00Z). An incremental sync only sees a row once its
//!   time is moved into the window: call [`set_modified`].
//! * Secrets: every never-send column (`pin`, `bvn`, `password`, `sms_body`, ...) holds a
//!   value containing [`SECRET`], so a test can assert that no record contains it.
//! * Customers get `bvn` and `nin` set (so `has_bvn` / `has_nin` are true) and the
//!   names "Adébáyọ̀" / "Ọlátúnjí".
#![allow(dead_code)]

use chrono::{DateTime, NaiveDate, Utc};
use loansync::domain::EntityKind;
use sqlx::PgPool;

/// Marker inside the value of every never-send column the fixtures fill.
pub const SECRET: &str = "SECRET";

/// The time every fixture row is created and last modified at: 2026-01-01T00:00:00Z.
pub fn fixture_time() -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse().expect("a valid timestamp")
}

/// An `accounts_customuser` row with this `user_type` (e.g. `"AGENT"`, `"MERCHANT"`) and
/// `account_type` (`"REGULAR"` or `"KEY_ACCOUNT"`). Email `officer<id>@example.com`,
/// branch `Branch <id>`, joined at [`fixture_time`].
pub async fn insert_officer(pool: &PgPool, user_type: &str, account_type: &str) -> i64 {
    sqlx::query_scalar(
        "WITH n AS (SELECT nextval(pg_get_serial_sequence('accounts_customuser', 'id')) AS id)
         INSERT INTO accounts_customuser (
             id, password, last_login, is_superuser, first_name, last_name, is_staff, is_active,
             email, username, customer_user_id, user_password, user_type, account_type,
             user_phone, user_branch, bvn_number, kyc_level, performance_status, referral_code,
             referrals_count, call_agent_id, is_call_agent, is_call_agent_admin, is_ajo_admin,
             bucket, bucket_designation, pnd, address, date_joined)
         SELECT n.id, 'SECRET-password-' || n.id, NULL, false, 'Ngozi', 'Okafor', false, true,
             'officer' || n.id || '@example.com', 'officer' || n.id, NULL,
             'SECRET-user_password-' || n.id, $1, $2,
             '+234803' || lpad(n.id::text, 7, '0'), 'Branch ' || n.id,
             'SECRET-bvn_number-' || n.id, 1, NULL, 'REF' || n.id,
             0, NULL, false, false, false,
             '[\"A\"]'::jsonb, NULL, false, n.id || ' Allen Avenue', $3
         FROM n
         RETURNING id::int8",
    )
    .bind(user_type)
    .bind(account_type)
    .bind(fixture_time())
    .fetch_one(pool)
    .await
    .expect("insert officer")
}

/// An `ajo_ajouser` row managed by `agent_id` (its `user_id`), with
/// `onboarding_complete = onboarded`. Phone `+234806<id padded to 7>`, branch `Ikeja`,
/// BVN and NIN set, created and modified at [`fixture_time`].
pub async fn insert_customer(pool: &PgPool, agent_id: Option<i64>, onboarded: bool) -> i64 {
    sqlx::query_scalar(
        "WITH n AS (SELECT nextval(pg_get_serial_sequence('ajo_ajouser', 'id')) AS id)
         INSERT INTO ajo_ajouser (
             id, phone_number, pin, lite_transaction_pin, first_name, last_name, alias,
             alt_phone, gender, marital_status, dob, state, lga, address, bus_stop, landmark,
             trade, trade_location, bvn, nin, image, longitude, latitude, location_state,
             location_city, location_country, location_address, onboarding_verified,
             bvn_verified, onboarding_complete, onboarding_stage, card_issued, need_card,
             total_money_saved, total_money_withdrawn, total_withdrawals, loandisk_borrower_id,
             branch_name, age, provider, date_created, date_modified, lite_user_id, user_id)
         SELECT n.id, '+234806' || lpad(n.id::text, 7, '0'), 'SECRET-pin-' || n.id,
             'SECRET-lite_transaction_pin-' || n.id, 'Adébáyọ̀', 'Ọlátúnjí', NULL,
             NULL, 'MALE', 'MARRIED', DATE '1988-02-29', 'Lagos', 'Ikeja', n.id || ' Market Road',
             NULL, 'Near the mosque', 'Tailor', NULL,
             'SECRET-bvn-' || n.id, 'SECRET-nin-' || n.id, 'SECRET-image-' || n.id,
             3.3792, 6.5244, NULL, NULL, 'Nigeria', NULL, $2,
             $2, $2, CASE WHEN $2 THEN 'COMPLETE' ELSE 'BVN' END, false, false,
             1500.5, 0, 0, NULL,
             'Ikeja', 37, 'ajo', $3, $3, NULL, $1::int4
         FROM n
         RETURNING id::int8",
    )
    .bind(agent_id)
    .bind(onboarded)
    .bind(fixture_time())
    .fetch_one(pool)
    .await
    .expect("insert customer")
}

/// A `loans_ajoloan` row (with the `loans_loaneligibility` row it needs) of 100000 over
/// 30 days, by `agent_id` to `borrower_id`. `disbursed` sets `is_disbursed`, the
/// status (`DISBURSED` / `APPROVED`), `amount_disbursed` and the dates. `loan_ref` is
/// a UUID derived from the id; created and modified at [`fixture_time`].
pub async fn insert_loan(pool: &PgPool, agent_id: i64, borrower_id: i64, disbursed: bool) -> i64 {
    sqlx::query_scalar(
        "WITH e AS (
             INSERT INTO loans_loaneligibility (amount, date_created, ajo_user_id)
             VALUES (100000, $4, $2::int4) RETURNING id),
         n AS (SELECT nextval(pg_get_serial_sequence('loans_ajoloan', 'id')) AS id)
         INSERT INTO loans_ajoloan (
             id, borrower_full_name, borrower_phone_number, guarantor_full_name,
             guarantor_phone_number, amount, amount_disbursed, amount_saved, bnpl_amount,
             loan_type, application_type, status, performance_status, loan_behavior,
             total_paid_amount, total_outstanding_balance, last_paid_amount, interest_rate,
             interest_amount, processing_fee, nem_fee, repayment_amount, principal_repayment,
             expected_repayment_count, count_of_recorded_repayments, daily_repayment_amount,
             principal_daily_repayment, is_disbursed, date_disbursed, start_date, end_date,
             expected_end_date, actual_end_date, date_completed, tenor, tenor_in_days,
             repayment_type, loandisk_loan_id, unique_loan_ref, loan_ref, escrow_amount,
             escrow_settled, date_created, date_modified, agent_id, borrower_id,
             eligibility_id, guarantor_id)
         SELECT n.id, 'Adébáyọ̀ Ọlátúnjí', '+2348060000000', NULL,
             NULL, 100000, CASE WHEN $3 THEN 100000 ELSE 0 END, 10000, 0,
             'AJO', 'PRIMARY', CASE WHEN $3 THEN 'DISBURSED' ELSE 'APPROVED' END, NULL, NULL,
             0, 120000, 0, 0.2,
             20000, 2000, 500, 120000, 100000,
             30, 0, 4000,
             3333.33, $3, CASE WHEN $3 THEN $4 END, CASE WHEN $3 THEN DATE '2026-01-02' END,
             CASE WHEN $3 THEN DATE '2026-02-01' END,
             CASE WHEN $3 THEN DATE '2026-02-01' END, NULL, NULL, 'ONE_MONTH', 30,
             'DAILY', NULL, 'ULR-' || n.id, md5('loan' || n.id)::uuid::text, 0,
             false, $4, $4, $1::int4, $2::int4,
             e.id, NULL
         FROM n, e
         RETURNING id::int8",
    )
    .bind(agent_id)
    .bind(borrower_id)
    .bind(disbursed)
    .bind(fixture_time())
    .fetch_one(pool)
    .await
    .expect("insert loan")
}

/// One installment of a loan's schedule, for [`insert_schedule`].
#[derive(Debug, Clone, PartialEq)]
pub struct Installment {
    pub due_date: Option<NaiveDate>,
    pub due_amount: f64,
    pub paid_amount: f64,
    pub amount_left: f64,
    pub fully_paid: bool,
    pub is_late: bool,
    pub late_days: i32,
}

impl Installment {
    /// Unpaid, not late: `due_amount` due on `due_date`, all of it left.
    pub fn new(due_date: NaiveDate, due_amount: f64) -> Installment {
        Installment {
            due_date: Some(due_date),
            due_amount,
            paid_amount: 0.0,
            amount_left: due_amount,
            fully_paid: false,
            is_late: false,
            late_days: 0,
        }
    }

    /// Fully paid: `paid_amount = due_amount`, nothing left.
    pub fn paid(mut self) -> Installment {
        self.paid_amount = self.due_amount;
        self.amount_left = 0.0;
        self.fully_paid = true;
        self
    }

    /// Late by `days` days.
    pub fn late(mut self, days: i32) -> Installment {
        self.is_late = true;
        self.late_days = days;
        self
    }
}

/// A `loans_ajoloanschedule` row of `loan_id`. `paid_date` / `fully_paid_date` are the
/// due date when fully paid, else NULL.
pub async fn insert_schedule(pool: &PgPool, loan_id: i64, i: &Installment) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO loans_ajoloanschedule (
             due_amount, amount_left, paid_amount, due_date, paid_date, fully_paid,
             fully_paid_date, is_late, late_days, date_created, date_modified, loan_id)
         VALUES ($2, $3, $4, $5, CASE WHEN $6 THEN $5 END, $6,
             CASE WHEN $6 THEN $5 END, $7, $8, $9, $9, $1::int4)
         RETURNING id::int8",
    )
    .bind(loan_id)
    .bind(i.due_amount)
    .bind(i.amount_left)
    .bind(i.paid_amount)
    .bind(i.due_date)
    .bind(i.fully_paid)
    .bind(i.is_late)
    .bind(i.late_days)
    .bind(fixture_time())
    .fetch_one(pool)
    .await
    .expect("insert schedule")
}

/// A 4000 repayment of `loan_id` (same agent and borrower as the loan), paid and
/// created at [`fixture_time`].
pub async fn insert_repayment(pool: &PgPool, loan_id: i64) -> i64 {
    insert_repayment_with(pool, loan_id, 4000.0, fixture_time()).await
}

/// A repayment of `loan_id` of `amount`, paid at `paid_date`; created and modified at
/// [`fixture_time`]. `repayment_ref` is a UUID derived from the id.
pub async fn insert_repayment_with(
    pool: &PgPool,
    loan_id: i64,
    amount: f64,
    paid_date: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "WITH n AS (SELECT nextval(pg_get_serial_sequence('loans_ajoloanrepayment', 'id')) AS id)
         INSERT INTO loans_ajoloanrepayment (
             id, repayment_type, loan_amount, repayment_amount, health_insurance, paid_date,
             repayment_ref, settlement_status, repayment_meta_response, ledger_amount, comment,
             borrower_notified, sms_body, sms_result, marked_as, expected_recovery_amt,
             applied_to_loan, date_created, date_modified, agent_id, ajo_loan_id, borrower_id)
         SELECT n.id, 'TRANSFER', l.amount, $2, 0, $3,
             md5('repayment' || n.id)::uuid, true, 'SECRET-repayment_meta_response-' || n.id,
             $2, 'Paid at Ọjà market',
             true, 'SECRET-sms_body-' || n.id, 'SECRET-sms_result-' || n.id, NULL, 0,
             true, $4, $4, l.agent_id, l.id, l.borrower_id
         FROM n, loans_ajoloan l
         WHERE l.id = $1::int4
         RETURNING id::int8",
    )
    .bind(loan_id)
    .bind(amount)
    .bind(paid_date)
    .bind(fixture_time())
    .fetch_one(pool)
    .await
    .expect("insert repayment (does the loan exist?)")
}

/// Moves the time an incremental sync selects `entity` by: `date_modified` for
/// customers and loans; `date_created` (and `date_modified`) for repayments.
/// Panics for officers, which have no such time (incremental syncs take them all).
pub async fn set_modified(pool: &PgPool, entity: EntityKind, id: i64, ts: DateTime<Utc>) {
    let sql = match entity {
        EntityKind::Customer => "UPDATE ajo_ajouser SET date_modified = $2 WHERE id = $1::int4",
        EntityKind::Loan => "UPDATE loans_ajoloan SET date_modified = $2 WHERE id = $1::int4",
        EntityKind::Repayment => {
            "UPDATE loans_ajoloanrepayment SET date_created = $2, date_modified = $2 \
             WHERE id = $1::int4"
        }
        EntityKind::Officer => panic!("officers have no modification time"),
    };
    let done = sqlx::query(sql)
        .bind(id)
        .bind(ts)
        .execute(pool)
        .await
        .expect("set_modified");
    assert_eq!(done.rows_affected(), 1, "set_modified: no {entity} {id}");
}
