-- `ledger::lifecycle::request_state`: a planning request, its sync and that sync's state.
SELECT r.state AS req_state, r.sync_id::text AS sync_id, s.state AS sync_state
FROM loansync_request r
LEFT JOIN loansync_sync s USING (sync_id)
WHERE r.request_id = $1
