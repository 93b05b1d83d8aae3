-- Officers, full and incremental alike: agents of every kind by user_type, never filtered by
-- account_type, no time filter (the table has no modification time). $1 after, $2 limit,
-- $5 the last id (of a part of the plan).
SELECT u.id::int8 AS id FROM accounts_customuser u
WHERE u.user_type IN ('AGENT', 'STAFF_AGENT', 'PROSPER_AGENT', 'DMO_AGENT', 'AJO_AGENT', 'RECOVERY_AGENT')
  AND u.id > $1 AND u.id <= $5
ORDER BY u.id LIMIT $2
