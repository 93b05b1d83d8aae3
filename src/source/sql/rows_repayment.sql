-- The columns repayment records are built from, with their loan's reference (load_chunk adds
-- the chunk's WHERE, the sweep its page's). Never selects
-- repayment_meta_response, sms_body or sms_result. The last column, `changed_at` (the newest
-- change time that selects the row, for etl_record_lag_seconds), is not the record's and
-- not in its fingerprint.
SELECT p.id::int8 AS id, p.agent_id::int8 AS agent_id, p.borrower_id::int8 AS borrower_id,
       p.ajo_loan_id::int8 AS ajo_loan_id, p.repayment_type, p.loan_amount, p.repayment_amount,
       p.health_insurance, p.paid_date, p.repayment_ref, p.settlement_status, p.ledger_amount,
       p.comment, p.borrower_notified, p.marked_as, p.expected_recovery_amt, p.applied_to_loan,
       p.date_created, p.date_modified, l.loan_ref,
       EXTRACT(EPOCH FROM greatest(p.date_created, p.date_modified))::float8 AS changed_at
FROM loans_ajoloanrepayment p
LEFT JOIN loans_ajoloan l ON l.id = p.ajo_loan_id
