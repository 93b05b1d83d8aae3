#!/usr/bin/env python3
"""The cost benchmark (issue 24): the whole system's CPU per record (loansync + PostgreSQL +
the stub API) against PostgreSQL's own extraction of the same rows as JSON
(bench/extract.sql), measured in one run on one machine, builds alternated.

Run by bench/cost.sh, which builds the binaries; see there for usage. PostgreSQL's CPU is
that of the benchmark database's backends (told apart by their process titles, sampled
every 0.2 s so that a backend that exits still counts) and of the writers every database
shares (checkpointer, background writer, WAL writer); the whole cluster's CPU (the
postmaster and its children, exited ones included) is kept beside it, and the script
warns when the two differ, i.e. when other databases were at work.
"""
import json, os, socket, subprocess, sys, threading, time

TICK = os.sysconf("SC_CLK_TCK")
PG = ["-h", "127.0.0.1", "-U", "postgres"]


def stat_cpu(pid, children=False):
    """utime + stime (+ cutime + cstime) of a process, in seconds; 0 when it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3): utime is field 14, i.e. fields[11].
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / TICK


def postmaster_pid():
    out = subprocess.run(["psql", *PG, "-d", "postgres", "-Atc",
                          "SELECT setting FROM pg_settings WHERE name = 'data_directory'"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return int(open(os.path.join(out, "postmaster.pid")).readline())


def pg_cpu(pm):
    """PostgreSQL's CPU so far: the postmaster, its reaped children, its live children."""
    total = stat_cpu(pm, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pm:
            total += stat_cpu(int(entry))
    return total


BACKGROUND = ("checkpointer", "background writer", "walwriter")


class PgSampler:
    """PostgreSQL's CPU spent for one database: its backends (and its autovacuum
    workers), told apart by their process titles, sampled every `every` seconds so that a
    backend that exits during the run still counts (up to its last sample), plus the
    processes every database shares (checkpointer, background writer, WAL writer), whose
    figure includes other databases' work when there is any."""

    def __init__(self, pm, db, every=0.2):
        self.pm, self.db, self.every = pm, db, every
        self.first, self.last = {}, {}
        self.stop = threading.Event()
        self.sample(initial=True)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def mine(self, pid):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
        if f" {self.db} " in title or title.rstrip().endswith(f" {self.db}"):
            return "backend"
        if any(b in title for b in BACKGROUND):
            return "shared"
        return None

    def sample(self, initial=False):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid != self.pm:
                continue
            kind = self.mine(pid)
            if kind is None:
                continue
            cpu = stat_cpu(pid)
            if pid not in self.first:
                # A process older than the measurement counts from now; a new one from 0.
                self.first[pid] = (kind, cpu if initial else 0.0)
            self.last[pid] = cpu

    def run(self):
        while not self.stop.wait(self.every):
            self.sample()

    def finish(self):
        self.stop.set()
        self.thread.join()
        self.sample()
        out = {"backend": 0.0, "shared": 0.0}
        for pid, (kind, first) in self.first.items():
            out[kind] += self.last.get(pid, first) - first
        return out


def psql(db, sql):
    return subprocess.run(["psql", *PG, "-d", db, "-Atqc", sql], capture_output=True,
                          text=True, check=True).stdout.strip()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def measure(pm, db, cmd, env, stub=None):
    """Runs `cmd`; returns (loansync CPU, PostgreSQL CPU for `db`, stub CPU, wall, the
    whole cluster's CPU) in seconds."""
    before = os.times()
    sampler = PgSampler(pm, db)
    pg0, st0, t0 = pg_cpu(pm), (stat_cpu(stub) if stub else 0.0), time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = os.times()
    own = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    pg = sampler.finish()
    return own, pg["backend"] + pg["shared"], (stat_cpu(stub) - st0 if stub else 0.0), wall, pg_cpu(pm) - pg0


def main():
    size, runs, template, builds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    pm = postmaster_pid()
    results = {}  # (label, phase) -> list of dicts
    refs = []
    warnings = set()
    for run in range(1, runs + 1):
        # The references, once a run: PostgreSQL extracting the same rows as JSON, and
        # PostgreSQL reading the rows a sync reads (loansync's loader, nothing written).
        db = f"loansync_cost_{size.lower()}_ref"
        psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        psql("postgres", f"CREATE DATABASE {db} TEMPLATE {template}")
        psql(db, "VACUUM (ANALYZE)")
        env = dict(os.environ, PGSSLMODE="disable")
        _, ext_pg, _, ext_wall, _ = measure(pm, db, ["psql", *PG, "-d", db, "-q", "-f", "bench/extract.sql", "-o", "/dev/null"], env)
        records = int(psql(db, "SELECT (SELECT count(*) FROM accounts_customuser WHERE user_type IN "
                               "('AGENT','STAFF_AGENT','PROSPER_AGENT','DMO_AGENT','AJO_AGENT','RECOVERY_AGENT')) "
                               "+ (SELECT count(*) FROM ajo_ajouser WHERE onboarding_complete) "
                               "+ (SELECT count(*) FROM loans_ajoloan WHERE is_disbursed) "
                               "+ (SELECT count(*) FROM loans_ajoloanrepayment)"))
        load = builds[0].split("=", 1)[1].replace("/loansync", "/examples/load_bench")
        env_load = dict(env, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable",
                        BENCH_CHUNKS="100000000", BENCH_ROUNDS="1",
                        BENCH_ENTITIES="loan,repayment,customer")
        rd_own, rd_pg, _, _, _ = measure(pm, db, [load], env_load)
        refs.append({"run": run, "records": records, "extract_pg_us": ext_pg * 1e6 / records,
                     "read_pg_us": rd_pg * 1e6 / records, "read_loansync_us": rd_own * 1e6 / records,
                     "extract_wall_s": ext_wall})
        psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        for build in builds:
            label, binary = build.split("=", 1)
            db = f"loansync_cost_{size.lower()}_{label.replace('-', '_')}"
            psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql("postgres", f"CREATE DATABASE {db} TEMPLATE {template}")
            port = free_port()
            env = dict(os.environ, DATABASE_URL=f"postgres://postgres@127.0.0.1:5432/{db}?sslmode=disable",
                       ANALYTICS_API_URL=f"http://127.0.0.1:{port}", ANALYTICS_API_KEY="dev-local-key",
                       RUST_LOG="error", ETL_QUEUE_PREFIX=f"cost-{label}-{os.getpid()}")
            subprocess.run([binary, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
            psql(db, "VACUUM (ANALYZE)")
            stub = subprocess.Popen([binary, "stub-api", "--addr", f"127.0.0.1:{port}"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            psql(db, "CHECKPOINT")
            for phase, args in [("first full sync", ["sync", "--full"]),
                                ("re-sync, unchanged", ["sync", "--full"]),
                                ("sweep, no change", ["sync", "--sweep"]),
                                ("sweep again, no change", ["sync", "--sweep"])]:
                own, pgc, stc, wall, cluster = measure(pm, db, [binary, *args, "--json"], env, stub.pid)
                if cluster > pgc * 1.1 + 0.5:
                    warnings.add("other databases used PostgreSQL during some measurements: its "
                                 "figures count only this database's backends (and the shared "
                                 "writers), see `cluster_pg_us` in the report")
                results.setdefault((label, phase), []).append(
                    {"run": run, "loansync_us": own * 1e6 / records, "pg_us": pgc * 1e6 / records,
                     "stub_us": stc * 1e6 / records, "wall_s": wall,
                     "cluster_pg_us": cluster * 1e6 / records})
            stub.terminate()
            stub.wait()
            psql("postgres", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    # The table: medians over the runs.
    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    ref = med([r["extract_pg_us"] for r in refs])
    read = med([r["read_pg_us"] for r in refs])
    print(f"dataset {size}: {refs[0]['records']:,} records, {runs} run(s) per build, builds alternated; "
          f"medians in CPU µs per record")
    print(f"reference: PostgreSQL's own extraction (bench/extract.sql) {ref:.1f} µs; "
          f"PostgreSQL reading the rows a sync reads (examples/load_bench, nothing written) {read:.1f} µs")
    print()
    print("| build | sync | loansync | PostgreSQL | stub | total | total ÷ ref | PostgreSQL ÷ read | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = {"size": size, "runs": runs, "records": refs[0]["records"], "extract_pg_us": ref,
           "read_pg_us": read, "references": refs, "rows": []}
    full_total = {}
    for build in builds:
        label = build.split("=", 1)[0]
        for phase in ["first full sync", "re-sync, unchanged", "sweep, no change", "sweep again, no change"]:
            rs = results[(label, phase)]
            l, p, s = med([r["loansync_us"] for r in rs]), med([r["pg_us"] for r in rs]), med([r["stub_us"] for r in rs])
            w = med([r["wall_s"] for r in rs])
            total = l + p + s
            if phase == "first full sync":
                full_total[label] = total
            extra = f" ({total / full_total[label]:.2f} × the full sync)" if phase.startswith("sweep") else ""
            print(f"| {label} | {phase} | {l:.1f} | {p:.1f} | {s:.1f} | {total:.1f} | {total / ref:.2f}{extra} | {p / read:.2f} | {w:.1f} |")
            out["rows"].append({"build": label, "sync": phase, "loansync_us": l, "pg_us": p, "stub_us": s,
                                "total_us": total, "ratio": total / ref, "pg_over_read": p / read,
                                "wall_s": w, "runs": rs})
    for w in sorted(warnings):
        print(f"\nwarning: {w}")
    out["warnings"] = sorted(warnings)
    path = f"bench/report-cost-{size}.json"
    json.dump(out, open(path, "w"), indent=1)
    print(f"\n(written to {path})")


if __name__ == "__main__":
    main()
