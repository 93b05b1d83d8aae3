#!/usr/bin/env bash
# The cost benchmark (issue 24): CPU per record of the whole system (loansync; PostgreSQL:
# the benchmark database's backends and the writers every database shares; the stub API
# in its own process) for a first full sync, a re-sync of unchanged records and a
# no-change sweep (the first after the syncs, then again: the second reads only the buckets
# whose digest changed), in single-process mode, against
# PostgreSQL's own extraction of the same rows (bench/extract.sql) and its reading of the
# rows alone, measured in the same run on this machine. With a revision, that revision is
# built too and the builds are alternated run by run.
#   usage: bash bench/cost.sh [--size S|M] [--runs N] [REVISION]
# Prints a table (medians over the runs) and writes bench/report-cost-<size>.json. Best on a
# quiet machine: PostgreSQL is counted per database (its backends) plus the writers every
# database shares; it warns when other databases were at work meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
size=M runs=2 rev=
while [ $# -gt 0 ]; do
  case $1 in
    --size) size=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) rev=$1; shift ;;
  esac
done
case $size in
  S) seed_args=(--users 160 --customers 8000 --loans 16000 --repayments 80000) ;;
  M) seed_args=(--users 2000 --customers 100000 --loans 200000 --repayments 1000000) ;;
  *) echo "unknown size $size (S or M)" >&2; exit 2 ;;
esac
cargo build --release -q --bin loansync --example load_bench
builds=("main=$PWD/target/release/loansync")
if [ -n "$rev" ]; then
  short=$(git rev-parse --short "$rev")
  dir=$PWD/target/cost-$short
  if [ ! -x "$dir/target/release/loansync" ]; then
    rm -rf "$dir/src"; mkdir -p "$dir"
    git worktree add -f --detach "$dir/src" "$rev" >/dev/null
    (cd "$dir/src" && CARGO_TARGET_DIR=$dir/target cargo build --release -q --bin loansync)
    git worktree remove --force "$dir/src"
  fi
  builds+=("$short=$dir/target/release/loansync")
fi
PG="-h 127.0.0.1 -U postgres"
export PGSSLMODE=disable
template=loansync_cost_${size,,}_template
if [ "$(psql $PG -d postgres -Atc "SELECT count(*) FROM pg_database WHERE datname = '$template'")" = 0 ]; then
  psql $PG -q -d postgres -c "CREATE DATABASE $template"
  psql $PG -q -d "$template" -f schema/django_source_schema.sql >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:5432/$template?sslmode=disable" RUST_LOG=error \
    "${builds[0]#*=}" seed "${seed_args[@]}" --seed 7 >/dev/null
  psql $PG -q -d "$template" -c "VACUUM (ANALYZE)"
fi
echo "PostgreSQL shared_buffers: $(psql $PG -d postgres -Atc 'SHOW shared_buffers'); $(nproc) cores; $(date -u +%F); $(git rev-parse --short HEAD)"
python3 bench/cost.py "$size" "$runs" "$template" "${builds[@]}"
