-- Repayments, full sync: all rows. $1 after, $2 limit, $5 the last id (of a part of the
-- plan).
SELECT p.id::int8 AS id FROM loans_ajoloanrepayment p
WHERE p.id > $1 AND p.id <= $5
ORDER BY p.id LIMIT $2
