//! Customers (`ajo_ajouser`).

use super::{encode, finite, non_finite, opt_date, timestamp};
use crate::domain::Record;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

/// A customer as loaded, already without pin, lite_transaction_pin, bvn, nin and image.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CustomerRow {
    pub id: i64,
    pub phone_number: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub alias: Option<String>,
    pub alt_phone: Option<String>,
    pub gender: Option<String>,
    pub marital_status: Option<String>,
    #[serde(serialize_with = "opt_date")]
    pub dob: Option<NaiveDate>,
    pub state: Option<String>,
    pub lga: Option<String>,
    pub address: Option<String>,
    pub bus_stop: Option<String>,
    pub landmark: Option<String>,
    pub trade: Option<String>,
    pub trade_location: Option<String>,
    #[serde(serialize_with = "finite")]
    pub longitude: f64,
    #[serde(serialize_with = "finite")]
    pub latitude: f64,
    pub location_state: Option<String>,
    pub location_city: Option<String>,
    pub location_country: Option<String>,
    pub location_address: Option<String>,
    pub onboarding_verified: bool,
    pub bvn_verified: bool,
    pub onboarding_complete: bool,
    pub onboarding_stage: Option<String>,
    #[serde(serialize_with = "finite")]
    pub total_money_saved: f64,
    #[serde(serialize_with = "finite")]
    pub total_money_withdrawn: f64,
    pub total_withdrawals: i32,
    pub loandisk_borrower_id: Option<String>,
    pub branch_name: Option<String>,
    pub age: Option<i32>,
    pub provider: String,
    #[serde(serialize_with = "timestamp")]
    pub date_created: DateTime<Utc>,
    #[serde(serialize_with = "timestamp")]
    pub date_modified: DateTime<Utc>,
    pub lite_user_id: Option<i64>,
    /// The managing agent: the `user_id` column, sent under this name.
    pub agent_id: Option<i64>,
    pub has_bvn: bool,
    pub has_nin: bool,
    /// Derived by [`full_name`].
    pub full_name: String,
}

// By position: the columns of `source/sql/rows_customer.sql`, in order.
positional_row!(CustomerRow {
    id,
    phone_number,
    first_name,
    last_name,
    alias,
    alt_phone,
    gender,
    marital_status,
    dob,
    state,
    lga,
    address,
    bus_stop,
    landmark,
    trade,
    trade_location,
    longitude,
    latitude,
    location_state,
    location_city,
    location_country,
    location_address,
    onboarding_verified,
    bvn_verified,
    onboarding_complete,
    onboarding_stage,
    total_money_saved,
    total_money_withdrawn,
    total_withdrawals,
    loandisk_borrower_id,
    branch_name,
    age,
    provider,
    date_created,
    date_modified,
    lite_user_id,
    agent_id,
    has_bvn,
    has_nin,
} skip { full_name });

/// `first last` when both are set, else the one that is set, else the phone number.
pub fn full_name(first: Option<&str>, last: Option<&str>, phone: &str) -> String {
    fn clean(s: Option<&str>) -> Option<&str> {
        s.map(str::trim).filter(|s| !s.is_empty())
    }
    match (clean(first), clean(last)) {
        (Some(f), Some(l)) => format!("{f} {l}"),
        (Some(one), None) | (None, Some(one)) => one.to_string(),
        (None, None) => phone.to_string(),
    }
}

pub fn transform(mut row: CustomerRow) -> (Record, u32) {
    row.full_name = full_name(
        row.first_name.as_deref(),
        row.last_name.as_deref(),
        &row.phone_number,
    );
    let warnings = non_finite(&[
        row.longitude,
        row.latitude,
        row.total_money_saved,
        row.total_money_withdrawn,
    ]);
    (encode(row.id, &row), warnings)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn row() -> CustomerRow {
        CustomerRow {
            id: 42,
            phone_number: "+2348060000042".into(),
            first_name: Some("Adébáyọ̀".into()),
            last_name: Some("Ọlátúnjí".into()),
            alias: None,
            alt_phone: None,
            gender: Some("MALE".into()),
            marital_status: Some("MARRIED".into()),
            dob: NaiveDate::from_ymd_opt(1988, 2, 29),
            state: Some("Lagos".into()),
            lga: Some("Ikeja".into()),
            address: Some("12 Allen Avenue".into()),
            bus_stop: None,
            landmark: Some("Near the mosque".into()),
            trade: Some("Tailor".into()),
            trade_location: None,
            longitude: f64::NAN,
            latitude: 6.6018,
            location_state: None,
            location_city: None,
            location_country: Some("Nigeria".into()),
            location_address: None,
            onboarding_verified: true,
            bvn_verified: false,
            onboarding_complete: true,
            onboarding_stage: Some("COMPLETE".into()),
            total_money_saved: 150000.5,
            total_money_withdrawn: f64::INFINITY,
            total_withdrawals: 3,
            loandisk_borrower_id: None,
            branch_name: Some("Ikeja".into()),
            age: Some(37),
            provider: "ajo".into(),
            date_created: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            date_modified: Utc.with_ymd_and_hms(2026, 11, 20, 8, 0, 0).unwrap()
                + chrono::Duration::microseconds(123456),
            lite_user_id: None,
            agent_id: Some(7),
            has_bvn: true,
            has_nin: false,
            full_name: String::new(),
        }
    }

    #[test]
    fn golden_customer() {
        let (record, warnings) = transform(row());
        assert_eq!(warnings, 2, "NaN longitude and infinite withdrawals");
        super::super::golden::check("customer", &record);
    }

    #[test]
    fn full_name_rule() {
        assert_eq!(full_name(Some("Ada"), Some("Eze"), "+234"), "Ada Eze");
        assert_eq!(full_name(Some("Ada"), None, "+234"), "Ada");
        assert_eq!(full_name(None, Some("Eze"), "+234"), "Eze");
        assert_eq!(full_name(Some("  "), Some(""), "+234"), "+234");
        assert_eq!(full_name(None, None, "+234"), "+234");
        assert_eq!(full_name(Some(" Ọlá "), Some("Ṣàngó"), "x"), "Ọlá Ṣàngó");
    }

    #[test]
    fn user_id_is_sent_as_agent_id_only() {
        let (record, _) = transform(row());
        let v: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        assert_eq!(v["agent_id"], 7);
        assert!(v.get("user_id").is_none());
        assert_eq!(v["full_name"], "Adébáyọ̀ Ọlátúnjí");
    }
}
