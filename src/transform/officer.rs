//! Officers (`accounts_customuser` rows whose `user_type` is an agent type).

use super::{encode, opt_timestamp, timestamp};
use crate::domain::Record;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// An officer as loaded, already without password, user_password and bvn_number.
#[derive(Debug, Clone, Serialize)]
pub struct OfficerRow {
    pub id: i64,
    pub email: String,
    pub username: Option<String>,
    pub customer_user_id: Option<i64>,
    pub user_type: Option<String>,
    pub account_type: String,
    pub user_phone: Option<String>,
    pub user_branch: Option<String>,
    pub kyc_level: i32,
    pub performance_status: Option<String>,
    pub referral_code: Option<String>,
    pub referrals_count: i32,
    pub call_agent_id: Option<i32>,
    pub is_call_agent: bool,
    pub is_call_agent_admin: bool,
    pub is_ajo_admin: bool,
    pub bucket: serde_json::Value,
    pub bucket_designation: Option<String>,
    pub pnd: bool,
    pub address: Option<String>,
    #[serde(serialize_with = "timestamp")]
    pub date_joined: DateTime<Utc>,
    #[serde(serialize_with = "opt_timestamp")]
    pub last_login: Option<DateTime<Utc>>,
    /// Customers whose `user_id` is this officer.
    pub customers_count: i64,
}

// By position: the columns of `source/sql/rows_officer.sql`, in order.
positional_row!(OfficerRow {
    id,
    email,
    username,
    customer_user_id,
    user_type,
    account_type,
    user_phone,
    user_branch,
    kyc_level,
    performance_status,
    referral_code,
    referrals_count,
    call_agent_id,
    is_call_agent,
    is_call_agent_admin,
    is_ajo_admin,
    bucket,
    bucket_designation,
    pnd,
    address,
    date_joined,
    last_login,
    customers_count,
});

pub fn transform(mut row: OfficerRow) -> (Record, u32) {
    // `bucket` is free-form JSON: never let a never-send key through inside it.
    if super::scrub(&mut row.bucket) > 0 {
        tracing::warn!(
            id = row.id,
            "never-send keys removed from an officer's bucket"
        );
    }
    (encode(row.id, &row), 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn row() -> OfficerRow {
        OfficerRow {
            id: 7,
            email: "ngozi.okafor@example.com".into(),
            username: Some("ngozi".into()),
            customer_user_id: None,
            user_type: Some("AJO_AGENT".into()),
            account_type: "KEY_ACCOUNT".into(),
            user_phone: Some("+2348030000007".into()),
            user_branch: Some("Ikeja".into()),
            kyc_level: 2,
            performance_status: None,
            referral_code: Some("REF7".into()),
            referrals_count: 4,
            call_agent_id: None,
            is_call_agent: false,
            is_call_agent_admin: false,
            is_ajo_admin: false,
            bucket: serde_json::json!(["A"]),
            bucket_designation: None,
            pnd: false,
            address: Some("3 Ọbáfẹ́mi Awólọ́wọ̀ Way".into()),
            date_joined: Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap(),
            last_login: None,
            customers_count: 12,
        }
    }

    #[test]
    fn golden_officer() {
        let (record, warnings) = transform(row());
        assert_eq!(warnings, 0);
        super::super::golden::check("officer", &record);
    }

    #[test]
    fn never_send_keys_inside_the_bucket_are_removed() {
        let mut r = row();
        r.bucket = serde_json::json!([{"name": "A", "pin": "1234", "x": {"bvn": "1"}}, "B"]);
        let (record, _) = transform(r);
        let v: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        assert_eq!(
            v["bucket"],
            serde_json::json!([{"name": "A", "x": {}}, "B"])
        );
    }
}
