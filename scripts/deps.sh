#!/usr/bin/env bash
# Install the system packages Floodgate needs, when they are missing.
#   scripts/deps.sh          build + test needs: cmake (pingora), redis-server, postgresql,
#                            wrk + hey + curl + openssl (the scripted demo), docker-compose (compose check),
#                            ss (iproute2: a test counts the TCP segments an answer arrives in)
#   scripts/deps.sh bench    plus what the load tests compare against: nginx, haproxy, valgrind
#                            (instruction counts), h2load (nghttp2-client: TLS handshakes and
#                            HTTP/2), and (pip)
#                            matplotlib and the seed's FastAPI stack
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have cmake || need+=(cmake)
have redis-server || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
have wrk || need+=(wrk)
have hey || need+=(hey)
have curl || need+=(curl)
have openssl || need+=(openssl)   # the demo's and the deploy check's certificates
have ss || need+=(iproute2)
have docker-compose || need+=(docker-compose)
if [ "${1:-}" = bench ]; then
  have nginx || [ -x /usr/sbin/nginx ] || need+=(nginx)
  have haproxy || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
  have valgrind || need+=(valgrind)
  have h2load || need+=(nghttp2-client)   # HTTP/2 and TLS benchmarks (issue 22)
  python3 -c "import matplotlib" 2>/dev/null || pip_need=1
  python3 -c "import fastapi, gunicorn, uvicorn, sqlalchemy, asyncpg, greenlet" 2>/dev/null || seed_need=1
fi

if [ "${pip_need:-0}" = 1 ]; then
  python3 -m pip install -q matplotlib || echo "matplotlib unavailable: the report will have no charts" >&2
fi
if [ "${seed_need:-0}" = 1 ]; then
  python3 -m pip install -q -r "$(dirname "$0")/../loadtest/seed_stack/requirements.txt" ||
    echo "the seed's Python stack is unavailable: the backend benchmark will say it was not measured" >&2
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${need[*]}" >&2
  echo "install them with:  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends "${need[@]}"
}
# Debian starts the packaged services; our tests and demo start their own on free ports.
for svc in redis-server postgresql nginx haproxy; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
done
