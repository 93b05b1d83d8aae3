#!/usr/bin/env bash
# The incremental benchmark: how long an incremental sync of a few changed rows takes
# from planning to completed, with the planner and the workers already running (release
# build, the stub API answering at once, all on this machine). Each round changes
# `--rows` repayments (their `date_modified`, a random set, the same one for a given
# round), triggers an incremental sync and waits for it; then prints, per round, the
# records and chunks it selected and where its time went, from the ledger's own clocks:
#   planned     the claim (history `started_at`) to the planner's "sync planned" log line
#               (ledger written, chunk jobs published and confirmed),
#   first/last  the claim to the first and to the last chunk settled,
#   completed   the history's `duration_seconds` (the claim to the finalize),
#   CPU         of loansync (planner and workers), PostgreSQL (every postgres process:
#               the machine's PostgreSQL is shared) and the stub, from /proc, trigger
#               to finished (the polling's psql included in PostgreSQL's).
# A first round after the planner starts is reported too (the first after a full sync
# also reads the window's indexes cold); look at the spread, not one figure.
#   usage: bash bench/incremental.sh [--size S|M] [--rounds 5] [--rows 1000] [--workers 2]
# Environment: BENCH_BIN (a loansync binary to measure instead of building this tree's),
# BENCH_REUSE=1 (reuse the database bench/scale.sh left with BENCH_KEEP=1, whose rows
# have been delivered already; otherwise it is seeded and one full sync is run first),
# ETL_INCREMENTAL_OVERLAP_SECS (default 0 here: each round selects only its own rows).
set -euo pipefail
cd "$(dirname "$0")/.."
size=M rounds=5 rows=1000 workers=2
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
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
db=loansync_scale_$(echo "$size" | tr 'A-Z' 'a-z')
prefix=bench-incr-$$
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" ETL_QUEUE_PREFIX=$prefix
export RUST_LOG=warn,loansync::planner=info LOG_FORMAT=json ETL_WORKER_CONCURRENCY=4
export ETL_INCREMENTAL_OVERLAP_SECS=${ETL_INCREMENTAL_OVERLAP_SECS:-0}
out=$(mktemp -d /tmp/bench-incr.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
fresh=1
if [ "${BENCH_REUSE:-0}" = 1 ] && psql $PG -qAt -d "$db" -c "SELECT 1 FROM loans_ajoloan LIMIT 1" >/dev/null 2>&1; then
  fresh=0
  $B migrate >/dev/null
else
  psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  psql $PG -q -d "$db" -f schema/django_source_schema.sql >/dev/null
  RUST_LOG=error $B seed "${seed_args[@]}" --seed 7 >/dev/null
  $B migrate >/dev/null
  psql $PG -q -d "$db" -c "VACUUM (ANALYZE)"
fi

port=$(free_port)
export ANALYTICS_API_URL=http://127.0.0.1:$port
$B stub-api --addr 127.0.0.1:$port >/dev/null 2>&1 & stub=$!
$B planner 2>"$out/planner.log" & planner=$!
wpids=()
cleanup() {
  kill -TERM $planner $stub "${wpids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
  rm -rf "$out"
}
trap cleanup EXIT
wait_http() { # url: waits (deadline 30 s) for a 200
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return; sleep 0.1; done
  echo "no answer from $1" >&2; exit 1
}
wait_http "$ANALYTICS_API_URL/healthz"
for i in $(seq 1 "$workers"); do
  p=$(free_port)
  METRICS_ADDR=127.0.0.1:$p $B worker 2>>"$out/worker.log" & wpids+=($!)
  wait_http "http://127.0.0.1:$p/readyz"
done
# One psql session polls for the whole run (a psql per poll would start a backend each
# time, in the middle of the measured CPU).
coproc POLL { exec psql $PG -d "$db" -AtqX; }
poll() { echo "$1;" >&"${POLL[1]}"; IFS= read -r st <&"${POLL[0]}"; }
# sync_type (full|incremental) and request id: triggers, then waits (deadline 10 min)
# until the sync of that request is finished; sets `hid` to its history id. The wait is a
# loop inside the polling backend (a check every 5 ms): a shell loop of `sleep`s cost a
# fifth of the two cores, in the middle of what it measures.
run_sync() {
  local flag=() done="EXISTS (SELECT 1 FROM loansync_request r JOIN etl_folder_etlsynchistory h USING (sync_id) \
      WHERE r.request_id = '$2' AND h.status IN ('completed', 'partial_success', 'failed'))"
  [ "$1" = full ] && flag=(--full)
  $B trigger "${flag[@]}" --request-id "$2" >/dev/null 2>&1
  poll "DO \$\$ BEGIN FOR i IN 1..120000 LOOP EXIT WHEN $done; PERFORM pg_sleep(0.005); END LOOP; END \$\$;
        SELECT coalesce((SELECT h.id FROM loansync_request r JOIN etl_folder_etlsynchistory h USING (sync_id) \
          WHERE r.request_id = '$2' AND h.status IN ('completed', 'partial_success', 'failed')), 0)"
  [ "$st" != 0 ] || { echo "sync $2 did not finish" >&2; exit 1; }
  hid=$st
}
# CPU ticks (utime + stime) of the given pids, summed (read without a process of its
# own); `pg_cpu` for every postgres process, the exited ones (reaped by the postmaster)
# included.
cpu_of() {
  local t=0 p l
  for p in "$@"; do
    read -r l <"/proc/$p/stat" 2>/dev/null || continue
    set -- ${l##*) }; t=$((t + ${12} + ${13}))
  done
  echo $t
}
pg_cpu() {
  local t=0 p l
  for p in $(pgrep -x postgres); do
    read -r l <"/proc/$p/stat" 2>/dev/null || continue
    set -- ${l##*) }; t=$((t + ${12} + ${13} + ${14} + ${15}))
  done
  echo $t
}
# A freshly seeded database: deliver everything once, so that the rounds are what they
# are in production (incremental syncs after a full one).
[ $fresh = 1 ] && run_sync full "bench-incr-full-$$"
: >"$out/rounds"
for r in $(seq 1 "$rounds"); do
  # Through the polling session: a backend of its own would exit, and be counted, during
  # the round. The VACUUM first does what autovacuum does in production (it is off on
  # this machine): without it every round leaves 1,000 dead repayment versions and their
  # index entries, and the ledger's, that the next rounds walk and prune.
  poll "VACUUM loans_ajoloanrepayment, loansync_delivered, loansync_chunk, loansync_sync, etl_folder_etlsynchistory; SELECT 1"
  poll "SELECT setseed(0.$r)"
  poll "WITH u AS (UPDATE loans_ajoloanrepayment SET date_modified = now() \
    WHERE id IN (SELECT DISTINCT 1 + floor(random() * (SELECT max(id) FROM loans_ajoloanrepayment))::int8 \
    FROM generate_series(1, $rows * 11 / 10) LIMIT $rows) RETURNING 1) SELECT count(*) FROM u"
  l0=$(cpu_of $planner "${wpids[@]}") s0=$(cpu_of $stub) p0=$(pg_cpu)
  run_sync incremental "bench-incr-$r-$$"
  echo "$r $hid $(($(cpu_of $planner "${wpids[@]}") - l0)) $(($(cpu_of $stub) - s0)) $(($(pg_cpu) - p0))" >>"$out/rounds"
done

exec {POLL[1]}>&-; wait "$POLL_PID" || true
python3 - "$db" "$out" "$size" "$rows" "$(getconf CLK_TCK)" <<'PY'
import json, subprocess, sys
db, out, size, rows, hz = sys.argv[1:]
ms = lambda ticks: int(ticks) * 1000 // int(hz)
def q(sql):
    return subprocess.check_output(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-AtXc", sql], text=True).strip()
planned = {}
for line in open(f"{out}/planner.log"):
    if '"sync planned"' in line:
        d = json.loads(line)
        f = d.get("fields", d)
        planned[f.get("sync_id") or d.get("sync_id")] = (d["timestamp"], f.get("ledger_ms"), f.get("publish_ms"))
print(f"dataset {size}, {rows} changed repayments a round, ETL_WORKER_CONCURRENCY 4, "
      f"PostgreSQL shared_buffers {q('SHOW shared_buffers')}")
print("| round | records | chunks | planned s (ledger + publish ms) | first settled s | last settled s | completed s | CPU ms: loansync / PostgreSQL / stub | status |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open(f"{out}/rounds"):
    r, h, lc, sc, pc = line.split()
    sync_id, status, duration, records, started = q(
        "SELECT sync_id, status, duration_seconds, total_officers + total_customers + total_loans + total_repayments, started_at "
        f"FROM etl_folder_etlsynchistory WHERE id = {h}").split("|")
    chunks, first, last = q(
        "SELECT count(*), EXTRACT(EPOCH FROM min(c.settled_at) - h.started_at), EXTRACT(EPOCH FROM max(c.settled_at) - h.started_at) "
        f"FROM loansync_chunk c JOIN etl_folder_etlsynchistory h USING (sync_id) WHERE h.id = {h} GROUP BY h.started_at").split("|")
    plan = "?"
    if sync_id in planned:
        at, ledger_ms, publish_ms = planned[sync_id]
        at_s = float(q(f"SELECT EXTRACT(EPOCH FROM '{at}'::timestamptz - '{started}'::timestamptz)"))
        plan = f"{at_s:.3f} ({ledger_ms} + {publish_ms})"
    print(f"| {r} | {int(records):,} | {chunks} | {plan} | {float(first):.3f} | {float(last):.3f} | {float(duration):.3f} | {ms(lc)} / {ms(pc)} / {ms(sc)} | {status} |")
PY
