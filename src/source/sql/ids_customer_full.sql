-- Customers, full sync: onboarded ones, whatever their time. $1 after, $2 limit, $5
-- the last id (of a part of the plan).
SELECT c.id::int8 AS id FROM ajo_ajouser c
WHERE c.onboarding_complete AND c.id > $1 AND c.id <= $5
ORDER BY c.id LIMIT $2
