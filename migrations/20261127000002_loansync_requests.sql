-- Every planning request loansync has received, so that none is lost: a request that
-- arrives while another sync is planning or running is kept here ('pending') and planned
-- when the slot frees; pending requests coalesce when planned (SPEC.md section 2).
CREATE TABLE loansync_request (
    request_id   text         PRIMARY KEY,
    sync_type    varchar(20)  NOT NULL CHECK (sync_type IN ('full', 'incremental')),
    entities     text[]       NOT NULL,
    -- A backfill: a bounded window that moves no watermark (`trigger --since/--until`).
    since        timestamptz,
    until        timestamptz,
    state        text         NOT NULL CHECK (state IN ('pending', 'planned')),
    -- The sync that served it, once planned (coalesced requests share one).
    sync_id      varchar(100) REFERENCES loansync_sync (sync_id) ON DELETE SET NULL,
    received_at  timestamptz  NOT NULL DEFAULT now(),
    planned_at   timestamptz
);
CREATE INDEX loansync_request_pending ON loansync_request (received_at) WHERE state = 'pending';

-- Requests already served before this table existed keep answering "nothing new".
INSERT INTO loansync_request (request_id, sync_type, entities, state, sync_id, received_at, planned_at)
SELECT request_id, sync_type, entities, 'planned', sync_id, created_at, created_at
FROM loansync_sync WHERE request_id IS NOT NULL;

-- The pending requests, one row each (the `etl_pending_requests` gauge counts them).
CREATE VIEW loansync_pending_request AS
SELECT request_id, sync_type, entities, since, until, received_at
FROM loansync_request WHERE state = 'pending';

-- A backfill moves no watermark either; loansync's records say which kind of sync it was.
ALTER TABLE loansync_sync DROP CONSTRAINT loansync_sync_purpose_check;
ALTER TABLE loansync_sync ADD CONSTRAINT loansync_sync_purpose_check
    CHECK (purpose IN ('sync', 'retry', 'backfill'));
ALTER TABLE loansync_sync ADD COLUMN since timestamptz;
