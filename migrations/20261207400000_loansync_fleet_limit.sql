-- The fleet's adapted limit on requests to the analytics API (README "Adaptive
-- concurrency"): one number for every adaptive worker, kept on the pause's one row.
--
-- fleet_limit: requests in flight across the fleet (NULL: none, each worker's own
-- controller alone). Lowered ×0.9 when a worker meets backpressure (429, 503, a timeout)
-- on a request it started under the current generation, so one round of 429s lowers it
-- once; raised by 1 (by a quarter once the API has been quiet for a while) by a worker
-- whose share held it back, at most once a second and never within 3 s of a lowering;
-- back to NULL when it passes what the live workers' own limits add up to.
-- limit_generation: bumped by every change; a change names the generation it saw.
-- Written only on those events, never per request.
ALTER TABLE loansync_api_pause
    ADD COLUMN IF NOT EXISTS fleet_limit integer CHECK (fleet_limit >= 1),
    ADD COLUMN IF NOT EXISTS limit_generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lowered_at timestamptz,
    ADD COLUMN IF NOT EXISTS raised_at timestamptz;
