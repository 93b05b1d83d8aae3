//! Repayments (`loans_ajoloanrepayment`).

use super::{encode, finite, non_finite, timestamp};
use crate::domain::Record;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// A repayment as loaded, already without repayment_meta_response, sms_body, sms_result.
#[derive(Debug, Clone, Serialize)]
pub struct RepaymentRow {
    pub id: i64,
    pub agent_id: i64,
    pub borrower_id: i64,
    pub ajo_loan_id: i64,
    pub repayment_type: String,
    #[serde(serialize_with = "finite")]
    pub loan_amount: f64,
    #[serde(serialize_with = "finite")]
    pub repayment_amount: f64,
    #[serde(serialize_with = "finite")]
    pub health_insurance: f64,
    #[serde(serialize_with = "timestamp")]
    pub paid_date: DateTime<Utc>,
    /// Sent as a hyphenated UUID string.
    pub repayment_ref: uuid::Uuid,
    pub settlement_status: bool,
    #[serde(serialize_with = "finite")]
    pub ledger_amount: f64,
    pub comment: Option<String>,
    pub borrower_notified: bool,
    pub marked_as: Option<String>,
    #[serde(serialize_with = "finite")]
    pub expected_recovery_amt: f64,
    pub applied_to_loan: Option<bool>,
    #[serde(serialize_with = "timestamp")]
    pub date_created: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub date_modified: DateTime<Utc>,
    /// The loan's reference.
    pub loan_ref: Option<String>,
}

// By position: the columns of `source/sql/rows_repayment.sql`, in order.
positional_row!(RepaymentRow {
    id,
    agent_id,
    borrower_id,
    ajo_loan_id,
    repayment_type,
    loan_amount,
    repayment_amount,
    health_insurance,
    paid_date,
    repayment_ref,
    settlement_status,
    ledger_amount,
    comment,
    borrower_notified,
    marked_as,
    expected_recovery_amt,
    applied_to_loan,
    date_created,
    date_modified,
    loan_ref,
});

pub fn transform(row: RepaymentRow) -> (Record, u32) {
    let warnings = non_finite(&[
        row.loan_amount,
        row.repayment_amount,
        row.health_insurance,
        row.ledger_amount,
        row.expected_recovery_amt,
    ]);
    (encode(row.id, &row), warnings)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn row() -> RepaymentRow {
        RepaymentRow {
            id: 555,
            agent_id: 7,
            borrower_id: 42,
            ajo_loan_id: 1001,
            repayment_type: "TRANSFER".into(),
            loan_amount: 100000.0,
            repayment_amount: 4000.0,
            health_insurance: 50.0,
            paid_date: Utc.with_ymd_and_hms(2026, 10, 11, 16, 5, 0).unwrap(),
            repayment_ref: uuid::Uuid::parse_str("0b6f4c1e-2d3a-4b5c-8d9e-0f1a2b3c4d5e").unwrap(),
            settlement_status: true,
            ledger_amount: 4000.0,
            comment: Some("Paid at Ọjà market".into()),
            borrower_notified: true,
            marked_as: None,
            expected_recovery_amt: f64::NEG_INFINITY,
            applied_to_loan: None,
            date_created: Utc.with_ymd_and_hms(2026, 10, 11, 16, 5, 0).unwrap(),
            date_modified: Utc.with_ymd_and_hms(2026, 10, 11, 16, 5, 0).unwrap(),
            loan_ref: Some("5f1d7c3e-8a9b-4c2d-9e0f-1a2b3c4d5e6f".into()),
        }
    }

    #[test]
    fn golden_repayment() {
        let (record, warnings) = transform(row());
        assert_eq!(warnings, 1);
        super::super::golden::check("repayment", &record);
    }
}
