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
//! Records are serialized from plain structs straight into their JSON text
//! ([`RecordJson`]): no intermediate `serde_json::Value` on the hot path.

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

use crate::domain::{Record, RecordJson};
use chrono::{DateTime, NaiveDate, Utc};
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

/// A timestamp exactly as chrono's serde writes it (`to_rfc3339_opts(SecondsFormat::AutoSi,
/// true)`: `2026-11-28T04:31:34Z`, a fraction of 3, 6 or 9 digits only when there is
/// one), formatted in one pass into a stack buffer and written as one string. chrono's
/// own goes through `core::fmt` a few characters at a time, each piece escaped apart by
/// serde_json: a fifth of a loan's encoding. Years outside 0000-9999 and leap seconds,
/// which chrono writes differently, are left to chrono. A test compares the two.
pub(crate) fn timestamp<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 30];
    match format_timestamp(t, &mut buf) {
        Some(n) => s.serialize_str(ascii(&buf[..n])),
        None => t.serialize(s),
    }
}

pub(crate) fn opt_timestamp<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => timestamp(t, s),
        None => s.serialize_none(),
    }
}

/// A date as chrono's serde writes it (`2026-11-28`), as [`timestamp`] does.
pub(crate) fn date<S: Serializer>(d: &NaiveDate, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 10];
    if write_date(d, &mut buf) {
        s.serialize_str(ascii(&buf))
    } else {
        d.serialize(s)
    }
}

pub(crate) fn opt_date<S: Serializer>(d: &Option<NaiveDate>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => date(d, s),
        None => s.serialize_none(),
    }
}

fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("digits and separators are ASCII")
}

/// Writes `n` as `buf.len()` decimal digits, zero-padded.
fn digits(buf: &mut [u8], mut n: u32) {
    for b in buf.iter_mut().rev() {
        *b = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `YYYY-MM-DD` into `buf`; false for a year chrono writes with a sign.
fn write_date(d: &NaiveDate, buf: &mut [u8; 10]) -> bool {
    use chrono::Datelike;
    let Ok(year) = u32::try_from(d.year()) else {
        return false;
    };
    if year > 9999 {
        return false;
    }
    digits(&mut buf[0..4], year);
    buf[4] = b'-';
    digits(&mut buf[5..7], d.month());
    buf[7] = b'-';
    digits(&mut buf[8..10], d.day());
    true
}

/// The timestamp into `buf`, its length; `None` where chrono's form differs.
fn format_timestamp(t: &DateTime<Utc>, buf: &mut [u8; 30]) -> Option<usize> {
    use chrono::Timelike;
    let naive = t.naive_utc();
    let nanos = naive.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut date = [0u8; 10];
    if !write_date(&naive.date(), &mut date) {
        return None;
    }
    buf[..10].copy_from_slice(&date);
    buf[10] = b'T';
    digits(&mut buf[11..13], naive.hour());
    buf[13] = b':';
    digits(&mut buf[14..16], naive.minute());
    buf[16] = b':';
    digits(&mut buf[17..19], naive.second());
    let mut n = 19;
    let (value, width) = if nanos == 0 {
        (0, 0)
    } else if nanos.is_multiple_of(1_000_000) {
        (nanos / 1_000_000, 3)
    } else if nanos.is_multiple_of(1_000) {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if width > 0 {
        buf[n] = b'.';
        digits(&mut buf[n + 1..n + 1 + width], value);
        n += 1 + width;
    }
    buf[n] = b'Z';
    Some(n + 1)
}

/// How many of these values will be sent as `null` for being NaN or infinite.
pub(crate) fn non_finite(values: &[f64]) -> u32 {
    values.iter().filter(|v| !v.is_finite()).count() as u32
}

/// Encodes a record (its fingerprint is set by the loader that read the row).
/// Serializing these plain structs cannot fail; should it ever, the record is sent as
/// `{"id": id}` rather than crashing a worker.
pub(crate) fn encode<T: Serialize>(id: i64, value: &T) -> Record {
    let json = RecordJson::encode(value).unwrap_or_else(|e| {
        tracing::error!(id, error = %e, "record could not be encoded");
        RecordJson::encode(&serde_json::json!({ "id": id })).expect("a literal object encodes")
    });
    Record {
        id,
        fingerprint: uuid::Uuid::nil(),
        changed_at: None,
        json,
    }
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

    /// The records' own timestamp and date writers give exactly chrono's serde text,
    /// fractions of every length, the edges of the years they handle, the years and
    /// leap seconds they leave to chrono, and 20,000 instants drawn at random.
    #[test]
    fn timestamps_and_dates_are_written_as_chrono_writes_them() {
        use chrono::{DateTime, NaiveDate, TimeZone, Utc};
        #[derive(Serialize)]
        struct Ours {
            #[serde(serialize_with = "timestamp")]
            t: DateTime<Utc>,
            #[serde(serialize_with = "opt_timestamp")]
            o: Option<DateTime<Utc>>,
            #[serde(serialize_with = "date")]
            d: NaiveDate,
            #[serde(serialize_with = "opt_date")]
            od: Option<NaiveDate>,
        }
        #[derive(Serialize)]
        struct Chrono {
            t: DateTime<Utc>,
            o: Option<DateTime<Utc>>,
            d: NaiveDate,
            od: Option<NaiveDate>,
        }
        let check = |t: DateTime<Utc>, none: bool| {
            let (o, od) = if none {
                (None, None)
            } else {
                (Some(t), Some(t.date_naive()))
            };
            let d = t.date_naive();
            let ours = serde_json::to_string(&Ours { t, o, d, od }).unwrap();
            let chrono = serde_json::to_string(&Chrono { t, o, d, od }).unwrap();
            assert_eq!(ours, chrono, "{t:?}");
        };
        let mut cases = 0;
        for year in [-1, 0, 1, 999, 1970, 2026, 9999, 10000, 262_000] {
            for nanos in [
                0,
                1,
                999,
                1_000,
                120_000,
                1_000_000,
                123_000_000,
                123_456_000,
                123_456_789,
                999_999_999,
            ] {
                let t = Utc.with_ymd_and_hms(year, 12, 31, 23, 59, 59).unwrap()
                    + chrono::Duration::nanoseconds(nanos);
                check(t, cases % 2 == 0);
                cases += 1;
            }
        }
        // A leap second: chrono keeps it as a nanosecond count past 999,999,999.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        check(leap, false);
        let mut rng = fastrand::Rng::with_seed(12);
        for i in 0..20_000 {
            let secs = rng.i64(-62_135_596_800..253_402_300_799);
            let nanos = match i % 4 {
                0 => 0,
                1 => rng.u32(0..1000) * 1_000_000,
                2 => rng.u32(0..1_000_000) * 1_000,
                _ => rng.u32(0..1_000_000_000),
            };
            check(DateTime::from_timestamp(secs, nanos).unwrap(), i % 3 == 0);
        }
    }
}
