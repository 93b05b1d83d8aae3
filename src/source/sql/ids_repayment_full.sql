-- Repayments, full sync: all rows.
SELECT id::int8 FROM loans_ajoloanrepayment WHERE id > $1 ORDER BY id LIMIT $2
