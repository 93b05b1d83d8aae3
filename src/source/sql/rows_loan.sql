-- The columns loan records are built from: the loan, its agent, borrower, schedule and
-- repayment aggregates (load_chunk adds the chunk's WHERE, the sweep its page's).
-- Sums of float8 columns add the rows in id order, so the same rows always give the same
-- record: a float8 sum depends on the order of its terms, and the physical order changes
-- with any UPDATE of a row (the sweep would then send the loan for nothing). Each
-- aggregate reads a subquery sorted by id: one sort per loan and table, where
-- `sum(x ORDER BY id)` sorted once per sum (four sorts a loan; the loan statement took
-- 8-15 % longer on dataset M). An aggregate over a plain sorted subquery, with no join or
-- grouping between them, takes its rows in the subquery's order (PostgreSQL's documented
-- way to order an aggregate's input, section 4.2.7); the test
-- `sweep::a_row_rewritten_with_the_same_values_changes_no_record` fails when it does not.
-- In numeric instead, the sweep of dataset M would take twice as long on loans.
-- The last column, `changed_at` (the newest change time that selects the loan: its own,
-- a schedule row's or a repayment's, for etl_record_lag_seconds), is not the record's and
-- not in its fingerprint.
SELECT l.id::int8 AS id, l.agent_id::int8 AS agent_id, l.borrower_id::int8 AS borrower_id,
       l.eligibility_id::int8 AS eligibility_id, l.guarantor_id::int8 AS guarantor_id,
       l.borrower_full_name, l.borrower_phone_number, l.guarantor_full_name, l.guarantor_phone_number,
       l.amount, l.amount_disbursed, l.amount_saved, l.bnpl_amount, l.loan_type, l.application_type,
       l.status, l.performance_status, l.loan_behavior, l.total_paid_amount, l.total_outstanding_balance,
       l.last_paid_amount, l.interest_rate, l.interest_amount, l.processing_fee, l.nem_fee,
       l.repayment_amount, l.principal_repayment, l.expected_repayment_count,
       l.count_of_recorded_repayments, l.daily_repayment_amount, l.principal_daily_repayment,
       l.is_disbursed, l.date_disbursed, l.start_date, l.end_date, l.expected_end_date, l.actual_end_date,
       l.date_completed, l.tenor, l.tenor_in_days, l.repayment_type, l.loandisk_loan_id,
       l.unique_loan_ref, l.loan_ref, l.escrow_amount, l.escrow_settled, l.date_created, l.date_modified,
       a.email AS agent_email, a.user_branch AS agent_branch,
       b.user_id::int8 AS borrower_agent_id, b.branch_name AS borrower_branch,
       s.installments, s.installments_paid, s.installments_late, s.max_late_days,
       s.amount_due, s.amount_paid, s.amount_left, s.next_due_date,
       r.repayment_count, r.repayment_total, r.last_paid_date,
       EXTRACT(EPOCH FROM greatest(l.date_modified, s.schedule_changed, r.repayments_changed))::float8 AS changed_at
FROM loans_ajoloan l
LEFT JOIN accounts_customuser a ON a.id = l.agent_id
LEFT JOIN ajo_ajouser b ON b.id = l.borrower_id
CROSS JOIN LATERAL (
    SELECT count(*) AS installments,
           count(*) FILTER (WHERE fully_paid) AS installments_paid,
           count(*) FILTER (WHERE is_late) AS installments_late,
           COALESCE(max(late_days), 0)::int8 AS max_late_days,
           COALESCE(sum(due_amount), 0)::float8 AS amount_due,
           COALESCE(sum(paid_amount), 0)::float8 AS amount_paid,
           COALESCE(sum(amount_left), 0)::float8 AS amount_left,
           min(due_date) FILTER (WHERE NOT fully_paid) AS next_due_date,
           max(date_modified) AS schedule_changed
    FROM (SELECT fully_paid, is_late, late_days, due_amount, paid_amount, amount_left, due_date, date_modified
          FROM loans_ajoloanschedule WHERE loan_id = l.id ORDER BY id) sch
) s
CROSS JOIN LATERAL (
    SELECT count(*) AS repayment_count,
           COALESCE(sum(repayment_amount), 0)::float8 AS repayment_total,
           max(paid_date) AS last_paid_date,
           max(greatest(date_created, date_modified)) AS repayments_changed
    FROM (SELECT repayment_amount, paid_date, date_created, date_modified
          FROM loans_ajoloanrepayment WHERE ajo_loan_id = l.id ORDER BY id) rep
) r
