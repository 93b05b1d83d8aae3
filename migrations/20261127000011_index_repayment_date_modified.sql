-- no-transaction
-- Incremental syncs select repayments modified in the window (by id), and loans with a
-- repayment modified in the window (by ajo_loan_id, carried in the index so both come from
-- it alone). Built CONCURRENTLY.
CREATE INDEX CONCURRENTLY IF NOT EXISTS loansync_repayment_date_modified ON loans_ajoloanrepayment (date_modified, id) INCLUDE (ajo_loan_id)
