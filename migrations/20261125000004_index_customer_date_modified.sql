-- no-transaction
-- Incremental syncs select onboarded customers by date_modified (built CONCURRENTLY).
CREATE INDEX CONCURRENTLY IF NOT EXISTS loansync_customer_date_modified ON ajo_ajouser (date_modified, id) WHERE onboarding_complete
