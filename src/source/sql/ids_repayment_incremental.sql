-- Repayments, incremental sync: created in [$3, $4); a NULL $3 is no lower bound (COALESCE
-- keeps the bound sargable). $1 after, $2 limit.
SELECT p.id::int8 AS id FROM loans_ajoloanrepayment p
WHERE p.date_created >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
  AND p.date_created < $4::timestamptz
  AND p.id > $1
ORDER BY p.id LIMIT $2
