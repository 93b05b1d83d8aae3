-- Deterministic synthetic data for the Django source tables. Run inside one transaction
-- with the settings loansync.seed / .users / .customers / .loans / .repayments set.

CREATE FUNCTION pg_temp.rnd(g bigint, salt int) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT (abs(hashint8(g * 7919 + salt * 104729 + current_setting('loansync.seed')::bigint * 15485863)) % 1000003)::float8 / 1000003
$$;

CREATE FUNCTION pg_temp.pick(arr text[], g bigint, salt int) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT arr[1 + floor(pg_temp.rnd(g, salt) * array_length(arr, 1))::int]
$$;

INSERT INTO accounts_customuser (
    id, password, last_login, is_superuser, first_name, last_name, is_staff, is_active, email,
    username, customer_user_id, user_password, user_type, account_type, user_phone, user_branch,
    bvn_number, kyc_level, performance_status, referral_code, referrals_count, call_agent_id,
    is_call_agent, is_call_agent_admin, is_ajo_admin, bucket, bucket_designation, pnd, address, date_joined
)
SELECT g,
       'pbkdf2_sha256$600000$seed$' || md5(g::text),
       CASE WHEN pg_temp.rnd(g, 1) < 0.2 THEN NULL ELSE now() - pg_temp.rnd(g, 2) * interval '60 days' END,
       false,
       pg_temp.pick(ARRAY['Ada','Chinedu','Ngozi','Adébáyọ̀','Emeka','Fatima','Ọlátúnjí','Zainab','Tunde','Ifeoma'], g, 3),
       pg_temp.pick(ARRAY['Okafor','Bello','Adeyemi','Ọlátúnjí','Eze','Musa','Nwosu','Abubakar'], g, 4),
       false, true,
       'officer' || g || '@example.com',
       CASE WHEN g % 7 = 0 THEN NULL ELSE 'officer' || g END,
       CASE WHEN g % 2 = 0 THEN 1000000 + g ELSE NULL END,
       'enc$' || md5('pw' || g),
       -- every user type; the six agent types twice as often as the others
       (ARRAY['AGENT','STAFF_AGENT','PROSPER_AGENT','DMO_AGENT','AJO_AGENT','RECOVERY_AGENT',
              'MERCHANT','KEY_ACCOUNT','PERSONAL','LIBERTY_RETAIL','LOTTO_AGENT',
              'AGENT','STAFF_AGENT','PROSPER_AGENT','DMO_AGENT','AJO_AGENT','RECOVERY_AGENT'])[1 + (g % 17)::int],
       -- every user type with both account types, one 17-row cycle each
       CASE WHEN (g / 17) % 2 = 1 THEN 'KEY_ACCOUNT' ELSE 'REGULAR' END,
       '+234803' || lpad(g::text, 7, '0'),
       CASE WHEN g % 11 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['Lagos Island','Ikeja','Abuja Central','Kano','Ibadan','Port Harcourt'], g, 5) END,
       lpad((g * 7919)::text, 11, '2'),
       (g % 4)::smallint,
       CASE WHEN g % 4 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['ACTIVE','INACTIVE','PROBATION'], g, 6) END,
       'REF' || g,
       (g % 17)::int,
       CASE WHEN g % 10 = 0 THEN g::int ELSE NULL END,
       g % 10 = 0, g % 50 = 0, g % 25 = 0,
       CASE WHEN g % 10 = 0 THEN '["A","B"]'::jsonb ELSE '[]'::jsonb END,
       CASE WHEN g % 10 = 0 THEN 'B' || (g % 5) ELSE NULL END,
       g % 13 = 0,
       CASE WHEN g % 5 = 0 THEN NULL ELSE g || ' Allen Avenue' END,
       now() - interval '60 days' - pg_temp.rnd(g, 7) * interval '400 days'
FROM generate_series(1, current_setting('loansync.users')::bigint) AS g;

INSERT INTO ajo_ajouser (
    id, phone_number, pin, lite_transaction_pin, first_name, last_name, alias, alt_phone, gender,
    marital_status, dob, state, lga, address, bus_stop, landmark, trade, trade_location, bvn, nin,
    image, longitude, latitude, location_state, location_city, location_country, location_address,
    onboarding_verified, bvn_verified, onboarding_complete, onboarding_stage, card_issued, need_card,
    total_money_saved, total_money_withdrawn, total_withdrawals, loandisk_borrower_id, branch_name,
    age, provider, date_created, date_modified, lite_user_id, user_id
)
SELECT g,
       '+234806' || lpad(g::text, 7, '0'),
       lpad(((g * 37) % 10000)::text, 4, '0'),
       CASE WHEN g % 3 = 0 THEN 'tp' || md5(g::text) ELSE NULL END,
       CASE WHEN g % 20 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['Adaeze','Bola','Chiamaka','Dàmílọ́lá','Efe','Funmilayo','Garba','Halima','Ìfẹ́olúwa','Jide'], g, 11) END,
       CASE WHEN g % 15 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['Okonkwo','Adébáyọ̀','Danjuma','Ogunleye','Ibrahim','Nnamdi','Ṣàngó'], g, 12) END,
       CASE WHEN g % 4 = 0 THEN 'Iya ' || g ELSE NULL END,
       CASE WHEN g % 5 = 0 THEN '+234807' || lpad(g::text, 7, '0') ELSE NULL END,
       CASE WHEN g % 9 = 0 THEN NULL WHEN g % 2 = 0 THEN 'FEMALE' ELSE 'MALE' END,
       pg_temp.pick(ARRAY['SINGLE','MARRIED','WIDOWED'], g, 13),
       CASE WHEN g % 8 = 0 THEN NULL ELSE date '1960-01-01' + (pg_temp.rnd(g, 14) * 15000)::int END,
       pg_temp.pick(ARRAY['Lagos','Oyo','Kano','Rivers','FCT'], g, 15),
       pg_temp.pick(ARRAY['Ikeja','Surulere','Ibadan North','Nassarawa','Obio-Akpor'], g, 16),
       g || ' Market Road',
       'Stop ' || (g % 100),
       CASE WHEN g % 6 = 0 THEN NULL ELSE 'Near the big mosque/church ' || (g % 30) END,
       pg_temp.pick(ARRAY['Tailor','Trader','Hairdresser','Mechanic','Food vendor'], g, 17),
       'Stall ' || (g % 500),
       CASE WHEN g % 4 = 0 THEN NULL ELSE lpad((g * 104729 % 100000000000)::text, 11, '2') END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE 'NIN' || lpad(g::text, 9, '0') END,
       CASE WHEN g % 2 = 0 THEN 'ajo/images/' || g || '.jpg' ELSE NULL END,
       3.0 + pg_temp.rnd(g, 18) * 10, 4.0 + pg_temp.rnd(g, 19) * 9,
       'Lagos', 'Ikeja', 'Nigeria', NULL,
       pg_temp.rnd(g, 20) < 0.8, pg_temp.rnd(g, 21) < 0.7,
       pg_temp.rnd(g, 22) < 0.8,                                  -- onboarding_complete
       pg_temp.pick(ARRAY['PERSONAL_INFO','BVN','COMPLETE'], g, 23),
       g % 5 = 0, g % 7 = 0,
       round((pg_temp.rnd(g, 24) * 500000)::numeric, 2)::float8,
       round((pg_temp.rnd(g, 25) * 100000)::numeric, 2)::float8,
       (g % 12)::int,
       CASE WHEN g % 10 = 0 THEN 'LD' || g ELSE NULL END,
       pg_temp.pick(ARRAY['Lagos Island','Ikeja','Abuja Central','Kano','Ibadan'], g, 26),
       CASE WHEN g % 8 = 0 THEN NULL ELSE 18 + (g % 50)::int END,
       CASE WHEN g % 10 = 0 THEN 'lite' ELSE 'ajo' END,
       now() - pg_temp.rnd(g, 27) * interval '60 days',
       now() - pg_temp.rnd(g, 28) * pg_temp.rnd(g, 27) * interval '60 days',
       NULL,
       CASE WHEN g % 20 = 0 THEN NULL ELSE 1 + (g % current_setting('loansync.users')::bigint)::int END
FROM generate_series(1, current_setting('loansync.customers')::bigint) AS g;

INSERT INTO loans_loaneligibility (id, amount, date_created, ajo_user_id)
SELECT g, 50000 + (g % 20) * 10000, now() - interval '61 days',
       1 + (g % current_setting('loansync.customers')::bigint)::int
FROM generate_series(1, current_setting('loansync.loans')::bigint) AS g;

INSERT INTO loans_ajoloan (
    id, borrower_full_name, borrower_phone_number, guarantor_full_name, guarantor_phone_number,
    amount, amount_disbursed, amount_saved, bnpl_amount, loan_type, application_type, status,
    performance_status, loan_behavior, total_paid_amount, total_outstanding_balance, last_paid_amount,
    interest_rate, interest_amount, processing_fee, nem_fee, repayment_amount, principal_repayment,
    expected_repayment_count, count_of_recorded_repayments, daily_repayment_amount,
    principal_daily_repayment, is_disbursed, date_disbursed, start_date, end_date, expected_end_date,
    actual_end_date, date_completed, tenor, tenor_in_days, repayment_type, loandisk_loan_id,
    unique_loan_ref, loan_ref, escrow_amount, escrow_settled, date_created, date_modified,
    agent_id, borrower_id, eligibility_id, guarantor_id
)
SELECT g,
       'Borrower ' || g, '+234806' || lpad(((g % c.n) + 1)::text, 7, '0'),
       CASE WHEN g % 3 = 0 THEN NULL ELSE 'Guarantor ' || g END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE '+234809' || lpad(g::text, 7, '0') END,
       a.amount, CASE WHEN d.disbursed THEN a.amount ELSE 0 END, a.amount * 0.1, 0,
       pg_temp.pick(ARRAY['AJO','BNPL','PROSPER'], g, 31), pg_temp.pick(ARRAY['PRIMARY','TOP_UP','RENEWAL'], g, 32),
       CASE WHEN d.disbursed THEN pg_temp.pick(ARRAY['DISBURSED','DISBURSED','COMPLETED','DEFAULTED'], g, 33)
            ELSE pg_temp.pick(ARRAY['PENDING','APPROVED','REJECTED'], g, 33) END,
       CASE WHEN g % 4 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['PERFORMING','LATE','PAST_MATURITY'], g, 34) END,
       CASE WHEN g % 5 = 0 THEN NULL ELSE pg_temp.pick(ARRAY['GOOD','FAIR','BAD'], g, 35) END,
       round((a.amount * pg_temp.rnd(g, 36))::numeric, 2)::float8,
       round((a.amount * 1.2 * (1 - pg_temp.rnd(g, 36)))::numeric, 2)::float8,
       round((a.amount / 30)::numeric, 2)::float8,
       0.2, a.amount * 0.2, a.amount * 0.02, 500, a.amount * 1.2, a.amount,
       30, (g % 30)::int, round((a.amount * 1.2 / 30)::numeric, 2)::float8, round((a.amount / 30)::numeric, 2)::float8,
       d.disbursed,
       CASE WHEN d.disbursed THEN t.created + interval '1 day' ELSE NULL END,
       CASE WHEN d.disbursed THEN (t.created + interval '1 day')::date ELSE NULL END,
       CASE WHEN d.disbursed THEN (t.created + interval '31 days')::date ELSE NULL END,
       CASE WHEN d.disbursed THEN (t.created + interval '31 days')::date ELSE NULL END,
       NULL, NULL,
       pg_temp.pick(ARRAY['ONE_MONTH','TWO_MONTHS','THREE_MONTHS'], g, 37), 30,
       pg_temp.pick(ARRAY['DAILY','WEEKLY','MONTHLY'], g, 38),
       CASE WHEN g % 10 = 0 THEN 'LDL' || g ELSE NULL END,
       CASE WHEN g % 2 = 0 THEN 'ULR-' || g ELSE NULL END,
       md5('loan' || g)::uuid::text,
       0, false,
       t.created, t.created + pg_temp.rnd(g, 39) * (now() - t.created),
       1 + (g % u.n)::int, 1 + (g % c.n)::int, g::int, NULL
FROM generate_series(1, current_setting('loansync.loans')::bigint) AS g
CROSS JOIN (SELECT current_setting('loansync.customers')::bigint AS n) c
CROSS JOIN (SELECT current_setting('loansync.users')::bigint AS n) u
CROSS JOIN LATERAL (SELECT (50000 + floor(pg_temp.rnd(g, 30) * 20) * 10000)::float8 AS amount) a
CROSS JOIN LATERAL (SELECT pg_temp.rnd(g, 40) < 0.75 AS disbursed) d
CROSS JOIN LATERAL (SELECT now() - pg_temp.rnd(g, 41) * interval '60 days' AS created) t;

-- 4 to 30 schedule rows per disbursed loan.
INSERT INTO loans_ajoloanschedule (
    due_amount, amount_left, paid_amount, due_date, paid_date, fully_paid, fully_paid_date,
    is_late, late_days, date_created, date_modified, loan_id
)
SELECT l.repayment_amount / n.k,
       CASE WHEN p.paid THEN 0 ELSE l.repayment_amount / n.k END,
       CASE WHEN p.paid THEN l.repayment_amount / n.k ELSE 0 END,
       l.start_date + i,
       CASE WHEN p.paid THEN l.start_date + i ELSE NULL END,
       p.paid,
       CASE WHEN p.paid THEN l.start_date + i ELSE NULL END,
       NOT p.paid AND l.start_date + i < current_date,
       CASE WHEN NOT p.paid AND l.start_date + i < current_date THEN current_date - (l.start_date + i) ELSE 0 END,
       -- Written at disbursement and last touched no later than the loan itself (never
       -- in the future: date_disbursed can be, and incremental syncs select loans by
       -- their schedule rows' date_modified).
       LEAST(l.date_disbursed, l.date_modified), LEAST(l.date_disbursed, l.date_modified), l.id
FROM loans_ajoloan l
CROSS JOIN LATERAL (SELECT 4 + (l.id * 13 % 27) AS k) n
CROSS JOIN LATERAL generate_series(1, n.k) AS i
CROSS JOIN LATERAL (SELECT pg_temp.rnd(l.id * 31 + i, 42) < 0.6 AS paid) p
WHERE l.is_disbursed;

WITH d AS (
    SELECT id, agent_id, borrower_id, date_disbursed, row_number() OVER (ORDER BY id) AS rn
    FROM loans_ajoloan WHERE is_disbursed
), n AS (SELECT count(*) AS c FROM d)
INSERT INTO loans_ajoloanrepayment (
    id, repayment_type, loan_amount, repayment_amount, health_insurance, paid_date, repayment_ref,
    settlement_status, repayment_meta_response, ledger_amount, comment, borrower_notified, sms_body,
    sms_result, marked_as, expected_recovery_amt, applied_to_loan, date_created, date_modified,
    agent_id, ajo_loan_id, borrower_id
)
SELECT g,
       pg_temp.pick(ARRAY['CASH','TRANSFER','CARD','USSD','DIRECT_DEBIT'], g, 51),
       100000, round((1000 + pg_temp.rnd(g, 52) * 9000)::numeric, 2)::float8, 50,
       ts.t, md5('rep' || g || current_setting('loansync.seed'))::uuid,
       g % 4 <> 0,
       CASE WHEN g % 3 = 0 THEN '{"gateway":"paystack","status":"success","reference":"' || g || '"}' ELSE NULL END,
       1000, CASE WHEN g % 6 = 0 THEN 'Paid at the market' ELSE NULL END,
       g % 2 = 0,
       CASE WHEN g % 2 = 0 THEN 'Dear customer, your repayment of NGN was received' ELSE NULL END,
       CASE WHEN g % 2 = 0 THEN 'DELIVERED' ELSE NULL END,
       CASE WHEN g % 25 = 0 THEN 'RECOVERY' WHEN g % 40 = 0 THEN 'REVERSAL' ELSE NULL END,
       0, CASE WHEN g % 9 = 0 THEN NULL ELSE g % 5 <> 0 END,
       ts.t, ts.t,
       d.agent_id, d.id, d.borrower_id
FROM generate_series(1, current_setting('loansync.repayments')::bigint) AS g
CROSS JOIN n
JOIN d ON d.rn = 1 + (g % n.c)
CROSS JOIN LATERAL (SELECT now() - pg_temp.rnd(g, 53) * interval '60 days' AS t) ts;

SELECT setval('accounts_customuser_id_seq', (SELECT max(id) FROM accounts_customuser));
SELECT setval('ajo_ajouser_id_seq', (SELECT max(id) FROM ajo_ajouser));
SELECT setval('loans_loaneligibility_id_seq', (SELECT max(id) FROM loans_loaneligibility));
SELECT setval('loans_ajoloan_id_seq', (SELECT max(id) FROM loans_ajoloan));
SELECT setval('loans_ajoloanrepayment_id_seq', (SELECT max(id) FROM loans_ajoloanrepayment));
