-- Loans, full sync: disbursed ones, whatever their time. $1 after, $2 limit, $5 the last
-- id (of a part of the plan).
-- ORDER BY names the table's column, not the int8 output column, so the primary key
-- index gives the order (ordering by the cast would sort the whole table on every page).
SELECT l.id::int8 AS id FROM loans_ajoloan l
WHERE l.is_disbursed AND l.id > $1 AND l.id <= $5
ORDER BY l.id LIMIT $2
