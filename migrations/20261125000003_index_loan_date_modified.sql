-- no-transaction
-- Incremental syncs select loans by date_modified: an index, built without locking the
-- table against Django's writes. (A build that fails leaves an INVALID index: drop it and
-- run loansync migrate again.)
CREATE INDEX CONCURRENTLY IF NOT EXISTS loansync_loan_date_modified ON loans_ajoloan (date_modified, id)
