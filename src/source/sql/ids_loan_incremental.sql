-- Loans, incremental sync: whatever their disbursement, those whose own date_modified is
-- in [$3, $4), or with a schedule row modified, or a repayment created or modified, in
-- [$3, $4) (their `schedule` / `repayments` aggregates changed). A NULL $3 is no lower
-- bound (COALESCE keeps the bound sargable). $1 after, $2 limit, $5 the last id (of a
-- part of the plan).
--
-- One branch per condition, each restricted to the page (id > $1) and cut to its own
-- first $2 distinct ids: the page is the first $2 of their union. Each branch is driven
-- by its own index, and the planner picks, per branch and per window, between reading the
-- window's range of the time index (loansync_loan_date_modified,
-- loansync_schedule_date_modified, loansync_repayment_date_created,
-- loansync_repayment_date_modified: a narrow window, the usual incremental) and walking
-- the id index with the window as a filter (a wide window, e.g. the first sync's 30 days
-- or a long backfill). That choice needs the window's values: the statement is run
-- unprepared (a custom plan each time, see source::next_ids), never with a generic plan.
-- Schedule and repayment rows reference their loan by a foreign key: no join back.
SELECT u.id::int8 AS id FROM (
    (SELECT l.id FROM loans_ajoloan l
     WHERE l.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
       AND l.date_modified < $4::timestamptz
       AND l.id > $1 AND l.id <= $5
     ORDER BY l.id LIMIT $2)
    UNION
    (SELECT DISTINCT s.loan_id FROM loans_ajoloanschedule s
     WHERE s.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
       AND s.date_modified < $4::timestamptz
       AND s.loan_id > $1 AND s.loan_id <= $5
     ORDER BY s.loan_id LIMIT $2)
    UNION
    (SELECT DISTINCT p.ajo_loan_id FROM loans_ajoloanrepayment p
     WHERE p.date_created >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
       AND p.date_created < $4::timestamptz
       AND p.ajo_loan_id > $1 AND p.ajo_loan_id <= $5
     ORDER BY p.ajo_loan_id LIMIT $2)
    UNION
    (SELECT DISTINCT p.ajo_loan_id FROM loans_ajoloanrepayment p
     WHERE p.date_modified >= COALESCE($3::timestamptz, '-infinity'::timestamptz)
       AND p.date_modified < $4::timestamptz
       AND p.ajo_loan_id > $1 AND p.ajo_loan_id <= $5
     ORDER BY p.ajo_loan_id LIMIT $2)
) u (id)
ORDER BY u.id LIMIT $2
