#!/usr/bin/env bash
# Settle micro-benchmark (issue 12 item 2): settles per second against 1, 2, 4, 8, 16
# concurrent settlers, each with its own connection, synchronous_commit on, no API. The
# program creates its own database (loansync_settle_bench_<pid>) and drops it at the end.
#   usage: bash bench/settle.sh
#   env:   BENCH_PG_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres),
#          BENCH_SETTLERS (1,2,4,8,16), BENCH_SECS (5), BENCH_CHUNKS (20000),
#          BENCH_CHUNK_IDS (100)
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_LOG=${RUST_LOG:-error}
cargo run --release -q --example settle_bench
