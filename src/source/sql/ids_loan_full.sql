-- Loans, full sync: disbursed ones, whatever their time. $1 after, $2 limit.
-- ORDER BY names the table's column, not the int8 output column, so the primary key
-- index gives the order (ordering by the cast would sort the whole table on every page).
SELECT l.id::int8 AS id FROM loans_ajoloan l
WHERE l.is_disbursed AND l.id > $1
ORDER BY l.id LIMIT $2
