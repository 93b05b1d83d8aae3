-- Repayments, incremental sync: created or modified in [$3, $4) (a status change reaches
-- the platform); a NULL $3 is no lower bound (COALESCE keeps the bounds sargable). $1
-- after, $2 limit, $5 the last id (of a part of the plan). A narrow window is a BitmapOr
-- of loansync_repayment_date_created and loansync_repayment_date_modified; a wide one
-- walks the primary key with the window as a filter (the statement is planned with the
-- window's values, see source::next_ids).
SELECT p.id::int8 AS id FROM loans_ajoloanrepayment p
WHERE ((p.date_created >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
        AND p.date_created < $4::timestamptz)
    OR (p.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
        AND p.date_modified < $4::timestamptz))
  AND p.id > $1 AND p.id <= $5
ORDER BY p.id LIMIT $2
