//! Source rows → records (SPEC.md section 5). Pure functions: no I/O.
//!
//! Each entity has a row type (what its SQL selects: never a never-send column) and a
//! `transform` that fills the derived fields and encodes the record once, as JSON.
//! Timestamps are RFC 3339 UTC with `Z`, dates `YYYY-MM-DD`, NULL stays `null`, and a
//! NaN or infinite number becomes `null` and counts as a transform warning.

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

/// [`finite`] for nullable floats.
pub(crate) fn finite_opt<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(v) if v.is_finite() => s.serialize_f64(*v),
        _ => s.serialize_none(),
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
    pub fn check(name: &str, record: &Record) {
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
    pub fn keys(v: &serde_json::Value, out: &mut Vec<String>) {
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
        let records = [
            customer::transform(customer::tests::row()).0,
            officer::transform(officer::tests::row()).0,
            loan::transform(loan::tests::row()).0,
            repayment::transform(repayment::tests::row()).0,
        ];
        for r in &records {
            let v: serde_json::Value = serde_json::from_str(r.json.get()).unwrap();
            let mut all = Vec::new();
            golden::keys(&v, &mut all);
            assert!(all.len() > 10, "suspiciously few keys: {all:?}");
            for k in NEVER_SEND {
                assert!(!all.iter().any(|a| a == k), "record {} carries {k}", r.id);
            }
            assert_eq!(v["id"], serde_json::json!(r.id));
        }
    }

    #[test]
    fn non_finite_floats_become_null() {
        #[derive(Serialize)]
        struct T {
            #[serde(serialize_with = "finite")]
            a: f64,
            #[serde(serialize_with = "finite_opt")]
            b: Option<f64>,
            #[serde(serialize_with = "finite")]
            c: f64,
        }
        let r = encode(
            1,
            &T {
                a: f64::NAN,
                b: Some(f64::NEG_INFINITY),
                c: 2.5,
            },
        );
        assert_eq!(r.json.get(), r#"{"a":null,"b":null,"c":2.5}"#);
        assert_eq!(non_finite(&[f64::NAN, f64::INFINITY, 1.0]), 2);
    }
}
