#!/usr/bin/env bash
# Validates what cannot run here (no Docker engine, no cluster): the Kubernetes manifests
# against the Kubernetes schemas (strict), the compose file against the compose spec, the
# alert rules with promtool, a real scrape of a running worker with promtool, and that
# every metric the alerts and the dashboard use is one a worker exports.
# Installs its tools from PyPI and Debian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pip=()
command -v kubernetes-validate >/dev/null || need_pip+=(kubernetes-validate)
command -v check-jsonschema >/dev/null || need_pip+=(check-jsonschema)
if [ ${#need_pip[@]} -gt 0 ]; then
  python3 -m pip install -q --disable-pip-version-check "${need_pip[@]}"
fi
if ! command -v promtool >/dev/null; then
  apt-get install -y -q prometheus >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
fi

echo "validate: Kubernetes manifests (strict; CRDs are reported as without schema)"
kubernetes-validate --strict --quiet deploy/k8s/*.yaml

echo "validate: PrometheusRule matches deploy/prometheus/alerts.yml"
python3 - <<'PY'
import yaml, sys
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
pr = yaml.safe_load(open("deploy/k8s/prometheusrule.yaml"))
if pr["spec"]["groups"] != rules["groups"]:
    sys.exit("deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml")
PY

echo "validate: docker-compose.yml against the compose specification"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

echo "validate: alert rules"
promtool check rules deploy/prometheus/alerts.yml

echo "validate: a real scrape of a running worker"
cargo build -q --bin loansync
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prefix="validate-$$"
db="loansync_validate_$$"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
worker=""
cleanup() {
  if [ -n "$worker" ]; then kill -TERM "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true; fi
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# A database with the source schema, migrated, and a watermark per entity, so the scrape
# carries every metric family.
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null
psql -q -h 127.0.0.1 -U postgres -d "$db" -f schema/django_source_schema.sql >/dev/null
./target/debug/loansync migrate >/dev/null
psql -q -h 127.0.0.1 -U postgres -d "$db" -c "INSERT INTO etl_folder_etllastsync (entity_type, last_sync_timestamp, last_sync_id, updated_at) \
  SELECT e, now() - interval '5 minutes', 'validate', now() FROM unnest(ARRAY['loan','repayment','customer','officer']) e" >/dev/null
ETL_QUEUE_PREFIX=$prefix METRICS_ADDR=127.0.0.1:$port RUST_LOG=warn ./target/debug/loansync worker &
worker=$!
scrape=""
for _ in $(seq 1 100); do
  if scrape=$(curl -sf "http://127.0.0.1:$port/metrics"); then break; fi
  sleep 0.1
done
[ -n "$scrape" ] || { echo "the worker did not serve /metrics" >&2; exit 1; }
printf '%s\n' "$scrape" | promtool check metrics
curl -sf "http://127.0.0.1:$port/healthz" >/dev/null
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null

echo "validate: every metric in the alerts and the dashboard is exported"
SCRAPE="$scrape" python3 - <<'PY'
import json, os, re, sys, yaml
exported = set(re.findall(r"^# TYPE (\S+)", os.environ["SCRAPE"], re.M))
def names(expr):
    return {n for n in re.findall(r"\b((?:etl|process)_[a-z_]+)", expr)}
used = set()
for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]:
    for r in g["rules"]:
        used |= names(r["expr"])
for p in json.load(open("deploy/grafana/loansync-dashboard.json"))["panels"]:
    for t in p["targets"]:
        used |= names(t["expr"])
base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
missing = sorted(n for n in base if n not in exported)
if missing:
    sys.exit(f"used but not exported: {missing}")
print(f"{len(base)} metric names used, all exported")
PY
echo "validate: all passed"
