-- One sample of the xid clock: this transaction's id and its start time. Samples older
-- than a week are dropped, except the newest of them, which stays as an anchor for a
-- transaction open that long.
WITH sample AS (
    INSERT INTO loansync_xid_clock (xid, xid32, at)
    SELECT pg_current_xact_id(), (pg_current_xact_id()::text::bigint % 4294967296)::text::xid, now()
    ON CONFLICT (xid) DO NOTHING
)
DELETE FROM loansync_xid_clock
WHERE at < now() - interval '7 days'
  AND xid < (SELECT max(xid) FROM loansync_xid_clock WHERE at < now() - interval '7 days')
