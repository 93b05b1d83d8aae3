//! Loans (`loans_ajoloan`) with their agent, borrower, schedule and repayments.

use super::{encode, finite, non_finite, opt_date, opt_timestamp, timestamp};
use crate::domain::Record;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

/// A loan as loaded: its own columns, the related fields, and the flat aggregates that
/// [`transform`] folds into the `schedule` and `repayments` objects.
#[derive(Debug, Clone, Serialize)]
pub struct LoanRow {
    pub id: i64,
    pub agent_id: i64,
    pub borrower_id: i64,
    pub eligibility_id: i64,
    pub guarantor_id: Option<i64>,
    pub borrower_full_name: Option<String>,
    pub borrower_phone_number: Option<String>,
    pub guarantor_full_name: Option<String>,
    pub guarantor_phone_number: Option<String>,
    #[serde(serialize_with = "finite")]
    pub amount: f64,
    #[serde(serialize_with = "finite")]
    pub amount_disbursed: f64,
    #[serde(serialize_with = "finite")]
    pub amount_saved: f64,
    #[serde(serialize_with = "finite")]
    pub bnpl_amount: f64,
    pub loan_type: String,
    pub application_type: String,
    pub status: String,
    pub performance_status: Option<String>,
    pub loan_behavior: Option<String>,
    #[serde(serialize_with = "finite")]
    pub total_paid_amount: f64,
    #[serde(serialize_with = "finite")]
    pub total_outstanding_balance: f64,
    #[serde(serialize_with = "finite")]
    pub last_paid_amount: f64,
    #[serde(serialize_with = "finite")]
    pub interest_rate: f64,
    #[serde(serialize_with = "finite")]
    pub interest_amount: f64,
    #[serde(serialize_with = "finite")]
    pub processing_fee: f64,
    #[serde(serialize_with = "finite")]
    pub nem_fee: f64,
    #[serde(serialize_with = "finite")]
    pub repayment_amount: f64,
    #[serde(serialize_with = "finite")]
    pub principal_repayment: f64,
    pub expected_repayment_count: i32,
    pub count_of_recorded_repayments: i32,
    #[serde(serialize_with = "finite")]
    pub daily_repayment_amount: f64,
    #[serde(serialize_with = "finite")]
    pub principal_daily_repayment: f64,
    pub is_disbursed: bool,
    #[serde(serialize_with = "opt_timestamp")]
    pub date_disbursed: Option<DateTime<Utc>>,
    #[serde(serialize_with = "opt_date")]
    pub start_date: Option<NaiveDate>,
    #[serde(serialize_with = "opt_date")]
    pub end_date: Option<NaiveDate>,
    #[serde(serialize_with = "opt_date")]
    pub expected_end_date: Option<NaiveDate>,
    #[serde(serialize_with = "opt_date")]
    pub actual_end_date: Option<NaiveDate>,
    #[serde(serialize_with = "opt_timestamp")]
    pub date_completed: Option<DateTime<Utc>>,
    pub tenor: String,
    pub tenor_in_days: i32,
    pub repayment_type: String,
    pub loandisk_loan_id: Option<String>,
    pub unique_loan_ref: Option<String>,
    pub loan_ref: String,
    #[serde(serialize_with = "finite")]
    pub escrow_amount: f64,
    pub escrow_settled: bool,
    #[serde(serialize_with = "timestamp")]
    pub date_created: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub date_modified: DateTime<Utc>,
    /// The agent's email and branch (`accounts_customuser`).
    pub agent_email: Option<String>,
    pub agent_branch: Option<String>,
    /// The borrower's own agent (`ajo_ajouser.user_id`) and branch.
    pub borrower_agent_id: Option<i64>,
    pub borrower_branch: Option<String>,
    #[serde(skip)]
    pub installments: i64,
    #[serde(skip)]
    pub installments_paid: i64,
    #[serde(skip)]
    pub installments_late: i64,
    #[serde(skip)]
    pub max_late_days: i64,
    #[serde(skip)]
    pub amount_due: f64,
    #[serde(skip)]
    pub amount_paid: f64,
    #[serde(skip)]
    pub amount_left: f64,
    #[serde(skip)]
    pub next_due_date: Option<NaiveDate>,
    #[serde(skip)]
    pub repayment_count: i64,
    #[serde(skip)]
    pub repayment_total: f64,
    #[serde(skip)]
    pub last_paid_date: Option<DateTime<Utc>>,
    /// Filled by [`transform`].
    pub schedule: Schedule,
    pub repayments: Repayments,
}

// By position: the columns of `source/sql/rows_loan.sql`, in order.
positional_row!(LoanRow {
    id,
    agent_id,
    borrower_id,
    eligibility_id,
    guarantor_id,
    borrower_full_name,
    borrower_phone_number,
    guarantor_full_name,
    guarantor_phone_number,
    amount,
    amount_disbursed,
    amount_saved,
    bnpl_amount,
    loan_type,
    application_type,
    status,
    performance_status,
    loan_behavior,
    total_paid_amount,
    total_outstanding_balance,
    last_paid_amount,
    interest_rate,
    interest_amount,
    processing_fee,
    nem_fee,
    repayment_amount,
    principal_repayment,
    expected_repayment_count,
    count_of_recorded_repayments,
    daily_repayment_amount,
    principal_daily_repayment,
    is_disbursed,
    date_disbursed,
    start_date,
    end_date,
    expected_end_date,
    actual_end_date,
    date_completed,
    tenor,
    tenor_in_days,
    repayment_type,
    loandisk_loan_id,
    unique_loan_ref,
    loan_ref,
    escrow_amount,
    escrow_settled,
    date_created,
    date_modified,
    agent_email,
    agent_branch,
    borrower_agent_id,
    borrower_branch,
    installments,
    installments_paid,
    installments_late,
    max_late_days,
    amount_due,
    amount_paid,
    amount_left,
    next_due_date,
    repayment_count,
    repayment_total,
    last_paid_date,
} skip { schedule, repayments });

/// Aggregates of `loans_ajoloanschedule` (zeros and a null date when there are no rows;
/// a NaN or infinite sum is sent as `null` and counted as a warning).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Schedule {
    pub installments: i64,
    pub installments_paid: i64,
    pub installments_late: i64,
    pub max_late_days: i64,
    #[serde(serialize_with = "finite")]
    pub amount_due: f64,
    #[serde(serialize_with = "finite")]
    pub amount_paid: f64,
    #[serde(serialize_with = "finite")]
    pub amount_left: f64,
    /// Earliest `due_date` not fully paid.
    #[serde(serialize_with = "opt_date")]
    pub next_due_date: Option<NaiveDate>,
}

/// Aggregates of `loans_ajoloanrepayment`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Repayments {
    pub count: i64,
    #[serde(serialize_with = "finite")]
    pub total_amount: f64,
    /// The latest `paid_date` (a timestamp).
    #[serde(serialize_with = "opt_timestamp")]
    pub last_paid_date: Option<DateTime<Utc>>,
}

pub fn transform(mut row: LoanRow) -> (Record, u32) {
    row.schedule = Schedule {
        installments: row.installments,
        installments_paid: row.installments_paid,
        installments_late: row.installments_late,
        max_late_days: row.max_late_days,
        amount_due: row.amount_due,
        amount_paid: row.amount_paid,
        amount_left: row.amount_left,
        next_due_date: row.next_due_date,
    };
    row.repayments = Repayments {
        count: row.repayment_count,
        total_amount: row.repayment_total,
        last_paid_date: row.last_paid_date,
    };
    let warnings = non_finite(&[
        row.amount,
        row.amount_disbursed,
        row.amount_saved,
        row.bnpl_amount,
        row.total_paid_amount,
        row.total_outstanding_balance,
        row.last_paid_amount,
        row.interest_rate,
        row.interest_amount,
        row.processing_fee,
        row.nem_fee,
        row.repayment_amount,
        row.principal_repayment,
        row.daily_repayment_amount,
        row.principal_daily_repayment,
        row.escrow_amount,
        row.amount_due,
        row.amount_paid,
        row.amount_left,
        row.repayment_total,
    ]);
    (encode(row.id, &row), warnings)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn row() -> LoanRow {
        LoanRow {
            id: 1001,
            agent_id: 7,
            borrower_id: 42,
            eligibility_id: 5,
            guarantor_id: None,
            borrower_full_name: Some("Adébáyọ̀ Ọlátúnjí".into()),
            borrower_phone_number: Some("+2348060000042".into()),
            guarantor_full_name: None,
            guarantor_phone_number: None,
            amount: 100000.0,
            amount_disbursed: 100000.0,
            amount_saved: 10000.0,
            bnpl_amount: 0.0,
            loan_type: "AJO".into(),
            application_type: "PRIMARY".into(),
            status: "DISBURSED".into(),
            performance_status: Some("PERFORMING".into()),
            loan_behavior: None,
            total_paid_amount: 40000.25,
            total_outstanding_balance: 79999.75,
            last_paid_amount: 4000.0,
            interest_rate: 0.2,
            interest_amount: 20000.0,
            processing_fee: 2000.0,
            nem_fee: f64::NAN,
            repayment_amount: 120000.0,
            principal_repayment: 100000.0,
            expected_repayment_count: 30,
            count_of_recorded_repayments: 10,
            daily_repayment_amount: 4000.0,
            principal_daily_repayment: 3333.33,
            is_disbursed: true,
            date_disbursed: Some(Utc.with_ymd_and_hms(2026, 10, 1, 9, 30, 0).unwrap()),
            start_date: NaiveDate::from_ymd_opt(2026, 10, 2),
            end_date: NaiveDate::from_ymd_opt(2026, 11, 1),
            expected_end_date: NaiveDate::from_ymd_opt(2026, 11, 1),
            actual_end_date: None,
            date_completed: None,
            tenor: "ONE_MONTH".into(),
            tenor_in_days: 30,
            repayment_type: "DAILY".into(),
            loandisk_loan_id: None,
            unique_loan_ref: Some("ULR-1001".into()),
            loan_ref: "5f1d7c3e-8a9b-4c2d-9e0f-1a2b3c4d5e6f".into(),
            escrow_amount: 0.0,
            escrow_settled: false,
            date_created: Utc.with_ymd_and_hms(2026, 9, 30, 12, 0, 0).unwrap(),
            date_modified: Utc.with_ymd_and_hms(2026, 11, 20, 18, 45, 1).unwrap(),
            agent_email: Some("ngozi.okafor@example.com".into()),
            agent_branch: Some("Ikeja".into()),
            borrower_agent_id: Some(7),
            borrower_branch: None,
            installments: 30,
            installments_paid: 10,
            installments_late: 2,
            max_late_days: 4,
            amount_due: 120000.0,
            amount_paid: 40000.25,
            amount_left: 79999.75,
            next_due_date: NaiveDate::from_ymd_opt(2026, 10, 12),
            repayment_count: 10,
            repayment_total: 40000.25,
            last_paid_date: Some(Utc.with_ymd_and_hms(2026, 10, 11, 16, 5, 0).unwrap()),
            schedule: Schedule::default(),
            repayments: Repayments::default(),
        }
    }

    #[test]
    fn golden_loan() {
        let (record, warnings) = transform(row());
        assert_eq!(warnings, 1, "the NaN nem_fee");
        super::super::golden::check("loan", &record);
    }

    #[test]
    fn aggregates_are_nested_not_flat() {
        let (record, _) = transform(row());
        let v: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        assert_eq!(v["schedule"]["installments_late"], 2);
        assert_eq!(v["repayments"]["last_paid_date"], "2026-10-11T16:05:00Z");
        assert!(v.get("installments").is_none() && v.get("repayment_total").is_none());
    }

    #[test]
    fn non_finite_aggregates_become_null_and_count() {
        let mut r = row();
        r.nem_fee = 500.0;
        r.amount_due = f64::NAN;
        r.amount_left = f64::NEG_INFINITY;
        r.repayment_total = f64::INFINITY;
        let (record, warnings) = transform(r);
        assert_eq!(warnings, 3);
        let v: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        assert_eq!(v["schedule"]["amount_due"], serde_json::Value::Null);
        assert_eq!(v["schedule"]["amount_left"], serde_json::Value::Null);
        assert_eq!(v["schedule"]["amount_paid"], 40000.25);
        assert_eq!(v["repayments"]["total_amount"], serde_json::Value::Null);
        assert_eq!(v["nem_fee"], 500.0);
    }

    #[test]
    fn a_loan_without_schedule_or_repayments_sends_zeros_and_nulls() {
        let mut r = row();
        (
            r.installments,
            r.installments_paid,
            r.installments_late,
            r.max_late_days,
        ) = (0, 0, 0, 0);
        (r.amount_due, r.amount_paid, r.amount_left) = (0.0, 0.0, 0.0);
        r.next_due_date = None;
        (r.repayment_count, r.repayment_total, r.last_paid_date) = (0, 0.0, None);
        let (record, _) = transform(r);
        let v: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        assert_eq!(
            v["schedule"],
            serde_json::json!({"installments": 0, "installments_paid": 0, "installments_late": 0,
                "max_late_days": 0, "amount_due": 0.0, "amount_paid": 0.0, "amount_left": 0.0,
                "next_due_date": null})
        );
        assert_eq!(
            v["repayments"],
            serde_json::json!({"count": 0, "total_amount": 0.0, "last_paid_date": null})
        );
    }
}
