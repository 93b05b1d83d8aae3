-- The versions a repayment bucket's records are built from (source::digest): every
-- repayment row with the version of its loan's row (loan_ref).
SELECT p.id::int8 >> 10 AS b,
       hashint8extended(p.id::int8, hashint8extended(p.xmin::text::int8, 9))
       # hashint8extended(p.id::int8, hashint8extended(COALESCE(l.xmin::text::int8, -1), 10)) AS h
FROM loans_ajoloanrepayment p
LEFT JOIN loans_ajoloan l ON l.id = p.ajo_loan_id
WHERE p.id BETWEEN $3 AND $4
