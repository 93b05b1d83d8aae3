//! Source rows → records (SPEC.md section 5). Pure functions: no I/O.
//!
//! Each entity has a row type (what its SQL selects: never a never-send column) and a
//! `transform` that fills the derived fields and encodes the record once, as JSON.
//! Timestamps are RFC 3339 UTC with `Z`, dates `YYYY-MM-DD`, NULL stays `null`, and a
//! NaN or infinite number becomes `null` and counts as a transform warning.
//! (chrono's serde encoding of `DateTime<Utc>` is exactly
//! `to_rfc3339_opts(SecondsFormat::AutoSi, true)`: `Z`, fractions only when present;
//! a test below pins it.)
//!
//! Records are serialized from plain structs straight into a `RawValue`: no
//! intermediate `serde_json::Value` on the hot path.

/// Implements `sqlx::FromRow` for a row type by column position: the n-th field listed
/// is the statement's n-th column (`source/sql/rows_*.sql`, in the same order), the
/// `skip` fields are derived later and start as their `Default`. Decoding by position
/// spares a by-name lookup (hashing the name) per column and row: about a fifth of a
/// worker's CPU when it was by name. Debug builds (every test) check each column's name
/// against its field, so an edit of the SELECT list that moves a column fails the tests.
macro_rules! positional_row {
    ($ty:ident { $($field:ident),* $(,)? } $(skip { $($skip:ident),* $(,)? })?) => {
        impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for $ty {
            fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
                use sqlx::Row as _;
                let mut _index = 0usize;
                $(
                    debug_assert_eq!(
                        sqlx::Column::name(&row.columns()[_index]),
                        stringify!($field),
                        "column {} of the {} statement",
                        _index,
                        stringify!($ty),
                    );
                    let $field = row.try_get(_index)?;
                    _index += 1;
                )*
                Ok($ty {
                    $($field,)*
                    $($($skip: Default::default(),)*)?
                })
            }
        }
    };
}

pub mod customer;
pub mod loan;
pub mod officer;
pub mod repayment;

use crate::domain::Record;
use serde::{Serialize, Serializer};

/// Keys that never appear in a record or a log line (SPEC.md section 5).
pub const NEVER_SEND: [&str; 11] = [
    "pin",
    "lite_transaction_pin",
    "password",
    "user_password",
    "bvn",
    "bvn_number",
    "nin",
    "image",
    "repayment_meta_response",
    "sms_body",
    "sms_result",
];

/// Removes never-send keys, at any depth, from a JSON value passed through from the
/// source (a `jsonb` column). Returns how many were removed.
pub(crate) fn scrub(v: &mut serde_json::Value) -> u32 {
    match v {
        serde_json::Value::Object(m) => {
            let before = m.len();
            m.retain(|k, _| !NEVER_SEND.contains(&k.as_str()));
            let mut n = (before - m.len()) as u32;
            for v in m.values_mut() {
                n += scrub(v);
            }
            n
        }
        serde_json::Value::Array(a) => a.iter_mut().map(scrub).sum(),
        _ => 0,
    }
}

/// Records of one chunk and how many values had to be sent as `null`.
#[derive(Debug, Default)]
pub struct Transformed {
    pub records: Vec<Record>,
    pub warnings: u32,
}

/// Serializes a float, or `null` when it is NaN or infinite.
pub(crate) fn finite<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    if x.is_finite() {
        s.serialize_f64(*x)
    } else {
        s.serialize_none()
    }
}

/// How many of these values will be sent as `null` for being NaN or infinite.
pub(crate) fn non_finite(values: &[f64]) -> u32 {
    values.iter().filter(|v| !v.is_finite()).count() as u32
}

/// Encodes a record. Serializing these plain structs cannot fail; should it ever, the
/// record is sent as `{"id": id}` rather than crashing a worker.
pub(crate) fn encode<T: Serialize>(id: i64, value: &T) -> Record {
    let json = serde_json::value::to_raw_value(value).unwrap_or_else(|e| {
        tracing::error!(id, error = %e, "record could not be encoded");
        serde_json::value::to_raw_value(&serde_json::json!({ "id": id }))
            .expect("a literal object encodes")
    });
    Record { id, json }
}

#[cfg(test)]
pub(crate) mod golden {
    use crate::domain::Record;

    /// Compares a record with `src/transform/golden/<name>.json` (as JSON values).
    /// Set `UPDATE_GOLDEN=1` to rewrite the file after a deliberate change.
    pub(crate) fn check(name: &str, record: &Record) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/transform/golden")
            .join(format!("{name}.json"));
        let got: serde_json::Value = serde_json::from_str(record.json.get()).unwrap();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        }
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
                    path.display()
                )
            }))
            .unwrap();
        pretty_assertions::assert_eq!(got, want, "golden file {}", path.display());
    }

    /// Every key of a JSON value, at any depth.
    pub(crate) fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    out.push(k.clone());
                    keys(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_record_of_any_entity_carries_a_never_send_key() {
        let mut officer_row = officer::tests::row();
        officer_row.bucket = serde_json::json!([{"password": "x", "deep": [{"sms_body": "y"}]}]);
        let records = [
            customer::transform(customer::tests::row()).0,
            officer::transform(officer::tests::row()).0,
            officer::transform(officer_row).0,
            loan::transform(loan::tests::row()).0,
            repayment::transform(repayment::tests::row()).0,
        ];
        let carried = |v: &serde_json::Value| {
            let mut all = Vec::new();
            golden::keys(v, &mut all);
            all.into_iter()
                .filter(|k| NEVER_SEND.contains(&k.as_str()))
                .collect::<Vec<_>>()
        };
        // The check itself finds a key at any depth.
        assert_eq!(
            carried(&serde_json::json!({"a": [{"b": {"nin": 1}}]})),
            vec!["nin".to_string()]
        );
        for r in &records {
            let v: serde_json::Value = serde_json::from_str(r.json.get()).unwrap();
            let mut all = Vec::new();
            golden::keys(&v, &mut all);
            assert!(all.len() > 10, "suspiciously few keys: {all:?}");
            assert_eq!(carried(&v), Vec::<String>::new(), "record {}", r.id);
            assert_eq!(v["id"], serde_json::json!(r.id));
            // Columns that are not in ETL_SCHEMA.md's lists are not sent either.
            for k in [
                "user_id",
                "card_issued",
                "need_card",
                "is_staff",
                "is_superuser",
                "is_active",
                "installments",
                "repayment_total",
            ] {
                assert!(v.get(k).is_none(), "record {} carries {k}", r.id);
            }
        }
        let officer: serde_json::Value = serde_json::from_str(records[1].json.get()).unwrap();
        assert!(officer.get("first_name").is_none() && officer.get("last_name").is_none());
    }

    #[test]
    fn non_finite_floats_become_null() {
        #[derive(Serialize)]
        struct T {
            #[serde(serialize_with = "finite")]
            a: f64,
            #[serde(serialize_with = "finite")]
            b: f64,
            #[serde(serialize_with = "finite")]
            c: f64,
        }
        let r = encode(
            1,
            &T {
                a: f64::NAN,
                b: f64::NEG_INFINITY,
                c: 2.5,
            },
        );
        assert_eq!(r.json.get(), r#"{"a":null,"b":null,"c":2.5}"#);
        assert_eq!(non_finite(&[f64::NAN, f64::INFINITY, 1.0]), 2);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_z_and_keep_fractions() {
        use chrono::{DateTime, NaiveDate, SecondsFormat, TimeZone, Utc};
        #[derive(Serialize)]
        struct T {
            whole: DateTime<Utc>,
            micros: DateTime<Utc>,
            date: NaiveDate,
        }
        let whole = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let micros = whole + chrono::Duration::microseconds(120);
        let r = encode(
            1,
            &T {
                whole,
                micros,
                date: NaiveDate::from_ymd_opt(2026, 2, 3).unwrap(),
            },
        );
        assert_eq!(
            r.json.get(),
            r#"{"whole":"2026-01-02T03:04:05Z","micros":"2026-01-02T03:04:05.000120Z","date":"2026-02-03"}"#
        );
        // chrono's serde encoding is exactly this format.
        assert_eq!(
            micros.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            "2026-01-02T03:04:05.000120Z"
        );
    }
}
