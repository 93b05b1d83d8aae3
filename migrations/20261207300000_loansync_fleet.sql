-- Adaptive concurrency across the worker fleet (README "Adaptive concurrency").
--
-- loansync_api_pause: one row, the analytics API's pause for every worker. Written only
-- when a worker meets backpressure (a Retry-After, a burst of 429s), read by each worker
-- at most every 250 ms while it has requests to send; never a row per request.
CREATE TABLE IF NOT EXISTS loansync_api_pause (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    paused_until timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00'
);
INSERT INTO loansync_api_pause (id) VALUES (1) ON CONFLICT (id) DO NOTHING;

-- loansync_worker: the live workers, one row each, written every ETL_WORKER_HEARTBEAT_SECS
-- with the worker's limit, requests in flight, share of ANALYTICS_MAX_IN_FLIGHT and the
-- API's RTT as it sees them. A row older than three heartbeats is a gone worker: its
-- share is freed; `loansync status` shows the live rows.
CREATE TABLE IF NOT EXISTS loansync_worker (
    worker_id text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    beat_at timestamptz NOT NULL DEFAULT now(),
    -- beat_at + three heartbeat periods: after it the worker is gone.
    expires_at timestamptz NOT NULL,
    mode text NOT NULL,
    concurrency_limit integer NOT NULL,
    in_flight integer NOT NULL,
    fleet_share integer,
    rtt_ms double precision
);
