#!/usr/bin/env bash
# The benchmark: a full sync of dataset S (~1e5 records) or M (~1.3e6) by a planner and two
# worker processes over RabbitMQ, against the stub API, all on this machine (release build).
# Prints and writes bench/report-<size>.json: records/s per entity and overall, worker peak
# RSS, planner time, HTTP batches/s, and PostgreSQL's own extraction rate of the same rows
# as JSON (bench/extract.sql) with the ratio.
#   usage: bash bench/run.sh [S|M]...      (default: S M)
# Environment: BENCH_DB_SSLMODE (default disable: every part is on loopback, where TLS to
# PostgreSQL protects nothing and costs ~9% of the two cores; `prefer` measures it),
# ANALYTICS_GZIP (passed to the workers), BENCH_TAG (report-<size>-<tag>.json).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(S M)
cargo build --release -q --bin loansync
B=$PWD/target/release/loansync
PG="-h 127.0.0.1 -U postgres"
sslmode=${BENCH_DB_SSLMODE:-disable}
export PGSSLMODE=$sslmode
gzip=${ANALYTICS_GZIP:-false}
tag=${BENCH_TAG:+-$BENCH_TAG}

for size in "${sizes[@]}"; do
  case $size in
    S) seed_args=(--users 160 --customers 8000 --loans 16000 --repayments 80000) ;;
    M) seed_args=(--users 2000 --customers 100000 --loans 200000 --repayments 1000000) ;;
    *) echo "unknown size $size (S or M)" >&2; exit 2 ;;
  esac
  db=loansync_bench_$(echo "$size" | tr 'A-Z' 'a-z')
  prefix=bench-$size-$$
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=$sslmode" ETL_QUEUE_PREFIX=$prefix
  export RUST_LOG=warn,loansync::planner=info LOG_FORMAT=json
  psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  psql $PG -q -d "$db" -f schema/django_source_schema.sql >/dev/null
  t=$(date +%s.%N); RUST_LOG=error $B seed "${seed_args[@]}" --seed 7 >/dev/null; seed_s=$(echo "$(date +%s.%N) - $t" | bc)
  $B migrate >/dev/null
  # The CI PostgreSQL runs with autovacuum off; a production database has it on. Give the
  # freshly seeded tables the visibility map and statistics autovacuum would have given.
  psql $PG -q -d "$db" -c "VACUUM (ANALYZE)"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export ANALYTICS_API_URL=http://127.0.0.1:$port
  $B stub-api --addr 127.0.0.1:$port >/dev/null 2>&1 & stub=$!
  $B planner 2>/tmp/bench-planner.log & planner=$!
  $B worker 2>/dev/null & w1=$!
  $B worker 2>/dev/null & w2=$!
  for _ in $(seq 1 100); do curl -sf "$ANALYTICS_API_URL/healthz" >/dev/null && break; sleep 0.1; done
  sleep 1
  # The waits below poll through ONE psql session: a psql process per poll (Debian's perl
  # wrapper, a new backend and a TLS handshake each time) cost ~45 ms of CPU per poll, about
  # 9 % of the two cores the sync under test runs on (measured with perf, 2026-11-25).
  coproc POLL { exec psql $PG -d "$db" -AtqX; }
  poll() { echo "SELECT coalesce(($1), '');" >&"${POLL[1]}"; IFS= read -r st <&"${POLL[0]}"; }
  # Waits until the newest sync matching $1 (a WHERE clause) has finished, polling every $2 s.
  wait_finished() {
    while :; do
      poll "SELECT status FROM etl_folder_etlsynchistory WHERE $1 ORDER BY id DESC LIMIT 1"
      case "$st" in completed|partial_success|failed) return ;; esac
      sleep "$2"
    done
  }
  t0=$(date +%s.%N)
  $B trigger --full --request-id "bench-$size-$$" >/dev/null
  wait_finished true 0.2
  wall=$(echo "$(date +%s.%N) - $t0" | bc)
  rss1=$(awk '/VmHWM/ {print $2}' /proc/$w1/status); rss2=$(awk '/VmHWM/ {print $2}' /proc/$w2/status)
  requests=$(curl -sf "$ANALYTICS_API_URL/__stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  # An incremental sync of 1,000 changed rows, trigger to completed.
  psql $PG -q -d "$db" -c "UPDATE loans_ajoloan SET date_modified = now() WHERE id IN (SELECT id FROM loans_ajoloan ORDER BY id DESC LIMIT 400)" \
    -c "UPDATE ajo_ajouser SET date_modified = now() WHERE id IN (SELECT id FROM ajo_ajouser WHERE onboarding_complete ORDER BY id DESC LIMIT 300)" \
    -c "UPDATE loans_ajoloanrepayment SET date_created = now() WHERE id IN (SELECT id FROM loans_ajoloanrepayment ORDER BY id DESC LIMIT 300)"
  t1=$(date +%s.%N)
  $B trigger --request-id "bench-incr-$size-$$" >/dev/null
  wait_finished "sync_type = 'incremental'" 0.05
  incr_wall=$(echo "$(date +%s.%N) - $t1" | bc)
  exec {POLL[1]}>&-; wait "$POLL_PID" || true
  incr_records=$(psql $PG -d "$db" -Atc "SELECT total_loans + total_repayments + total_customers + total_officers FROM etl_folder_etlsynchistory WHERE sync_type = 'incremental' ORDER BY id DESC LIMIT 1")
  kill -TERM $planner $w1 $w2 $stub; wait $planner $w1 $w2 $stub 2>/dev/null || true
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
  extract=$(psql $PG -d "$db" -f bench/extract.sql 2>&1 | awk '/^Time:/ {s += $2} END {print s/1000}')
  python3 - "$size" "$db" "$wall" "$rss1" "$rss2" "$requests" "$extract" "$seed_s" "$incr_wall" "$incr_records" "$sslmode" "$gzip" "$tag" <<'PY'
import json, subprocess, sys, re
size, db, wall, rss1, rss2, requests, extract, seed_s, incr_wall, incr_records, sslmode, gzip, tag = sys.argv[1:]
wall, extract = float(wall), float(extract)
def q(sql):
    return subprocess.check_output(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-Atc", sql], text=True).strip()
hist = q("SELECT status, duration_seconds, total_officers, total_customers, total_loans, total_repayments, "
         "officers_failed + customers_failed + loans_failed + repayments_failed, started_at FROM etl_folder_etlsynchistory WHERE sync_type = 'full' ORDER BY id DESC LIMIT 1").split("|")
status, duration = hist[0], float(hist[1])
totals = dict(zip(["officer", "customer", "loan", "repayment"], map(int, hist[2:6])))
records = sum(totals.values())
spans = {}
for line in q("SELECT entity, EXTRACT(EPOCH FROM max(settled_at) - min(settled_at) + interval '1 millisecond'), count(*) FROM loansync_chunk "
              "WHERE sync_id = (SELECT sync_id FROM etl_folder_etlsynchistory WHERE sync_type = 'full' ORDER BY id DESC LIMIT 1) GROUP BY entity").splitlines():
    e, span, n = line.split("|"); spans[e] = float(span)
planned_at = None
for line in open("/tmp/bench-planner.log"):
    if '"sync planned"' in line:  # the first one: the full sync
        planned_at = json.loads(line)["timestamp"]
        break
planner_s = float(q(f"SELECT EXTRACT(EPOCH FROM '{planned_at}'::timestamptz - '{hist[7]}'::timestamptz)")) if planned_at else None
report = {
    "size": size, "db_sslmode": sslmode, "analytics_gzip": gzip, "status": status, "records": records, "records_per_entity": totals,
    "failed": int(hist[6]),
    "sync_seconds": round(duration, 3), "trigger_to_done_seconds": round(wall, 3),
    "records_per_second": round(records / duration),
    "records_per_second_by_entity": {e: round(totals[e] / spans[e]) for e in totals if e in spans},
    "worker_peak_rss_mb": [round(int(rss1) / 1024, 1), round(int(rss2) / 1024, 1)],
    "planner_seconds": round(planner_s, 3) if planner_s is not None else None,
    "http_batches_per_second": round(int(requests) / duration, 1),
    "raw_extraction_seconds": round(extract, 3),
    "raw_extraction_records_per_second": round(records / extract),
    "ratio_to_raw_extraction": round((records / duration) / (records / extract), 3),
    "seed_seconds": round(float(seed_s), 1),
    "incremental_trigger_to_completed_seconds": round(float(incr_wall), 3),
    "incremental_records": int(incr_records),
}
print(json.dumps(report, indent=2))
json.dump(report, open(f"bench/report-{size}{tag}.json", "w"), indent=2)
PY
  psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
done
