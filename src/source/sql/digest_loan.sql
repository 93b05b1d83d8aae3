-- The versions a loan bucket's records are built from (source::digest): every loan row,
-- disbursed or not, with the versions of its agent and borrower rows, every schedule
-- row and every repayment row by the loan it belongs to (the aggregates). $3 and $4:
-- the slice's first and last id.
SELECT l.id::int8 >> 10 AS b,
       hashint8extended(l.id::int8, hashint8extended(l.xmin::text::int8, 4))
       # hashint8extended(l.id::int8, hashint8extended(COALESCE(a.xmin::text::int8, -1), 5))
       # hashint8extended(l.id::int8, hashint8extended(COALESCE(c.xmin::text::int8, -1), 6)) AS h
FROM loans_ajoloan l
LEFT JOIN accounts_customuser a ON a.id = l.agent_id
LEFT JOIN ajo_ajouser c ON c.id = l.borrower_id
WHERE l.id BETWEEN $3 AND $4
UNION ALL
SELECT s.loan_id::int8 >> 10,
       hashint8extended(s.loan_id::int8, hashint8extended(s.xmin::text::int8, hashint8extended(s.id::int8, 7)))
FROM loans_ajoloanschedule s WHERE s.loan_id BETWEEN $3 AND $4
UNION ALL
SELECT p.ajo_loan_id::int8 >> 10,
       hashint8extended(p.ajo_loan_id::int8, hashint8extended(p.xmin::text::int8, hashint8extended(p.id::int8, 8)))
FROM loans_ajoloanrepayment p WHERE p.ajo_loan_id BETWEEN $3 AND $4
