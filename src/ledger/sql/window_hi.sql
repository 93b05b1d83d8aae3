-- The end of a new sync's window: the database's now(), capped at the start of the oldest
-- transaction of this database still open that may still commit rows (SPEC.md section 2).
-- * A session whose `xact_start` this role can read (superuser, pg_read_all_stats, or the
--   same role) caps at that start, whether it has written yet or not: a transaction that
--   reads first and writes `now()` (its start) later is caught. Client backends only,
--   in a transaction (state not idle), this session excepted. loansync's own sessions
--   count too: their transactions are short, and a session can claim any
--   application_name.
-- * Any other session of this database with a transaction id, and every prepared
--   transaction of this database (`pg_prepared_xacts`: no start is recorded for those,
--   and `prepared` is later than the transaction's writes), is bounded with the xid
--   clock: the newest sample whose transaction id is older than the open one was taken
--   before that transaction's first write. Every role can read `backend_xid` and
--   `pg_prepared_xacts`.
-- Columns: now, the oldest start read (NULL: none), the oldest age of a transaction known
-- by its id only (NULL: none), its cap (NULL: no sample is older than it), the oldest
-- sample's time.
WITH open AS (
    SELECT CASE WHEN backend_type = 'client backend' AND state <> 'idle' THEN xact_start END
               AS started,
           backend_xid
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND (xact_start IS NOT NULL OR backend_xid IS NOT NULL)
),
by_xid AS (
    SELECT max(age(xid)) AS oldest_age
    FROM (SELECT backend_xid AS xid FROM open WHERE started IS NULL AND backend_xid IS NOT NULL
          UNION ALL
          SELECT transaction FROM pg_prepared_xacts WHERE database = current_database()) x
)
SELECT now(),
       (SELECT min(started) FROM open),
       by_xid.oldest_age,
       (SELECT c.at FROM loansync_xid_clock c
        WHERE age(c.xid32) > by_xid.oldest_age
        ORDER BY c.xid DESC LIMIT 1),
       (SELECT min(at) FROM loansync_xid_clock)
FROM by_xid
