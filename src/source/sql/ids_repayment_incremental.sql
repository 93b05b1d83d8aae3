-- Repayments, incremental sync: created in [$3, $4).
SELECT id::int8 FROM loans_ajoloanrepayment
WHERE date_created >= $3 AND date_created < $4 AND id > $1
ORDER BY id LIMIT $2
