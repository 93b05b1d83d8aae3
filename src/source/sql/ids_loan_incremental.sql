-- Loans, incremental sync: modified in [$3, $4), whatever their disbursement; a NULL $3 is
-- no lower bound (COALESCE keeps the bound sargable). $1 after, $2 limit.
SELECT l.id::int8 AS id FROM loans_ajoloan l
WHERE l.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
  AND l.date_modified < $4::timestamptz
  AND l.id > $1
ORDER BY l.id LIMIT $2
