-- Customers, incremental sync: onboarded ones modified in [$3, $4); a NULL $3 is no lower
-- bound. COALESCE keeps the bound sargable (an index on date_modified stays usable, also
-- with a generic plan). $1 after, $2 limit, $5 the last id (of a part of the plan).
SELECT c.id::int8 AS id FROM ajo_ajouser c
WHERE c.onboarding_complete
  AND c.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
  AND c.date_modified < $4::timestamptz
  AND c.id > $1 AND c.id <= $5
ORDER BY c.id LIMIT $2
