-- Officers: agents of every kind, never filtered by account_type; no time filter.
SELECT id::int8 FROM accounts_customuser
WHERE user_type IN ('AGENT', 'STAFF_AGENT', 'PROSPER_AGENT', 'DMO_AGENT', 'AJO_AGENT', 'RECOVERY_AGENT')
  AND id > $1
ORDER BY id LIMIT $2
