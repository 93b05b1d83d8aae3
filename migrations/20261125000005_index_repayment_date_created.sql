-- no-transaction
-- Incremental syncs select repayments by date_created (built CONCURRENTLY).
CREATE INDEX CONCURRENTLY IF NOT EXISTS loansync_repayment_date_created ON loans_ajoloanrepayment (date_created, id)
