#!/usr/bin/env python3
"""The backend alone (no gateway), counted as a user counts it: 2xx answers per second, with
non-2xx answers and socket errors reported beside them, never inside the throughput.

Scenarios (SCENARIOS, default "seed,overload"):

- seed: the seed's own commands, `wrk -t10 -c100 -d<DURATION> /items` and `hey -n 1000 -c 100
  -m POST ...`, against one backend instance with every default (adaptive admission, a pool of
  10) and against the seed's stack (loadtest/seed_stack: FastAPI + async SQLAlchemy + asyncpg
  under gunicorn with 2 uvicorn workers) on the same PostgreSQL, interleaved (ours, seed's,
  ours, ...). wrk's and hey's "Requests/sec" count 503s as answers; here they are not.
- overload: a slowed database (every round trip held OVERLOAD_DB_DELAY_MS by
  backend/examples/pg_delay.rs), one instance with adaptive admission and one with the fixed
  cap of 50 (ADMISSION=fixed, MAX_IN_FLIGHT=50, the seed's --limit-concurrency), the
  capacity measured first (closed loop, 50 connections, on the fixed one: no sheds at 50),
  then open-loop arrivals (backend/examples/openloop.rs) at 2x and 5x that capacity,
  interleaved, after a 2 s warm-up at the same rate: goodput (2xx/s), p50/p99 of the 2xx
  answers, 503s and errors.

Environment: ROUNDS (3), DURATION (10s), OVERLOAD_SECS (5), OVERLOAD_DB_DELAY_MS (10),
BIN (target/release: `backend` and the examples `openloop`, `pg_delay`), SCENARIOS.
Writes loadtest/results/backend-<date>/report.md and results.json.
"""

import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from harness import free_ports, log, ms, pg_bindir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, os.environ.get("BIN", "target/release"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "10s")
OVERLOAD_SECS = int(os.environ.get("OVERLOAD_SECS", "5"))
DELAY_MS = int(os.environ.get("OVERLOAD_DB_DELAY_MS", "10"))
SCENARIOS = os.environ.get("SCENARIOS", "seed,overload").split(",")
TMP = tempfile.mkdtemp(prefix="floodgate-backend-bench-")
RESULTS = os.path.join(ROOT, "loadtest", "results", "backend-" + datetime.date.today().isoformat())
PROCS = []


PG, PG_SLOW, OURS, SEED, ADAPTIVE, FIXED = free_ports(6)


def start(name, argv, env=None, cwd=None):
    out = open(os.path.join(TMP, f"{name}.log"), "w")
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                         cwd=cwd or TMP, start_new_session=True)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    PROCS.clear()


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"not answering: {url} (logs in {TMP})")


def start_postgres():
    bindir = pg_bindir()
    data = os.path.join(TMP, "pg")
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if os.geteuid() == 0:
        shutil.chown(TMP, "postgres")
        os.chmod(TMP, 0o755)
    subprocess.run(as_pg + [f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(TMP, "pg.log"), "-w", "-o",
                            f"-p {PG} -k {TMP} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    return lambda: subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)


def backend(name, port, db, **env):
    start(name, [os.path.join(BIN, "backend")],
          env={"PORT": str(port), "DATABASE_URL": db, "LOG_LEVEL": "warn", "DATA_DIR": TMP,
               "SHUTDOWN_DRAIN_DELAY": "0s", **env})
    wait_http(f"http://127.0.0.1:{port}/ready")


def wrk(url, conns=100, threads=10, duration=DURATION):
    out = subprocess.run(["wrk", "--latency", f"-t{threads}", f"-c{conns}", f"-d{duration}", url],
                         capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r = {"answers": int(done.group(1)), "non2xx": int(bad.group(1)) if bad else 0,
         "errors": sum(int(x) for x in sock.groups()) if sock else 0,
         "wrk_requests_per_sec": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    r["ok_per_s"] = (r["answers"] - r["non2xx"]) / (ms(done.group(2)) / 1000)
    r["p99_ms"] = ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    return r


def hey_post(url):
    n = 1000
    out = subprocess.run(["hey", "-n", str(n), "-c", "100", "-m", "POST", "-H", "Content-Type: application/json",
                          "-d", '{"name":"x","description":"y"}', url], capture_output=True, text=True,
                         check=True).stdout
    total = float(re.search(r"Total:\s+([\d.]+) secs", out).group(1))
    ok = sum(int(c) for c in re.findall(r"\[2\d\d\]\s+(\d+) responses", out))
    answered = sum(int(c) for c in re.findall(r"\[\d{3}\]\s+(\d+) responses", out))
    p99 = re.search(r"99%+ in ([\d.]+) secs", out)
    return {"ok_per_s": ok / total, "non2xx": answered - ok, "errors": n - answered,
            "hey_requests_per_sec": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p99_ms": float(p99.group(1)) * 1000 if p99 else 0.0}


def openloop(url, rate, secs):
    out = subprocess.run([os.path.join(BIN, "examples", "openloop"), url, str(rate), str(secs)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    r["non2xx"] = sum(v for k, v in r["statuses"].items() if not k.startswith("2"))
    return r


def metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def load_average():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def scenario_seed(db):
    backend("ours", OURS, db)
    targets = {"floodgate backend": f"http://127.0.0.1:{OURS}/items"}
    try:
        import fastapi, gunicorn, sqlalchemy, asyncpg, uvicorn  # noqa: F401,E401
        start("seed-stack", [sys.executable, "-m", "gunicorn", "app:app", "-k", "uvicorn.workers.UvicornWorker",
                             "--workers", "2", "--bind", f"127.0.0.1:{SEED}", "--log-level", "warning"],
              env={"DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{PG}/postgres"},
              cwd=os.path.join(ROOT, "loadtest", "seed_stack"))
        wait_http(f"http://127.0.0.1:{SEED}/items")
        targets["seed stack"] = f"http://127.0.0.1:{SEED}/items"
    except ImportError as e:
        log(f"  the seed's stack is not measured: python package {e.name} missing")
    runs = {t: [] for t in targets}
    for i in range(ROUNDS):
        for t, url in targets.items():
            load = load_average()
            g, p = wrk(url), hey_post(url)
            runs[t].append({"get": g, "post": p, "load_average_before": load})
            if t == "floodgate backend":
                text = urllib.request.urlopen(f"http://127.0.0.1:{OURS}/metrics", timeout=5).read().decode()
                refused = [line for line in text.splitlines() if line.startswith(("backend_shed_total", "backend_admission_limit"))
                           or (line.startswith("backend_requests_total") and 'status="2' not in line)]
                runs[t][-1]["refusals_so_far"] = refused
                log(f"  ours, so far: {'; '.join(refused)}")
            log(f"  round {i + 1} {t}: GET {g['ok_per_s']:.0f} 2xx/s (non-2xx {g['non2xx']}, errors {g['errors']}, "
                f"wrk says {g['wrk_requests_per_sec']:.0f}/s), POST {p['ok_per_s']:.0f} 2xx/s (non-2xx {p['non2xx']}, "
                f"errors {p['errors']}); load average {load}")
    out = {}
    for t, rs in runs.items():
        out[t] = {f"{k}_{m}": statistics.median(r[k][m] for r in rs) for k in ("get", "post")
                  for m in ("ok_per_s", "p99_ms")}
        out[t].update({f"{k}_{m}": sum(r[k][m] for r in rs) for k in ("get", "post") for m in ("non2xx", "errors")})
        out[t]["rounds"] = rs
    return out


def scenario_overload(db_port):
    start("pg-delay", [os.path.join(BIN, "examples", "pg_delay"), f"127.0.0.1:{PG_SLOW}", f"127.0.0.1:{db_port}",
                       str(DELAY_MS)])
    time.sleep(0.3)
    slow = f"postgres://postgres@127.0.0.1:{PG_SLOW}/postgres"
    backend("adaptive", ADAPTIVE, slow)
    backend("fixed", FIXED, slow, ADMISSION="fixed", MAX_IN_FLIGHT="50")
    targets = {"adaptive": ADAPTIVE, "fixed(50)": FIXED}
    cap = wrk(f"http://127.0.0.1:{FIXED}/items", conns=50, threads=2, duration=f"{OVERLOAD_SECS}s")
    capacity = cap["ok_per_s"]
    log(f"  capacity (closed loop, 50 connections, fixed(50)): {capacity:.0f} 2xx/s, p99 {cap['p99_ms']:.1f} ms")
    out = {"capacity": capacity, "db_delay_ms": DELAY_MS, "runs": {}}
    for mult in (2, 5):
        rate = round(capacity * mult)
        runs = {t: [] for t in targets}
        for i in range(ROUNDS):
            for t, port in targets.items():
                url = f"http://127.0.0.1:{port}/items"
                openloop(url, rate, 2)  # warm-up: the limit settles
                r = openloop(url, rate, OVERLOAD_SECS)
                r["limit"] = metric(port, "backend_admission_limit")
                r["baseline_ms"] = (metric(port, "backend_admission_baseline_seconds") or 0) * 1000
                runs[t].append(r)
                log(f"  {mult}x ({rate}/s) round {i + 1} {t}: {r['ok_per_s']:.0f} 2xx/s, p50 {r['p50_ms']:.1f} "
                    f"p99 {r['p99_ms']:.1f} ms, non-2xx {r['non2xx']}, errors {r['errors']}, limit {r['limit']:.0f}, "
                    f"baseline {r['baseline_ms']:.1f} ms")
        out["runs"][f"{mult}x"] = {
            t: {"rate": rate, "ok_per_s": statistics.median(r["ok_per_s"] for r in rs),
                "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "non2xx": sum(r["non2xx"] for r in rs), "errors": sum(r["errors"] for r in rs),
                "limit": statistics.median(r["limit"] for r in rs),
                "baseline_ms": statistics.median(r["baseline_ms"] for r in rs), "rounds": rs}
            for t, rs in runs.items()}
    return out


def report(r):
    lines = [f"# Backend benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"{os.cpu_count()} cores; {ROUNDS} interleaved rounds; medians; throughput is 2xx answers per second "
             "(non-2xx and socket errors summed over the rounds, beside it).", ""]
    goals = []
    if "seed" in r:
        s = r["seed"]
        lines += ["## The seed's commands: one backend instance (defaults) vs the seed's stack, same PostgreSQL", "",
                  f"`wrk -t10 -c100 -d{DURATION} /items`, `hey -n 1000 -c 100 -m POST` (the seed's body).", "",
                  "| | GET 2xx/s | GET p99 ms | GET non-2xx | GET errors | POST 2xx/s | POST p99 ms | POST non-2xx | POST errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t, v in s.items():
            lines.append(f"| {t} | {v['get_ok_per_s']:.0f} | {v['get_p99_ms']:.1f} | {v['get_non2xx']} | "
                         f"{v['get_errors']} | {v['post_ok_per_s']:.0f} | {v['post_p99_ms']:.1f} | "
                         f"{v['post_non2xx']} | {v['post_errors']} |")
        if "seed stack" in s:
            ours, ref = s["floodgate backend"], s["seed stack"]
            g, p = ours["get_ok_per_s"] / ref["get_ok_per_s"], ours["post_ok_per_s"] / ref["post_ok_per_s"]
            clean = ours["get_non2xx"] + ours["get_errors"] + ours["post_non2xx"] + ours["post_errors"] == 0
            lines += ["", f"Ours / the seed's stack, 2xx/s: GET {g:.1f}x, POST {p:.1f}x.", ""]
            goals.append(("GET and POST >= 10x the seed's stack in 2xx/s, 0 non-2xx and 0 errors on ours",
                          g >= 10 and p >= 10 and clean, f"GET {g:.1f}x, POST {p:.1f}x, ours clean: {clean}"))
    if "overload" in r:
        o = r["overload"]
        lines += [f"## Overload: open-loop arrivals at 2x and 5x capacity, database round trips +{o['db_delay_ms']} ms", "",
                  f"Capacity (closed loop, 50 connections, fixed(50)): {o['capacity']:.0f} 2xx/s.", "",
                  "| load | admission | offered/s | 2xx/s | 2xx/s / capacity | p50 ms (2xx) | p99 ms (2xx) | non-2xx | errors | limit | baseline ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for load, ts in o["runs"].items():
            for t, v in ts.items():
                lines.append(f"| {load} | {t} | {v['rate']} | {v['ok_per_s']:.0f} | {v['ok_per_s'] / o['capacity']:.2f} | "
                             f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['non2xx']} | {v['errors']} | "
                             f"{v['limit']:.0f} | {v['baseline_ms']:.1f} |")
            a, f = ts["adaptive"], ts["fixed(50)"]
            # The stated bound: the allowance (max(2 x baseline, baseline + 10 ms)) plus the queue
            # timeout (25 ms), with defaults.
            bound = max(2 * a["baseline_ms"], a["baseline_ms"] + 10) + 25
            goals.append((f"{load}: adaptive p99 of 2xx <= allowance + queue timeout ({bound:.0f} ms) and 2xx/s >= 0.9 "
                          "x capacity", a["p99_ms"] <= bound and a["ok_per_s"] >= 0.9 * o["capacity"],
                          f"p99 {a['p99_ms']:.1f} ms (fixed(50) {f['p99_ms']:.1f}), 2xx/s {a['ok_per_s']:.0f} "
                          f"(fixed(50) {f['ok_per_s']:.0f}) of {o['capacity']:.0f}"))
        lines.append("")
    lines += ["## Goals", ""] + [f"- {'PASS' if ok else 'FAIL'}: {n} ({d})" for n, ok, d in goals] + [""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, "results.json"), "w") as f:
        json.dump(r, f, indent=2)
    print("\n".join(lines))
    log(f"report: {os.path.join(RESULTS, 'report.md')}")


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("wrk", "hey"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run `make deps-bench`")
    stop_pg = start_postgres()
    r = {}
    try:
        db = f"postgres://postgres@127.0.0.1:{PG}/postgres"
        subprocess.run([os.path.join(BIN, "backend"), "migrate"], env={**os.environ, "DATABASE_URL": db},
                       check=True, capture_output=True)
        backend("seeder", OURS, db)
        for i in range(50):
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{OURS}/items", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"name": f"item {i}", "description": "seed"}).encode())).read()
        stop_all()
        if "seed" in SCENARIOS:
            log("the seed's commands: one backend instance vs the seed's stack")
            r["seed"] = scenario_seed(db)
            stop_all()
        if "overload" in SCENARIOS:
            log(f"overload: open loop at 2x and 5x capacity, database round trips +{DELAY_MS} ms")
            r["overload"] = scenario_overload(PG)
    finally:
        stop_all()
        stop_pg()
    report(r)
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
