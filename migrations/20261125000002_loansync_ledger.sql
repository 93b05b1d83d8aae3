-- loansync's own bookkeeping. The Django application never reads these tables.

-- One row per sync loansync has planned (or is planning).
CREATE TABLE loansync_sync (
    sync_id          varchar(100) PRIMARY KEY REFERENCES etl_folder_etlsynchistory (sync_id) DEFERRABLE INITIALLY DEFERRED,
    -- The planning message's request_id: a repeated one plans nothing new.
    request_id       text UNIQUE,
    sync_type        varchar(20)  NOT NULL CHECK (sync_type IN ('full', 'incremental')),
    -- 'sync' moves watermarks; 'retry' re-delivers unresolved error rows and moves none.
    purpose          text         NOT NULL DEFAULT 'sync' CHECK (purpose IN ('sync', 'retry')),
    entities         text[]       NOT NULL,
    -- 'planning' until the ledger is written, 'running' while chunks are out, 'done' after finalization.
    state            text         NOT NULL CHECK (state IN ('planning', 'running', 'done')),
    -- Upper bound of every entity's window (exclusive).
    window_hi        timestamptz  NOT NULL,
    chunks_total     integer      NOT NULL DEFAULT 0,
    chunks_remaining integer      NOT NULL DEFAULT 0,
    created_at       timestamptz  NOT NULL DEFAULT now(),
    -- Moves whenever a chunk settles; a running sync whose progress is old is stalled.
    last_progress_at timestamptz  NOT NULL DEFAULT now()
);

-- At most one sync is planning or running at a time, whichever process planned it.
CREATE UNIQUE INDEX loansync_sync_one_active ON loansync_sync ((true)) WHERE state <> 'done';

-- Each entity's window in a sync.
CREATE TABLE loansync_sync_entity (
    sync_id    varchar(100) NOT NULL REFERENCES loansync_sync (sync_id) ON DELETE CASCADE,
    entity     varchar(20)  NOT NULL,
    window_lo  timestamptz,            -- NULL: a full sync, no lower bound
    window_hi  timestamptz  NOT NULL,
    planned    integer      NOT NULL DEFAULT 0,
    PRIMARY KEY (sync_id, entity)
);

-- The chunk ledger: every chunk of every sync, its ids and how it settled.
CREATE TABLE loansync_chunk (
    sync_id     varchar(100) NOT NULL REFERENCES loansync_sync (sync_id) ON DELETE CASCADE,
    entity      varchar(20)  NOT NULL,
    seq         integer      NOT NULL,
    ids         bigint[]     NOT NULL,
    -- NULL while unsettled; set exactly once, in the transaction that adds to the counters.
    settled_at  timestamptz,
    -- 'delivered' (sent; see succeeded/failed), 'aborted' (not sent: the sync failed fatally).
    outcome     text CHECK (outcome IN ('delivered', 'aborted', 'dead')),
    succeeded   integer,
    failed      integer,
    -- How many times a worker started on this chunk (deliveries that reached the ledger).
    attempts    integer      NOT NULL DEFAULT 0,
    PRIMARY KEY (sync_id, entity, seq)
);

CREATE INDEX loansync_chunk_unsettled ON loansync_chunk (sync_id) WHERE settled_at IS NULL;
