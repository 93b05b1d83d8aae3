-- Repayments, full sync: all rows. $1 after, $2 limit.
SELECT p.id::int8 AS id FROM loans_ajoloanrepayment p
WHERE p.id > $1
ORDER BY p.id LIMIT $2
