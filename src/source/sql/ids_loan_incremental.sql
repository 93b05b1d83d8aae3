-- Loans, incremental sync: modified in [$3, $4), whatever their disbursement.
SELECT id::int8 FROM loans_ajoloan
WHERE date_modified >= $3 AND date_modified < $4 AND id > $1
ORDER BY id LIMIT $2
