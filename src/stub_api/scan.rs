//! Reads a request body the way the stub needs it (the envelope's fields, each record's
//! id, and whether any key at any depth is on the never-send list) without building a
//! `serde_json::Value` of the records: on a shared machine the stub's parsing costs as
//! much CPU as loansync itself (bench/REPORT.md).

use crate::transform::NEVER_SEND;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The scalar arms of a visitor: every JSON scalar reads as `$v`.
macro_rules! scalars {
    ($v:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($v)
        }
    };
}

/// The envelope; a field of the wrong type reads as `None`, as a missing one does.
#[derive(Deserialize)]
pub(crate) struct Envelope {
    #[serde(default)]
    pub sync_id: Value,
    #[serde(default)]
    pub sync_type: Value,
    #[serde(default)]
    pub entity_type: Value,
    #[serde(default)]
    pub chunk: Value,
    #[serde(default)]
    pub records: Records,
}

/// `records`: an array of scanned records, or anything else.
#[derive(Default)]
pub(crate) enum Records {
    #[default]
    NotAnArray,
    Array(Vec<Record>),
}

/// One record: its integer `id` when it is an object that has one, and whether it
/// carries a never-send key anywhere inside.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Record {
    pub is_object: bool,
    pub id: Option<i64>,
    pub forbidden: bool,
}

impl<'de> Deserialize<'de> for Records {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Records;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("records")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Records, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(256));
                while let Some(r) = seq.next_element::<Record>()? {
                    out.push(r);
                }
                Ok(Records::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Records, A::Error> {
                Forbidden::visit_map(map)?;
                Ok(Records::NotAnArray)
            }
            scalars!(Records::NotAnArray);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Record;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
                let mut r = Record {
                    is_object: true,
                    ..Record::default()
                };
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    match key {
                        Key::Id => r.id = map.next_value::<Value>()?.as_i64(),
                        Key::NeverSend => {
                            r.forbidden = true;
                            map.next_value::<de::IgnoredAny>()?;
                        }
                        Key::Other => r.forbidden |= map.next_value::<Forbidden>()?.0,
                    }
                }
                Ok(r)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Record, A::Error> {
                Ok(Record {
                    forbidden: Forbidden::visit_seq(seq)?,
                    ..Record::default()
                })
            }
            scalars!(Record::default());
        }
        d.deserialize_any(V)
    }
}

/// Any value, read only for whether a never-send key sits anywhere inside it.
struct Forbidden(bool);

impl Forbidden {
    fn visit_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            found |= key == Key::NeverSend;
            found |= map.next_value::<Forbidden>()?.0;
        }
        Ok(found)
    }

    fn visit_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(v) = seq.next_element::<Forbidden>()? {
            found |= v.0;
        }
        Ok(found)
    }
}

impl<'de> Deserialize<'de> for Forbidden {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Forbidden;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Forbidden, A::Error> {
                Forbidden::visit_map(map).map(Forbidden)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Forbidden, A::Error> {
                Forbidden::visit_seq(seq).map(Forbidden)
            }
            scalars!(Forbidden(false));
        }
        d.deserialize_any(V)
    }
}

/// What a map key is, read without allocating it (unless it holds escapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Id,
    NeverSend,
    Other,
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(if k == "id" {
                    Key::Id
                } else if NEVER_SEND.contains(&k) {
                    Key::NeverSend
                } else {
                    Key::Other
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(body: &str) -> Vec<Record> {
        match serde_json::from_str::<Envelope>(body).unwrap().records {
            Records::Array(r) => r,
            Records::NotAnArray => panic!("not an array"),
        }
    }

    /// The old check, on a `Value`: the scanner must agree with it.
    fn has_forbidden_key(v: &Value) -> bool {
        match v {
            Value::Object(m) => m
                .iter()
                .any(|(k, v)| NEVER_SEND.contains(&k.as_str()) || has_forbidden_key(v)),
            Value::Array(a) => a.iter().any(has_forbidden_key),
            _ => false,
        }
    }

    #[test]
    fn ids_and_never_send_keys_at_any_depth() {
        let records = [
            r#"{"id": 1, "name": "Ọlá", "bucket": [{"x": 1}], "n": null}"#,
            r#"{"id": 2, "pin": "1234"}"#,
            r#"{"id": 3, "nested": {"deeper": [{"bvn": "1"}]}}"#,
            r#"{"id": "4"}"#,
            r#"{"id": 5.5}"#,
            r#"{"name": "no id"}"#,
            r#"[{"pin": 1}]"#,
            r#"7"#,
            r#"{"id": 8, "p\u0069n": "escaped key"}"#,
            r#"{"id": 9, "text": "\"pin\": not a key"}"#,
        ];
        let body = format!(
            r#"{{"sync_id":"s","sync_type":"full","entity_type":"loan","chunk":0,"records":[{}]}}"#,
            records.join(",")
        );
        let got = scan(&body);
        assert_eq!(got.len(), records.len());
        for (r, raw) in got.iter().zip(records) {
            let v: Value = serde_json::from_str(raw).unwrap();
            let expected = Record {
                is_object: v.is_object(),
                id: v
                    .as_object()
                    .and_then(|o| o.get("id"))
                    .and_then(Value::as_i64),
                forbidden: has_forbidden_key(&v),
            };
            assert_eq!(r, &expected, "{raw}");
        }
    }

    #[test]
    fn odd_envelopes_read_as_missing_fields() {
        let e: Envelope = serde_json::from_str(r#"{"sync_id": 5, "records": {"pin": 1}}"#).unwrap();
        assert!(e.sync_id.as_str().is_none());
        assert!(matches!(e.records, Records::NotAnArray));
        assert!(e.chunk.is_null());
        assert!(serde_json::from_str::<Envelope>(r#"{"records":[{"id":1}"#).is_err());
    }
}
