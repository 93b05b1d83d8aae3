#!/usr/bin/env bash
# The cost of a sweep (SPEC.md section 2) on dataset M: a full sync, then a sweep with
# nothing changed (must plan and send nothing), then 1 % of the rows changed through
# paths timestamps miss (UPDATEs that leave date_modified alone) and a sweep again (must
# send exactly those records). Single-process mode (`loansync sync`: planner and workers
# in one process) against the stub API, all on this machine (release build).
# Prints the figures and appends them to bench/REPORT.md (with BENCH_REPORT=1).
#   usage: bash bench/sweep.sh          (BENCH_DB: database name, default loansync_sweep_m)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin loansync
B=$PWD/target/release/loansync
PG="-h 127.0.0.1 -U postgres"
export PGSSLMODE=disable
db=${BENCH_DB:-loansync_sweep_m}
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable"
export RUST_LOG=warn LOG_FORMAT=json ETL_WORKER_CONCURRENCY=4
psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
psql $PG -q -d "$db" -f schema/django_source_schema.sql >/dev/null
RUST_LOG=error $B seed --users 2000 --customers 100000 --loans 200000 --repayments 1000000 --seed 7 >/dev/null
$B migrate >/dev/null
psql $PG -q -d "$db" -c "VACUUM (ANALYZE)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export ANALYTICS_API_URL=http://127.0.0.1:$port ANALYTICS_API_KEY=bench-key
$B stub-api --addr 127.0.0.1:$port >/dev/null 2>&1 & stub=$!
trap 'kill $stub 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "$ANALYTICS_API_URL/healthz" >/dev/null && break; sleep 0.1; done
accepted() { curl -sf "$ANALYTICS_API_URL/__stats" | python3 -c 'import json,sys; print(sum(json.load(sys.stdin)["accepted"].values()))'; }
requests() { curl -sf "$ANALYTICS_API_URL/__stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }
# CPU seconds (user + system) of every postgres process now, with those of the backends
# that already exited (the postmaster's reaped children: cutime + cstime). Shared with
# whatever else runs on this machine's PostgreSQL, so an upper bound for the sweep's own.
pg_cpu() {
  python3 - <<'PY'
import os
hz = os.sysconf("SC_CLK_TCK"); total = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        if comm.startswith("postgres"):
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    except OSError:
        pass
print(total / hz)
PY
}
# Runs `loansync sync ARGS`; sets wall, rss_kib (peak RSS), planned (records), sent.
run_sync() {
  local before_req; before_req=$(requests)
  local cpu0; cpu0=$(pg_cpu)
  local t0; t0=$(date +%s.%N)
  /usr/bin/time -f "%M" -o /tmp/sweep-bench-rss $B sync "$@" --json >/tmp/sweep-bench-out.json
  wall=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
  pgcpu=$(echo "$(pg_cpu) - $cpu0" | bc)
  rss_kib=$(tail -1 /tmp/sweep-bench-rss)
  planned=$(python3 -c 'import json; d=json.load(open("/tmp/sweep-bench-out.json")); print(sum(p["total"] for p in d["progress"]))')
  status=$(python3 -c 'import json; d=json.load(open("/tmp/sweep-bench-out.json")); print(d["status"])')
  batches=$(( $(requests) - before_req ))
}
run_sync --full
full_wall=$wall full_planned=$planned full_rss=$rss_kib
echo "full sync: $full_planned records in ${full_wall}s ($status), peak RSS $((full_rss / 1024)) MiB"

run_sync --sweep
sweep0_wall=$wall sweep0_planned=$planned sweep0_rss=$rss_kib sweep0_pg=$pgcpu sweep0_batches=$batches
echo "sweep, nothing changed: ${sweep0_wall}s, $sweep0_planned planned, $sweep0_batches batches, PostgreSQL CPU ${sweep0_pg}s, peak RSS $((sweep0_rss / 1024)) MiB"
[ "$sweep0_planned" = 0 ] && [ "$sweep0_batches" = 0 ] || { echo "FAIL: a sweep with nothing changed planned or sent records" >&2; exit 1; }

# 1 % of each table changed by UPDATEs that bypass auto_now (date_modified untouched),
# in columns the records carry and no aggregate reads.
changed=$(psql $PG -d "$db" -AtqX <<'SQL'
WITH c AS (UPDATE ajo_ajouser SET landmark = 'swept ' || id WHERE onboarding_complete AND id % 100 = 0 RETURNING 1),
     l AS (UPDATE loans_ajoloan SET loan_behavior = 'swept' WHERE is_disbursed AND id % 100 = 0 RETURNING 1),
     p AS (UPDATE loans_ajoloanrepayment SET comment = 'swept ' || id WHERE id % 100 = 0 RETURNING 1)
SELECT (SELECT count(*) FROM c) + (SELECT count(*) FROM l) + (SELECT count(*) FROM p);
SQL
)
acc0=$(accepted)
run_sync --sweep
sweep1_wall=$wall sweep1_planned=$planned sweep1_rss=$rss_kib sweep1_pg=$pgcpu
echo "sweep, $changed rows changed (1 %): ${sweep1_wall}s, $sweep1_planned planned ($status), PostgreSQL CPU ${sweep1_pg}s, peak RSS $((sweep1_rss / 1024)) MiB"
[ "$sweep1_planned" = "$changed" ] || { echo "FAIL: the sweep planned $sweep1_planned records, $changed changed" >&2; exit 1; }
deleted=$($B deletes list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$deleted" = 0 ] || { echo "FAIL: $deleted deletions reported, none made" >&2; exit 1; }
fp_bytes=$(psql $PG -d "$db" -AtqX -c "SELECT pg_total_relation_size('loansync_delivered') / greatest(count(*), 1) FROM loansync_delivered")
echo "loansync_delivered: $fp_bytes bytes per delivered record (heap + primary key)"

if [ "${BENCH_REPORT:-0}" = 1 ]; then
  cat >>bench/REPORT.md <<EOF

## The sweep on M ($(date -u +%Y-%m-%d), \`bash bench/sweep.sh\`)

Single process (\`loansync sync --sweep\`, planner and 4 workers in one), against the stub,
on this machine's 2 shared cores. PostgreSQL CPU is every postgres process's, others'
work included: an upper bound.

| run | wall | records planned | PostgreSQL CPU | peak RSS |
|---|---|---|---|---|
| full sync (writes the fingerprints) | ${full_wall} s | $full_planned | | $((full_rss / 1024)) MiB |
| sweep, nothing changed | ${sweep0_wall} s | $sweep0_planned (0 batches sent) | ${sweep0_pg} s | $((sweep0_rss / 1024)) MiB |
| sweep, 1 % changed without touching date_modified | ${sweep1_wall} s | $sweep1_planned (exactly the $changed changed) | ${sweep1_pg} s | $((sweep1_rss / 1024)) MiB |

\`loansync_delivered\` costs $fp_bytes bytes per delivered record (heap and primary key).
EOF
fi
