-- The versions an officer bucket's records are built from (source::digest): every
-- officer row, selected or not (a row that enters or leaves the selection is written,
-- so its version changes), and every customer row by the officer it counts for
-- (customers_count). One (bucket, term) per row: a term hashes the record's id with the
-- row's version, so that no two terms of a bucket can cancel out.
SELECT u.id::int8 >> 10 AS b,
       hashint8extended(u.id::int8, hashint8extended(u.xmin::text::int8, 1)) AS h
FROM accounts_customuser u WHERE u.id BETWEEN $3 AND $4
UNION ALL
SELECT c.user_id::int8 >> 10,
       hashint8extended(c.user_id::int8, hashint8extended(c.xmin::text::int8, hashint8extended(c.id::int8, 2)))
FROM ajo_ajouser c WHERE c.user_id BETWEEN $3 AND $4
