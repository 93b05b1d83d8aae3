#!/usr/bin/env bash
# The scale-out benchmark: one full sync per worker count, against an API that answers
# every request after a fixed latency, all on this machine (release build). Seeds once,
# keeps one planner, and for each count N starts N worker processes
# (`ETL_WORKER_CONCURRENCY` 4), triggers a full sync, waits for it, and stops them.
# Prints one table and writes bench/report-scale-<tag>.json:
#   workers, records/s, efficiency rate_N / (N · rate_1), mean backends waiting on a lock
#   (pg_stat_activity sampled every ~100 ms through one psql session), CPU µs per record of
#   loansync (planner + workers), of PostgreSQL (every postgres process, exited backends
#   included: an upper bound, the machine's PostgreSQL is shared) and of the stub, all from
#   /proc, the workers' peak RSS (VmHWM) and the planner's time for the plan.
#   usage: bash bench/scale.sh [--size S|M] [--workers 1,2,4,8] [--latency-ms 50] [--tag T]
# Environment: BENCH_BIN (a loansync binary to measure instead of building this tree's:
# e.g. an older commit's build, for before/after figures); BENCH_REUSE=1 (keep the
# database of an earlier run of the same size, left by BENCH_KEEP=1, instead of seeding
# again).
set -euo pipefail
cd "$(dirname "$0")/.."
size=M workers=1,2,4,8 latency=50 tag=
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --latency-ms) latency=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
tag=${tag:-$size-${latency}ms}
case $size in
  S) seed_args=(--users 160 --customers 8000 --loans 16000 --repayments 80000) ;;
  M) seed_args=(--users 2000 --customers 100000 --loans 200000 --repayments 1000000) ;;
  *) echo "unknown size $size (S or M)" >&2; exit 2 ;;
esac
if [ -n "${BENCH_BIN:-}" ]; then B=$BENCH_BIN; else cargo build --release -q --bin loansync; B=$PWD/target/release/loansync; fi
PG="-h 127.0.0.1 -U postgres"
export PGSSLMODE=disable
db=loansync_scale_$(echo "$size" | tr 'A-Z' 'a-z')
prefix=bench-scale-$$
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable" ETL_QUEUE_PREFIX=$prefix
export RUST_LOG=warn,loansync::planner=info LOG_FORMAT=json ETL_WORKER_CONCURRENCY=4
out=$(mktemp -d /tmp/bench-scale.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "${BENCH_REUSE:-0}" = 1 ] && psql $PG -qAt -d "$db" -c "SELECT 1 FROM loans_ajoloan LIMIT 1" >/dev/null 2>&1; then
  # BENCH_REUSE=1: the database of an earlier run, seeded already (a second latency).
  $B migrate >/dev/null
else
  psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  psql $PG -q -d "$db" -f schema/django_source_schema.sql >/dev/null
  RUST_LOG=error $B seed "${seed_args[@]}" --seed 7 >/dev/null
  $B migrate >/dev/null
  # As bench/run.sh: what autovacuum would have given the freshly seeded tables.
  psql $PG -q -d "$db" -c "VACUUM (ANALYZE)"
fi

port=$(free_port)
export ANALYTICS_API_URL=http://127.0.0.1:$port
slow=(); [ "$latency" -gt 0 ] && slow=(--slow-rate 1 --slow-ms "$latency")
$B stub-api --addr 127.0.0.1:$port "${slow[@]}" >/dev/null 2>&1 & stub=$!
$B planner 2>"$out/planner.log" & planner=$!
wpids=()
cleanup() {
  kill -TERM $planner $stub "${wpids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
wait_http() { # url: waits (deadline 30 s) for a 200
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null && return; sleep 0.1; done
  echo "no answer from $1" >&2; exit 1
}
wait_http "$ANALYTICS_API_URL/healthz"

# CPU ticks (utime + stime) of the given pids, summed.
cpu_of() {
  local t=0 p f
  for p in "$@"; do
    f=$(sed 's/.*) //' "/proc/$p/stat") || continue
    set -- $f; t=$((t + ${12} + ${13}))
  done
  echo $t
}
# A snapshot of PostgreSQL now, as one JSON line: every postgres process's CPU ticks
# (utime + stime) with its title, the postmaster's reaped children's (cutime + cstime:
# the backends and workers that already exited), and the WAL written so far
# (pg_stat_wal). The report splits PostgreSQL's CPU by kind of process from two of them.
pg_snap() {
  python3 - "$db" <<'PY'
import json, os, subprocess, sys
procs, reaped = {}, 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if not open(f"/proc/{pid}/comm").read().strip().startswith("postgres"):
            continue
        title = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        procs[pid] = [title, int(f[11]) + int(f[12])]
        reaped += int(f[13]) + int(f[14])
    except OSError:
        pass
wal = subprocess.check_output(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", sys.argv[1], "-AtXc",
                               "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"], text=True).split("|")
print(json.dumps({"procs": procs, "reaped": reaped, "wal": [int(x) for x in wal]}))
PY
}

# One psql session for the whole run: every ~100 ms it returns the number of backends
# waiting on a lock and the newest full sync's status.
coproc POLL { exec psql $PG -d "$db" -AtqX; }
poll() { echo "$1;" >&"${POLL[1]}"; IFS= read -r st <&"${POLL[0]}"; }

IFS=, read -r -a counts <<<"$workers"
: >"$out/runs"
for n in "${counts[@]}"; do
  wpids=() wports=()
  for i in $(seq 1 "$n"); do
    p=$(free_port); wports+=("$p")
    METRICS_ADDR=127.0.0.1:$p $B worker 2>>"$out/worker.log" & wpids+=($!)
  done
  for p in "${wports[@]}"; do wait_http "http://127.0.0.1:$p/readyz"; done
  request=bench-scale-$n-$$
  # The sync is the first full one whose history row is newer than this (by history id,
  # not by request: builds older than the request table can be measured too).
  poll "SELECT coalesce(max(id), 0) FROM etl_folder_etlsynchistory"; h0=$st
  # A checkpoint now rather than one that falls inside some runs and not others: the
  # full-page images written after it made single runs differ by up to a quarter.
  psql $PG -qAtX -d "$db" -c CHECKPOINT
  pg_snap >"$out/pg-$n-0.json"; lc0=$(cpu_of $planner "${wpids[@]}") st0=$(cpu_of $stub)
  $B trigger --full --request-id "$request" >/dev/null
  samples=0 waiting=0
  while :; do
    poll "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock') || '|' || \
      coalesce((SELECT h.status FROM etl_folder_etlsynchistory h \
                WHERE h.id > $h0 AND h.sync_type = 'full' ORDER BY h.id LIMIT 1), '')"
    samples=$((samples + 1)) waiting=$((waiting + ${st%%|*}))
    case "${st#*|}" in completed|partial_success|failed) break ;; esac
    sleep 0.1
  done
  pg_snap >"$out/pg-$n-1.json"; lc1=$(cpu_of $planner "${wpids[@]}") st1=$(cpu_of $stub)
  rss=$(for w in "${wpids[@]}"; do awk '/VmHWM/ {print $2}' "/proc/$w/status"; done | paste -sd,)
  kill -TERM "${wpids[@]}"; wait "${wpids[@]}" 2>/dev/null || true; wpids=()
  echo "$n $h0 $samples $waiting $((lc1 - lc0)) $((st1 - st0)) $rss" >>"$out/runs"
done
exec {POLL[1]}>&-; wait "$POLL_PID" || true

python3 - "$db" "$out" "$size" "$latency" "$tag" "$(getconf CLK_TCK)" <<'PY'
import json, subprocess, sys
db, out, size, latency, tag, hz = sys.argv[1:]
hz = int(hz)
def q(sql):
    return subprocess.check_output(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-AtXc", sql], text=True).strip()
planned = {}
for line in open(f"{out}/planner.log"):
    if '"sync planned"' in line:
        d = json.loads(line)
        f = d.get("fields", d)
        planned[f.get("sync_id") or d.get("sync_id")] = (d["timestamp"], f.get("ledger_ms"), f.get("publish_ms"))
def pg_split(before, after):
    """PostgreSQL's CPU ticks between two snapshots, by kind of process, and the WAL
    written (records, full-page images, bytes)."""
    a, b = json.load(open(before)), json.load(open(after))
    kinds = {"backends": 0, "wal and checkpoints": 0, "exited": b["reaped"] - a["reaped"], "other": 0}
    for pid, (title, ticks) in b["procs"].items():
        ticks -= a["procs"].get(pid, [None, 0])[1]
        if any(k in title for k in ("walwriter", "checkpointer", "background writer")):
            kinds["wal and checkpoints"] += ticks
        elif f" {db} " in f"{title} ":
            kinds["backends"] += ticks
        else:
            kinds["other"] += ticks
    return kinds, [y - x for x, y in zip(a["wal"], b["wal"])]
runs = []
for line in open(f"{out}/runs"):
    n, h0, samples, waiting, lc, st, rss = line.split()
    pg, wal = pg_split(f"{out}/pg-{n}-0.json", f"{out}/pg-{n}-1.json")
    h = q("SELECT h.sync_id, h.status, h.duration_seconds, h.total_officers + h.total_customers + h.total_loans + h.total_repayments, "
          "h.officers_failed + h.customers_failed + h.loans_failed + h.repayments_failed, h.started_at "
          f"FROM etl_folder_etlsynchistory h WHERE h.id > {h0} AND h.sync_type = 'full' ORDER BY h.id LIMIT 1").split("|")
    sync_id, status, duration, records, failed = h[0], h[1], float(h[2]), int(h[3]), int(h[4])
    plan_s = ledger_ms = publish_ms = None
    if sync_id in planned:
        at, ledger_ms, publish_ms = planned[sync_id]
        plan_s = float(q(f"SELECT EXTRACT(EPOCH FROM '{at}'::timestamptz - '{h[5]}'::timestamptz)"))
    us = lambda ticks: round(int(ticks) / hz * 1e6 / records, 2)
    rss_mb = [round(int(r) / 1024, 1) for r in rss.split(",")]
    runs.append({"workers": int(n), "status": status, "records": records, "failed": failed,
                 "sync_seconds": round(duration, 3), "records_per_second": round(records / duration),
                 "lock_waiting_mean": round(int(waiting) / int(samples), 2), "lock_samples": int(samples),
                 "cpu_us_per_record": {"loansync": us(lc), "postgres": us(sum(pg.values())), "stub": us(st)},
                 # PostgreSQL's, by kind of process: the bench database's backends (the
                 # workers', the planner's), the WAL writer, checkpointer and background
                 # writer, backends and workers that exited during the run, the rest.
                 "postgres_cpu_us_per_record": {k: us(v) for k, v in pg.items()},
                 "wal_per_record": {"records": round(wal[0] / records, 2), "full_page_images": round(wal[1] / records, 3),
                                    "bytes": round(wal[2] / records)},
                 "worker_peak_rss_mb_max": max(rss_mb), "worker_peak_rss_mb": rss_mb,
                 "planner_seconds": round(plan_s, 3) if plan_s is not None else None,
                 # Of which: writing the chunk ledger, and publishing the chunk jobs (builds
                 # that log them).
                 "planner_ledger_ms": ledger_ms, "planner_publish_ms": publish_ms})
base = runs[0]["records_per_second"] / runs[0]["workers"]
for r in runs:
    r["efficiency"] = round(r["records_per_second"] / (r["workers"] * base), 3)
# PostgreSQL's buffer cache decides whether the rows come from it or from the kernel's
# page cache (dataset M is 1.4 GB; this machine's PostgreSQL has 128 MB unless set).
shared_buffers = q("SHOW shared_buffers")
report = {"size": size, "api_latency_ms": int(latency), "worker_concurrency": 4,
          "shared_buffers": shared_buffers, "runs": runs}
print(f"dataset {size}, API latency {latency} ms, ETL_WORKER_CONCURRENCY 4, PostgreSQL shared_buffers {shared_buffers}")
print("| workers | records/s | efficiency | lock waits (mean) | loansync µs/rec | PostgreSQL µs/rec | stub µs/rec | worker peak RSS (max) | planner s (ledger + publish ms) | status |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    c = r["cpu_us_per_record"]
    print(f"| {r['workers']} | {r['records_per_second']:,} | {r['efficiency']:.2f} | {r['lock_waiting_mean']:.2f} | {c['loansync']} | {c['postgres']} | {c['stub']} | "
          f"{r['worker_peak_rss_mb_max']} MB | {r['planner_seconds']} ({r['planner_ledger_ms']} + {r['planner_publish_ms']}) | {r['status']} |")
print()
print("| workers | PostgreSQL µs/rec: backends | WAL writer, checkpointer, bgwriter | exited | other | WAL records/rec | full-page images/rec | WAL bytes/rec |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    p, w = r["postgres_cpu_us_per_record"], r["wal_per_record"]
    print(f"| {r['workers']} | {p['backends']} | {p['wal and checkpoints']} | {p['exited']} | {p['other']} | {w['records']} | {w['full_page_images']} | {w['bytes']} |")
json.dump(report, open(f"bench/report-scale-{tag}.json", "w"), indent=2)
print(f"written: bench/report-scale-{tag}.json")
PY
rm -rf "$out"
# BENCH_KEEP=1 keeps the seeded database for a later BENCH_REUSE=1 run.
[ "${BENCH_KEEP:-0}" = 1 ] || psql $PG -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
