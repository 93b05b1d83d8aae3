-- `ledger::pending_requests` (lifecycle.rs).
SELECT request_id, CASE WHEN sweep THEN 'sweep' ELSE sync_type::text END AS kind, received_at, since
FROM loansync_request WHERE state = 'pending' ORDER BY received_at, request_id
