-- The columns customer records are built from (load_chunk adds the chunk's WHERE, the sweep
-- its page's). pin, lite_transaction_pin, bvn, nin and image never
-- leave the database: only whether a BVN / NIN is present. The last column, `changed_at`
-- (the change time that selects the row, for etl_record_lag_seconds), is not the record's
-- and not in its fingerprint.
SELECT id::int8 AS id, phone_number, first_name, last_name, alias, alt_phone, gender, marital_status,
       dob, state, lga, address, bus_stop, landmark, trade, trade_location, longitude, latitude,
       location_state, location_city, location_country, location_address, onboarding_verified,
       bvn_verified, onboarding_complete, onboarding_stage, total_money_saved, total_money_withdrawn,
       total_withdrawals, loandisk_borrower_id, branch_name, age, provider, date_created, date_modified,
       lite_user_id::int8 AS lite_user_id, user_id::int8 AS agent_id,
       (bvn IS NOT NULL AND bvn <> '') AS has_bvn,
       (nin IS NOT NULL AND nin <> '') AS has_nin,
       EXTRACT(EPOCH FROM date_modified)::float8 AS changed_at
FROM ajo_ajouser c
