-- The end of a new sync's window: the database's now(), capped at the start of the oldest
-- transaction of this database that is still open and has written (SPEC.md section 2).
-- Every role can read other sessions' `backend_xid` (not their `xact_start`), so the start
-- is bounded with the xid clock: the newest sample whose transaction id is older than the
-- open one was taken before that transaction's first write.
-- Columns: now, the oldest open transaction's age (NULL: none open), the cap (NULL: no
-- sample is older than it), the oldest sample's time.
WITH open AS (
    SELECT max(age(backend_xid)) AS oldest_age
    FROM pg_stat_activity
    WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()
)
SELECT now(),
       open.oldest_age,
       (SELECT c.at FROM loansync_xid_clock c
        WHERE age(c.xid32) > open.oldest_age
        ORDER BY c.xid DESC LIMIT 1),
       (SELECT min(at) FROM loansync_xid_clock)
FROM open
