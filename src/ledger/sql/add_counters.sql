-- Adds one chunk's outcome to its entity's counters ($2 names the entity).
UPDATE etl_folder_etlsynchistory SET
    loans_success      = loans_success      + CASE WHEN $2 = 'loan'      THEN $3 ELSE 0 END,
    loans_failed       = loans_failed       + CASE WHEN $2 = 'loan'      THEN $4 ELSE 0 END,
    repayments_success = repayments_success + CASE WHEN $2 = 'repayment' THEN $3 ELSE 0 END,
    repayments_failed  = repayments_failed  + CASE WHEN $2 = 'repayment' THEN $4 ELSE 0 END,
    customers_success  = customers_success  + CASE WHEN $2 = 'customer'  THEN $3 ELSE 0 END,
    customers_failed   = customers_failed   + CASE WHEN $2 = 'customer'  THEN $4 ELSE 0 END,
    officers_success   = officers_success   + CASE WHEN $2 = 'officer'   THEN $3 ELSE 0 END,
    officers_failed    = officers_failed    + CASE WHEN $2 = 'officer'   THEN $4 ELSE 0 END,
    api_response       = COALESCE($5::jsonb, api_response)
WHERE sync_id = $1
