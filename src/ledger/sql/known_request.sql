-- A planning request the ledger knows: its state, its sync and that sync's state.
SELECT r.state AS req_state, r.sync_id::text AS sync_id, s.state AS sync_state, s.window_hi
FROM loansync_request r
LEFT JOIN loansync_sync s USING (sync_id)
WHERE r.request_id = $1
