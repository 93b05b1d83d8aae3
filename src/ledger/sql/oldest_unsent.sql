-- `ledger::reads::oldest_unsent` (etl_oldest_unsent_change_seconds, `loansync status`):
-- per entity with a watermark and a modification time, the seconds since the oldest
-- source change at or after its watermark (what the next incremental sync selects beyond
-- the overlap; NULL when nothing waits). Each min() reads the first entry of a time index
-- from the watermark on (loansync_customer_date_modified, loansync_loan_date_modified,
-- loansync_schedule_date_modified, loansync_repayment_date_created,
-- loansync_repayment_date_modified): one index probe each, whatever the tables' size.
SELECT w.entity,
       EXTRACT(EPOCH FROM greatest(now() - o.oldest, interval '0'))::float8 AS age_seconds
FROM (SELECT entity_type::text AS entity, last_sync_timestamp AS wm FROM etl_folder_etllastsync
      WHERE entity_type IN ('customer', 'loan', 'repayment')) w
CROSS JOIN LATERAL (SELECT CASE w.entity
    WHEN 'customer' THEN
        (SELECT min(c.date_modified) FROM ajo_ajouser c
         WHERE c.onboarding_complete AND c.date_modified >= w.wm)
    WHEN 'loan' THEN least(
        (SELECT min(l.date_modified) FROM loans_ajoloan l WHERE l.date_modified >= w.wm),
        (SELECT min(s.date_modified) FROM loans_ajoloanschedule s WHERE s.date_modified >= w.wm),
        (SELECT min(p.date_created) FROM loans_ajoloanrepayment p WHERE p.date_created >= w.wm),
        (SELECT min(p.date_modified) FROM loans_ajoloanrepayment p WHERE p.date_modified >= w.wm))
    ELSE least(
        (SELECT min(p.date_created) FROM loans_ajoloanrepayment p WHERE p.date_created >= w.wm),
        (SELECT min(p.date_modified) FROM loans_ajoloanrepayment p WHERE p.date_modified >= w.wm))
    END AS oldest) o
ORDER BY w.entity
