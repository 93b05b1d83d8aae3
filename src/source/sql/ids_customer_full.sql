-- Customers, full sync: onboarded ones, whatever their time. $1 after, $2 limit.
SELECT c.id::int8 AS id FROM ajo_ajouser c
WHERE c.onboarding_complete AND c.id > $1
ORDER BY c.id LIMIT $2
