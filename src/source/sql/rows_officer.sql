-- The columns officer records are built from, with their customer counts (load_chunk adds
-- the chunk's WHERE, the sweep its page's). Never selects
-- password, user_password or bvn_number. The last column, `changed_at`, is not the record's:
-- officers have no modification time (NULL).
SELECT u.id::int8 AS id, u.email, u.username, u.customer_user_id, u.user_type, u.account_type,
       u.user_phone, u.user_branch, u.kyc_level::int4 AS kyc_level, u.performance_status,
       u.referral_code, u.referrals_count, u.call_agent_id, u.is_call_agent, u.is_call_agent_admin,
       u.is_ajo_admin, u.bucket, u.bucket_designation, u.pnd, u.address, u.date_joined, u.last_login,
       (SELECT count(*) FROM ajo_ajouser c WHERE c.user_id = u.id) AS customers_count,
       NULL::float8 AS changed_at
FROM accounts_customuser u
