-- Customers: onboarded ones; incremental syncs also require date_modified in [$3, $4).
SELECT id::int8 FROM ajo_ajouser
WHERE onboarding_complete
  AND ($3::timestamptz IS NULL OR (date_modified >= $3 AND date_modified < $4))
  AND id > $1
ORDER BY id LIMIT $2
