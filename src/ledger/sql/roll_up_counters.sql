-- Sets a sync's history counters from its chunk rows: absolute sums per entity, so a
-- roll-up is idempotent, needs no lock on any chunk, and counts a chunk once however
-- often it was delivered; `api_response` becomes the newest answer a chunk kept.
-- $1 sync id.
WITH c AS (
    SELECT
        coalesce(sum(succeeded) FILTER (WHERE entity = 'loan'), 0)::int4      AS loans_success,
        coalesce(sum(failed)    FILTER (WHERE entity = 'loan'), 0)::int4      AS loans_failed,
        coalesce(sum(succeeded) FILTER (WHERE entity = 'repayment'), 0)::int4 AS repayments_success,
        coalesce(sum(failed)    FILTER (WHERE entity = 'repayment'), 0)::int4 AS repayments_failed,
        coalesce(sum(succeeded) FILTER (WHERE entity = 'customer'), 0)::int4  AS customers_success,
        coalesce(sum(failed)    FILTER (WHERE entity = 'customer'), 0)::int4  AS customers_failed,
        coalesce(sum(succeeded) FILTER (WHERE entity = 'officer'), 0)::int4   AS officers_success,
        coalesce(sum(failed)    FILTER (WHERE entity = 'officer'), 0)::int4   AS officers_failed
    FROM loansync_chunk
    WHERE sync_id = $1 AND settled_at IS NOT NULL
), r AS (
    SELECT api_response FROM loansync_chunk
    WHERE sync_id = $1 AND settled_at IS NOT NULL AND api_response IS NOT NULL
    ORDER BY settled_at DESC, entity DESC, seq DESC
    LIMIT 1
)
UPDATE etl_folder_etlsynchistory h SET
    loans_success      = c.loans_success,
    loans_failed       = c.loans_failed,
    repayments_success = c.repayments_success,
    repayments_failed  = c.repayments_failed,
    customers_success  = c.customers_success,
    customers_failed   = c.customers_failed,
    officers_success   = c.officers_success,
    officers_failed    = c.officers_failed,
    api_response       = COALESCE((SELECT api_response FROM r), h.api_response)
FROM c
WHERE h.sync_id = $1
