-- Loans, full sync: disbursed ones.
SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed AND id > $1 ORDER BY id LIMIT $2
