-- `ledger::lifecycle::planning_work`: whether the planner has anything to do under the
-- planning lock, read without taking it: a pending request with the slot free, or a
-- sync whose planner is gone (still `planning`, or `running` with chunks not all
-- published). `{planner_gone}`: `PLANNER_GONE_SQL`, spliced in once.
SELECT (EXISTS (SELECT 1 FROM loansync_request WHERE state = 'pending')
        AND NOT EXISTS (SELECT 1 FROM loansync_sync WHERE state <> 'done'))
    OR (EXISTS (SELECT 1 FROM loansync_sync
                WHERE state = 'planning' OR (state = 'running' AND published_at IS NULL))
        AND {planner_gone})
