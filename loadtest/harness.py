"""What both load-test runners (run.py, backend_bench.py) need alike: free ports, log lines,
wrk's latency units, PostgreSQL's binaries."""

import os
import random
import socket
import subprocess


def free_ports(n):
    """n distinct loopback TCP ports free right now, below the ephemeral range (the kernel
    never hands those to outgoing connections), so a run never meets someone else's server."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = []
    while len(ports) < n:
        p = random.randrange(10_000, ephemeral_low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", p))
            except OSError:
                continue
        if p not in ports:
            ports.append(p)
    return ports


def log(msg):
    print(msg, flush=True)


def ms(v):
    """A wrk latency ("850.00us", "1.20ms", "2.01s", "1.00m") in milliseconds."""
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3), ("m", 6e4)):
        if v.endswith(unit):
            return float(v[:-len(unit)]) * f
    return float(v)


def pg_bindir():
    """Where initdb and pg_ctl are: pg_config's answer, else the newest Debian install."""
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    if not os.path.exists(os.path.join(bindir, "initdb")):
        bindir = sorted(f"/usr/lib/postgresql/{v}/bin" for v in os.listdir("/usr/lib/postgresql"))[-1]
    return bindir
