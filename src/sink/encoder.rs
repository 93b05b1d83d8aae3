//! Records → request bodies. The records were encoded once by the transformer; here
//! they are only concatenated into the envelope.

use crate::domain::{EntityKind, Record, SyncType};

/// The body of one POST: `{"sync_id","sync_type","entity_type","chunk","records":[…]}`.
pub fn body(
    sync_id: &str,
    sync_type: SyncType,
    entity: EntityKind,
    chunk: i32,
    records: &[Record],
) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.json.get().len() + 1).sum();
    let mut out = Vec::with_capacity(size + 160);
    out.extend_from_slice(b"{\"sync_id\":");
    // A string always serializes.
    out.extend_from_slice(
        serde_json::to_string(sync_id)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b",\"sync_type\":\"");
    out.extend_from_slice(sync_type.as_str().as_bytes());
    out.extend_from_slice(b"\",\"entity_type\":\"");
    out.extend_from_slice(entity.as_str().as_bytes());
    out.extend_from_slice(b"\",\"chunk\":");
    out.extend_from_slice(chunk.to_string().as_bytes());
    out.extend_from_slice(b",\"records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r.json.get().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// Gzips a body (`ANALYTICS_GZIP`) at the fastest level: JSON of this shape shrinks
/// several times over even there, and a worker's CPU is better spent elsewhere.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    enc.write_all(body).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// The `Idempotency-Key` of a body: names the sync, the entity and the records the body
/// carries with their content, never their positions in the chunk. The same on every
/// retry of the same body; two bodies carrying different sets of records never share
/// it, even when a row deleted between two attempts of a chunk shifts the records of a
/// halved part; and a record whose row changed between two attempts of a chunk gives a
/// new key, so an API that replays the answer it gave a key never answers a new body
/// with the old one (loansync would then record as delivered content the API never got).
///
/// The content is each record's fingerprint ([`Record::fingerprint`], 16 bytes): its
/// row's values, hashed once when the row was loaded, so the key costs 24 bytes of
/// hashing per record whatever the record's size, and no allocation but the key's.
///
/// `<sync_id>:<entity>:<first id>-<last id>:<count>:<sha256 of the ids and fingerprints, hex>`,
/// the hash over each record's id (big-endian i64) followed by its fingerprint's bytes,
/// in the body's order.
pub fn idempotency_key(sync_id: &str, entity: EntityKind, records: &[Record]) -> String {
    use sha2::Digest;
    use std::fmt::Write;
    let mut hash = sha2::Sha256::new();
    let mut item = [0u8; 24];
    for r in records {
        item[..8].copy_from_slice(&r.id.to_be_bytes());
        item[8..].copy_from_slice(r.fingerprint.as_bytes());
        hash.update(item);
    }
    let first = records.first().map_or(0, |r| r.id);
    let last = records.last().map_or(0, |r| r.id);
    let mut key = format!("{sync_id}:{entity}:{first}-{last}:{}:", records.len());
    for b in hash.finalize() {
        // Writing to a String cannot fail.
        let _ = write!(key, "{b:02x}");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i64) -> Record {
        Record {
            id,
            fingerprint: uuid::Uuid::from_u128(id as u128),
            changed_at: None,
            json: crate::domain::RecordJson::encode(&serde_json::json!({"id": id, "n": "é"}))
                .unwrap(),
        }
    }

    #[test]
    fn body_is_the_documented_envelope() {
        let b = body(
            "s-1",
            SyncType::Full,
            EntityKind::Loan,
            3,
            &[rec(1), rec(2)],
        );
        assert_eq!(
            String::from_utf8(b).unwrap(),
            r#"{"sync_id":"s-1","sync_type":"full","entity_type":"loan","chunk":3,"records":[{"id":1,"n":"é"},{"id":2,"n":"é"}]}"#
        );
        let empty = body("s", SyncType::Incremental, EntityKind::Officer, 0, &[]);
        let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
        assert_eq!(v["records"], serde_json::json!([]));
    }

    #[test]
    fn gzip_round_trips_and_shrinks_a_body() {
        use std::io::Read;
        let records: Vec<Record> = (0..200).map(rec).collect();
        let plain = body("s-1", SyncType::Full, EntityKind::Loan, 0, &records);
        let packed = gzip(&plain);
        assert_eq!(&packed[..2], &[0x1f, 0x8b], "gzip magic");
        assert!(
            packed.len() * 4 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, plain);
    }

    #[test]
    fn idempotency_key_names_the_records_not_their_positions() {
        let recs: Vec<Record> = (1..=5).map(rec).collect();
        let key = idempotency_key("s", EntityKind::Repayment, &recs);
        // Each id as big-endian i64 then its fingerprint's 16 bytes, hashed with SHA-256
        // (checked against Python's hashlib).
        assert_eq!(
            key,
            "s:repayment:1-5:5:744c0c2f00fdddf6ae54650723e1f534e9874bfc48db2df56859ab637b375168"
        );
        // The same records: the same key, whatever else the body says.
        assert_eq!(key, idempotency_key("s", EntityKind::Repayment, &recs));
        // Another set of records with the same count, first and last id.
        let other: Vec<Record> = [1, 2, 4, 4, 5].into_iter().map(rec).collect();
        assert_ne!(key, idempotency_key("s", EntityKind::Repayment, &other));
        // A row deleted: the part at the same positions names other records.
        let shifted: Vec<Record> = (2..=6).map(rec).collect();
        assert_ne!(
            idempotency_key("s", EntityKind::Repayment, &recs[..2]),
            idempotency_key("s", EntityKind::Repayment, &shifted[..2])
        );
        assert_ne!(key, idempotency_key("s", EntityKind::Loan, &recs));
        assert_ne!(key, idempotency_key("t", EntityKind::Repayment, &recs));
    }

    #[test]
    fn idempotency_key_follows_the_records_content() {
        let recs: Vec<Record> = (1..=5).map(rec).collect();
        let key = idempotency_key("s", EntityKind::Loan, &recs);
        // A retry of the same body (the records loaded again, unchanged): the same key.
        let again: Vec<Record> = (1..=5).map(rec).collect();
        assert_eq!(key, idempotency_key("s", EntityKind::Loan, &again));
        // One record's row changed between two attempts: a new key, for the whole body
        // and for every part that carries the record, and only those.
        let mut changed = again.clone();
        changed[2].fingerprint = uuid::Uuid::from_u128(99);
        let new = idempotency_key("s", EntityKind::Loan, &changed);
        assert_ne!(key, new);
        assert!(new.starts_with("s:loan:1-5:5:"), "{new}");
        assert_ne!(
            idempotency_key("s", EntityKind::Loan, &recs[2..]),
            idempotency_key("s", EntityKind::Loan, &changed[2..])
        );
        assert_eq!(
            idempotency_key("s", EntityKind::Loan, &recs[..2]),
            idempotency_key("s", EntityKind::Loan, &changed[..2])
        );
        // Fingerprints swapped between two records: other content, another key.
        let mut swapped = again.clone();
        swapped[0].fingerprint = recs[1].fingerprint;
        swapped[1].fingerprint = recs[0].fingerprint;
        assert_ne!(key, idempotency_key("s", EntityKind::Loan, &swapped));
    }
}
