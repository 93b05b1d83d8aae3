-- The sweep's bucket digests (README "The sweep"): per entity and bucket of 1,024 ids
-- (`id >> 10`), a 64-bit digest of the row versions (`xmin`) of every source row the
-- bucket's records are built from and of the bucket's `loansync_delivered` rows, stored
-- when a sweep compared the bucket row by row and found nothing to send and nothing
-- gone. A later sweep computes the digests again in one pass over the tables and compares
-- row by row only the buckets whose digest differs: any write to a row (an UPDATE that
-- bypasses `date_modified` included) gives it a new version, and a new delivered
-- fingerprint gives its delivered row one. Written by the planner in the sweep's planning
-- transaction; a bucket that differed is removed until a sweep finds it clean again.
CREATE TABLE loansync_sweep_digest (
    entity       varchar(20) NOT NULL,
    bucket       int8        NOT NULL,
    digest       int8        NOT NULL,
    verified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, bucket)
);
