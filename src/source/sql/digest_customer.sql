-- The versions a customer bucket's records are built from (source::digest): every
-- customer row, onboarded or not.
SELECT c.id::int8 >> 10 AS b,
       hashint8extended(c.id::int8, hashint8extended(c.xmin::text::int8, 3)) AS h
FROM ajo_ajouser c WHERE c.id BETWEEN $3 AND $4
