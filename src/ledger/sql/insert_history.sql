-- A new sync's history row. Django set no database defaults: every NOT NULL column is named.
INSERT INTO etl_folder_etlsynchistory (
    sync_id, sync_type, status, started_at, completed_at, sync_start_date, sync_end_date,
    total_loans, total_repayments, total_customers, total_officers,
    loans_success, loans_failed, repayments_success, repayments_failed,
    customers_success, customers_failed, officers_success, officers_failed,
    api_response, error_message, duration_seconds
) VALUES (
    $1, $2, 'pending', now(), NULL, NULL, NULL,
    0, 0, 0, 0,
    0, 0, 0, 0,
    0, 0, 0, 0,
    NULL, NULL, NULL
)
