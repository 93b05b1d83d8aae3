-- The sweep (SPEC.md section 2): what timestamps cannot show (updates that bypass
-- auto_now, deletes) is found by comparing fingerprints of what was delivered with the
-- source.

-- What the analytics platform holds: per entity and id, the fingerprint (md5 of every
-- column the record is built from, as a uuid: 16 bytes) of the last record it accepted.
-- Written in the transaction that settles the chunk, for accepted records only.
CREATE TABLE loansync_delivered (
    entity        varchar(20)  NOT NULL,
    id            int8         NOT NULL,
    fingerprint   uuid         NOT NULL,
    sync_id       varchar(100) NOT NULL,
    delivered_at  timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, id)
);

-- Delivered ids a sweep found gone from the source, or no longer selected (a customer
-- whose onboarding was undone, a loan no longer disbursed). Not sent: the API has no
-- delete. A row that comes back and is delivered again leaves this table.
CREATE TABLE loansync_deleted (
    entity       varchar(20)  NOT NULL,
    id           int8         NOT NULL,
    detected_at  timestamptz  NOT NULL DEFAULT now(),
    sync_id      varchar(100) NOT NULL,
    PRIMARY KEY (entity, id)
);

-- A sweep moves no watermark; loansync's records say which kind of sync it was (the
-- history row says `incremental`).
ALTER TABLE loansync_sync DROP CONSTRAINT loansync_sync_purpose_check;
ALTER TABLE loansync_sync ADD CONSTRAINT loansync_sync_purpose_check
    CHECK (purpose IN ('sync', 'retry', 'backfill', 'sweep'));

-- A pending sweep is a kind of its own: never merged with other requests.
ALTER TABLE loansync_request ADD COLUMN sweep boolean NOT NULL DEFAULT false;
