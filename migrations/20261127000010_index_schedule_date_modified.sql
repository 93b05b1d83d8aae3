-- no-transaction
-- Incremental syncs select a loan whose schedule row was modified in the window (its
-- `schedule` aggregate changed): the window's schedule rows, and their loan ids, from the
-- index alone (built CONCURRENTLY: Django keeps writing).
CREATE INDEX CONCURRENTLY IF NOT EXISTS loansync_schedule_date_modified ON loans_ajoloanschedule (date_modified, loan_id)
