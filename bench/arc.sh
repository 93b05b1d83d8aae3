#!/usr/bin/env bash
# Adaptive request concurrency against an analytics API with a capacity of its own (the
# stub's --capacity, --latency-ms, --latency-per-request-ms), all on this machine
# (release build): seeds once, keeps one planner, and for each case starts the stub with
# the case's flags and N worker processes with the case's settings, runs one full sync
# (`trigger --full --wait`), and prints records/s, requests/s, the share of 429 answers,
# the most requests the stub saw at once, the answered (2xx) requests per second as a share of
# what the API can serve (capacity ÷ latency) while it had work (its first request to its last
# answer), and the sync's status with the records accepted of those planned. The halving cases also print how long after the halving the fleet's
# adapted limit reached the new capacity and the share of 429s from 10 s after it to the end.
# The dataset is a template database made once per size (shared with bench/cost.sh).
#   usage: bash bench/arc.sh [--size S|M] [--cases a,b,...]
# Cases:
#   cap8-fixed / cap8-adaptive / cap8-adaptive-cap: capacity 8 (429, Retry-After 1 beyond),
#     50 ms per request, 8 workers: ETL_WORKER_CONCURRENCY 4 fixed; adaptive; adaptive with
#     ANALYTICS_MAX_IN_FLIGHT=8
#   grow-fixed-N (N in 1,2,4,8,16,32) / grow-adaptive: 20 ms + 5 ms per other request
#     being served, no 429s, 1 worker
#   fast-fixed / fast-adaptive: no latency, no limit, 2 workers
#   halve-adaptive / halve-fixed: capacity 8 halved to 4 (PUT /__faults) 3 s into the
#     sync, 50 ms per request, 8 workers
set -euo pipefail
cd "$(dirname "$0")/.."
size=S cases=cap8-fixed,cap8-adaptive,cap8-adaptive-cap,grow-fixed-1,grow-fixed-2,grow-fixed-4,grow-fixed-8,grow-fixed-16,grow-fixed-32,grow-adaptive,fast-fixed,fast-adaptive,halve-fixed,halve-adaptive
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --cases) cases=$2; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case $size in
  S) seed_args=(--users 160 --customers 8000 --loans 16000 --repayments 80000) ;;
  M) seed_args=(--users 2000 --customers 100000 --loans 200000 --repayments 1000000) ;;
  *) echo "unknown size $size (S or M)" >&2; exit 2 ;;
esac
if [ -n "${BENCH_BIN:-}" ]; then B=$BENCH_BIN; else cargo build --release -q --bin loansync; B=$PWD/target/release/loansync; fi
PG="-h 127.0.0.1 -U postgres"
export PGSSLMODE=disable
db=loansync_arc_$(echo "$size" | tr 'A-Z' 'a-z')
template=loansync_cost_${size,,}_template
prefix=bench-arc-$$
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" ETL_QUEUE_PREFIX=$prefix
# Heartbeats every second: a worker takes its share of a cap 1.5 s after it starts.
export RUST_LOG=warn ETL_WORKER_HEARTBEAT_SECS=1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [ "$(psql $PG -d postgres -Atc "SELECT count(*) FROM pg_database WHERE datname = '$template'")" = 0 ]; then
  psql $PG -q -d postgres -c "CREATE DATABASE $template"
  psql $PG -q -d "$template" -f schema/django_source_schema.sql >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:5432/$template?sslmode=disable" RUST_LOG=error \
    $B seed "${seed_args[@]}" --seed 7 >/dev/null
  psql $PG -q -d "$template" -c "VACUUM (ANALYZE)"
fi
psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db TEMPLATE $template"
$B migrate >/dev/null
psql $PG -q -d "$db" -c "VACUUM (ANALYZE)"
echo "PostgreSQL shared_buffers: $(psql $PG -d postgres -Atc 'SHOW shared_buffers'); $(nproc) cores; $(date -u +%F); $(git rev-parse --short HEAD); size $size"

$B planner 2>/dev/null & planner=$!
stub= wpids=()
cleanup() {
  kill -TERM $planner $stub "${wpids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
  [ "${BENCH_KEEP:-0}" = 1 ] || psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
}
trap cleanup EXIT
wait_http() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

printf '%-18s %7s %9s %10s %8s %8s %8s %7s %10s %8s %s\n' case workers records/s requests/s 429_pct max_in_fl cap_use seconds followed_s 429_after status
IFS=, read -r -a list <<<"$cases"
for c in "${list[@]}"; do
  n=8 stub_flags=() wenv=(ETL_WORKER_CONCURRENCY=4) halve=0
  case $c in
    cap8-*) stub_flags=(--capacity 8 --latency-ms 50 --retry-after-secs 1) ;;
    grow-*) n=1 stub_flags=(--latency-ms 20 --latency-per-request-ms 5) ;;
    fast-*) n=2 ;;
    halve-*) stub_flags=(--capacity 8 --latency-ms 50 --retry-after-secs 1) halve=1 ;;
  esac
  case $c in
    *-adaptive) wenv+=(ETL_WORKER_CONCURRENCY_MODE=adaptive) ;;
    *-adaptive-cap) wenv+=(ETL_WORKER_CONCURRENCY_MODE=adaptive ANALYTICS_MAX_IN_FLIGHT=8) ;;
    grow-fixed-*) wenv=(ETL_WORKER_CONCURRENCY=${c##*-}) ;;
  esac
  port=$(free_port)
  export ANALYTICS_API_URL=http://127.0.0.1:$port
  $B stub-api --addr 127.0.0.1:$port "${stub_flags[@]}" >/dev/null 2>&1 & stub=$!
  wait_http "$ANALYTICS_API_URL/healthz"
  wpids=()
  for _ in $(seq 1 "$n"); do env "${wenv[@]}" $B worker 2>>/tmp/bench-arc-worker.log & wpids+=($!); done
  sleep 3 # the workers connect and, with a cap, take their shares (a benchmark: no assertion waits on it)
  # The fleet's adapted limit starts from nothing in every case.
  psql $PG -q -d "$db" -c "UPDATE loansync_api_pause SET fleet_limit = NULL, lowered_at = NULL, raised_at = NULL"
  start=$(date +%s.%N)
  rm -f /tmp/bench-arc-$$-{followed,snap}
  watcher=
  if [ $halve = 1 ]; then
    (sleep 3; curl -sf -X PUT -H 'content-type: application/json' \
      -d '{"capacity": 4, "latency_ms": 50, "retry_after_secs": 1}' "$ANALYTICS_API_URL/__faults" >/dev/null
     halved=$(date +%s.%N)
     # One polling backend: how long until the fleet's limit is at most the new capacity.
     [ "$c" = halve-adaptive ] && psql $PG -d "$db" -AtqX -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
         LOOP EXIT WHEN (SELECT fleet_limit BETWEEN 1 AND 4 FROM loansync_api_pause)
           OR clock_timestamp() > t0 + interval '60 s'; PERFORM pg_sleep(0.05); END LOOP;
         RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - t0); END \$\$" 2>&1 \
       | sed -n 's/.*NOTICE: *//p' > /tmp/bench-arc-$$-followed &
     sleep 10; curl -sf "$ANALYTICS_API_URL/__stats" > /tmp/bench-arc-$$-snap; wait) & watcher=$!
  fi
  $B trigger --full --wait --timeout 30m --request-id "arc-$c-$$" >/dev/null 2>&1 || true
  end=$(date +%s.%N)
  stats=$(curl -sf "$ANALYTICS_API_URL/__stats")
  [ -n "$watcher" ] && wait $watcher 2>/dev/null || true
  followed=$(cat /tmp/bench-arc-$$-followed 2>/dev/null || true)
  snap=$(cat /tmp/bench-arc-$$-snap 2>/dev/null || echo '{}')
  kill -TERM "${wpids[@]}" $stub; wait "${wpids[@]}" $stub 2>/dev/null || true; wpids=() stub=
  python3 - "$c" "$n" "$start" "$end" "$stats" "$db" "${followed:--}" "$snap" <<'PY'
import json, subprocess, sys
c, n, start, end, stats, db, followed, snap = sys.argv[1:]
s = json.loads(stats)
snap = json.loads(snap or "{}")
sec = float(end) - float(start)
row = subprocess.check_output(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-AtXc",
    "SELECT total_officers + total_customers + total_loans + total_repayments, status, "
    "officers_success + customers_success + loans_success + repayments_success "
    "FROM etl_folder_etlsynchistory ORDER BY id DESC LIMIT 1"], text=True).strip().split("|")
records, status, ok = int(row[0]), row[1], int(row[2])
status = f"{status} ({ok}/{records} accepted)"
req = s["requests"]
r429 = s["statuses"].get("429", 0)
ok = sum(v for k, v in s["statuses"].items() if k.startswith("2"))
# What the API served of what it can serve (capacity ÷ latency) while it had work, from
# its first request to its last answer (planning and the --wait poll left out); the
# halving cases: 8 until 3 s after the trigger, 4 after.
first, last = s.get("first_arrival") or float(start), s.get("last_answer") or float(end)
if c.startswith("cap8"):
    cap_use = f"{ok / ((last - first) * 8 / 0.05):.2f}"
elif c.startswith("halve"):
    halved = float(start) + 3
    cap_use = f"{ok / ((max(halved - first, 0) * 8 + (last - max(halved, first)) * 4) / 0.05):.2f}"
else:
    cap_use = "-"
after = "-"
if snap:
    d_req = req - snap["requests"]
    d_429 = r429 - snap["statuses"].get("429", 0)
    after = f"{100 * d_429 / max(d_req, 1):.2f}"
if followed != "-":
    followed = f"{float(followed):.1f}" if float(followed) < 60 else ">60"
print(f"{c:<18} {n:>7} {records / sec:>9.0f} {req / sec:>10.1f} {100 * r429 / max(req, 1):>8.2f} {s['max_in_flight']:>8} {cap_use:>8} {sec:>7.1f} {followed:>10} {after:>8} {status}")
PY
done
