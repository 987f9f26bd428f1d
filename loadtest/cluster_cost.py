#!/usr/bin/env python3
"""What `scope: cluster` costs (issue 24), and what Redis holds for it.

`cost` (default): scenario 1's path (GET through the gateway to the trivial upstream) with the
global and per-IP limits `scope: local` against the same limits `scope: cluster` (a private
Redis, two simulated replicas' worth of share), interleaved rounds of wrk (2xx/s, CPU per
request, medians), then user-space instructions per request under callgrind for each. The
limits are set high enough that nothing is refused: this is the price of the mechanism on
every request, not of refusals.

`memory`: Redis's bytes per synced key, from keys written as the gateway's script writes them
(name, value, expiry; `SIMULATED` keys, default 100,000), and the figure for a 1M-address spray.

Environment: ROUNDS (3), DURATION (10s), CONNS (50), WORKERS (1), BIN (target/release),
SMOKE=1, SIMULATED. Run under `flock /work/bench.lock` on a shared machine.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the scenario-1 helpers: wrk, loadgen, interleaved, callgrind)
from harness import free_ports, log  # noqa: E402

LIMITS = {
    "local": "",
    "cluster": ", scope: cluster",
}


def start_redis(port):
    run.start(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", run.TMP])
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def conf(scope, port, metrics, redis_port):
    s = LIMITS[scope]
    cluster = f'cluster: {{redis: "redis://127.0.0.1:{redis_port}/", replicas: 2}}\n' if s else ""
    return f"""listen: ["127.0.0.1:{port}"]
metrics_listen: "127.0.0.1:{metrics}"
workers: {run.WORKERS}
log_level: warn
access_log: false
upstream:
  backends: ["127.0.0.1:{run.UP}"]
  health_check: {{interval: 1s, timeout: 1s, failures: 2, successes: 1}}
limits:
  global: {{rate: 10000000r/s, burst: 1000000{s}}}
  per_ip: {{rate: 1000000r/s, burst: 100000{s}}}
connections: {{per_ip: 60000, total: 100000}}
{cluster}"""


def argv(scope, port, metrics, redis_port):
    path = os.path.join(run.TMP, f"{scope}.yaml")
    with open(path, "w") as f:
        f.write(conf(scope, port, metrics, redis_port))
    return [os.path.join(run.BIN, "gateway"), "-c", path, "--upgrade-sock", os.path.join(run.TMP, f"{scope}.sock")]


def instructions(scope, redis_port):
    """Callgrind's user-space instructions per request (as loadtest/run.py's `instructions`)."""
    port, metrics = free_ports(2)
    r = run.callgrind_per_request(scope, argv(scope, port, metrics, redis_port), port)
    return r["instructions"], r["requests"]


def cost():
    (redis_port,) = free_ports(1)
    start_redis(redis_port)
    run.start_fast_upstream(run.UP)
    targets = {}
    for scope in LIMITS:
        port, metrics = free_ports(2)
        p = run.start(scope, argv(scope, port, metrics, redis_port))
        url = f"http://127.0.0.1:{port}/items"
        run.wait_http(url)
        targets[scope] = (url, p.pid)
    out = run.interleaved(targets, lambda u: run.wrk(u), "cluster_cost")
    for _, pid in targets.values():
        run.stop(pid)
    ins = {scope: instructions(scope, redis_port) for scope in LIMITS}
    lo, cl = out["local"], out["cluster"]
    print(f"\n## cluster_cost: scope local vs cluster, scenario 1's path ({run.ROUNDS} interleaved rounds of "
          f"wrk -c{run.CONNS} -d{run.DURATION}, {run.WORKERS} worker(s), medians)\n")
    print("| scope | 2xx/s | p99 ms | CPU µs/request | instructions/request (callgrind) |")
    print("|---|---|---|---|---|")
    for scope, r in out.items():
        print(f"| {scope} | {r['rps']:,.0f} | {r['p99']:.2f} | {r['user_us'] + r['sys_us']:.1f} | "
              f"{ins[scope][0]:,.0f} |")
    print(f"\ncluster / local: {cl['rps'] / lo['rps']:.3f} x 2xx/s, "
          f"{(cl['user_us'] + cl['sys_us']) / (lo['user_us'] + lo['sys_us']):.3f} x CPU per request, "
          f"{ins['cluster'][0] / ins['local'][0]:.3f} x instructions per request; non-2xx "
          f"{lo['non2xx']} / {cl['non2xx']}")


def memory():
    """Redis's memory per synced key: SIMULATED keys of the gateway's shape, written by one
    script (a key per window, `<prefix>:rl:<limit>:<count>r<window>b<burst>:<key hex>`, a TAT
    in µs, an expiry)."""
    n = int(os.environ.get("SIMULATED", "1000" if run.SMOKE else "100000"))
    (port,) = free_ports(1)
    start_redis(port)
    cli = ["redis-cli", "-p", str(port)]

    def used():
        info = subprocess.run(cli + ["info", "memory"], capture_output=True, text=True).stdout
        return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("used_memory:")))

    before = used()
    script = """
local now = redis.call('TIME')
local tat = tonumber(now[1]) * 1000000 + tonumber(now[2]) + 5000000
for i = 1, tonumber(ARGV[1]) do
  local ip = 167772160 + i
  redis.call('SET', 'floodgate:rl:per_ip:100r1b200:' .. string.format('%x', ip), tat, 'PX', 600000)
end
return redis.call('DBSIZE')
"""
    keys = int(subprocess.run(cli + ["eval", script, "0", str(n)], capture_output=True, text=True,
                              check=True).stdout.strip())
    per_key = (used() - before) / keys
    print(f"\n## cluster_memory: {keys:,} synced per-IP keys (one window) take {used() - before:,} bytes in "
          f"Redis: {per_key:.0f} bytes a key")
    print(f"- 1M spoofed addresses, one request each (under their share): 0 keys (cold keys never reach Redis)")
    print(f"- worst case, every address over its share on every replica: at most HOT_SLOTS (16,384) keys per "
          f"limit and replica at once, {16384 * per_key / 1e6:.1f} MB per replica per window, each expiring "
          f"with its window")
    print(f"- if all 1M were synced (they cannot be at once): {1_000_000 * per_key / 1e6:.0f} MB")


if __name__ == "__main__":
    try:
        {"cost": cost, "memory": memory}[sys.argv[1] if len(sys.argv) > 1 else "cost"]()
    finally:
        run.stop_all()
