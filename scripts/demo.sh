#!/usr/bin/env bash
# `make demo`: three backend instances (8001-8003), the mock vendor (9000) and the gateway on
# :8000, in the foreground. Ctrl-C stops every process this script started.
#   DATABASE_URL  use PostgreSQL instead of the embedded SQLite file under data/
#   REDIS_URL     share per-user and vendor limits through this Redis; when unset and
#                 redis-server is installed, a private one is started on :6390
#   GATEWAYS      2: a second gateway replica on :8010 (metrics :9110); both share the /llm
#                 per-IP limit and the global limit through the demo's Redis (`scope: cluster`)
#   DEMO_SECONDS  stop by itself after this many seconds (scripted runs)
#   BIN           where the binaries are (default target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
CONFIG=${CONFIG:-config/gateway.yaml}
GATEWAYS=${GATEWAYS:-1}
case "$GATEWAYS" in 1|2) ;; *) echo "GATEWAYS must be 1 or 2" >&2; exit 1;; esac
mkdir -p data/logs
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping ${#pids[@]} processes..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -f data/gateway.pid
  echo "stopped."
}
trap cleanup INT TERM EXIT

wait_http() { # url
  for _ in $(seq 1 150); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "not answering: $1 (see data/logs/)" >&2; return 1
}

# The demo's fixed ports must be free, so it never talks to somebody else's server by mistake.
ports=(8000 8001 8002 8003 8080 8443 9000 9100)
[ "$GATEWAYS" = 2 ] && ports+=(8010 9110)
[ -z "${REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1 && ports+=(6390)
busy=()
for p in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then busy+=("$p"); fi
done
if [ ${#busy[@]} -gt 0 ]; then
  echo "ports already in use on 127.0.0.1: ${busy[*]} (another demo or server?); stop it first" >&2
  exit 1
fi

if [ -n "${DATABASE_URL:-}" ]; then storage="PostgreSQL ($DATABASE_URL)"; else storage="embedded SQLite (data/floodgate.db)"; fi
if [ -z "${REDIS_URL:-}" ] && command -v redis-server >/dev/null 2>&1; then
  mkdir -p data/redis
  redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no --dir data/redis \
    > data/logs/redis.log 2>&1 &
  pids+=($!)
  export REDIS_URL=redis://127.0.0.1:6390/
  limits="shared through a private Redis ($REDIS_URL)"
elif [ -n "${REDIS_URL:-}" ]; then
  limits="shared through Redis ($REDIS_URL)"
else
  limits="per instance (no Redis: install redis-server or set REDIS_URL to share them)"
fi
echo "storage: $storage"
echo "per-user limits: $limits"
if [ "$GATEWAYS" = 2 ] && [ -z "${REDIS_URL:-}" ]; then
  echo "GATEWAYS=2 shares the gateways' limits through Redis: install redis-server or set REDIS_URL" >&2
  exit 1
fi

"$BIN/mock-vendor" --listen 127.0.0.1:9000 --limit 500 --window 60s --latency 200ms \
  > data/logs/mock-vendor.log 2>&1 &
pids+=($!)
"$BIN/backend" seed > data/logs/seed.txt
for i in 1 2 3; do
  PORT=800$i INSTANCE_ID=backend-$i VENDOR_URL=http://127.0.0.1:9000/v1/complete \
    "$BIN/backend" > "data/logs/backend-$i.log" 2>&1 &
  pids+=($!)
done
if [ "$GATEWAYS" = 2 ]; then
  # The same config with the /llm and global limits made cluster-wide, once per replica.
  cluster_config() { # listen-port metrics-port
    sed -e "s/^listen: .*/listen: [\"0.0.0.0:$1\"]/" \
        -e "s/^metrics_listen: .*/metrics_listen: \"127.0.0.1:$2\"/" \
        -e 's/^\(    - {prefix: \/llm, per_ip: {rate: 20r\/m, burst: 5\)}}/\1, scope: cluster}}/' \
        -e 's/^\(  global: {rate: [^}]*\)}/\1, scope: cluster}/' \
        -e 's/, delay: false, max_delay: 1s, scope: cluster}/, scope: cluster}/' "$CONFIG"
    printf 'cluster: {redis: "%s", replicas: 2}\n' "$REDIS_URL"
  }
  cluster_config 8000 9100 > data/gateway-1.yaml
  cluster_config 8010 9110 > data/gateway-2.yaml
  CONFIG=data/gateway-1.yaml
  grep -q 'prefix: /llm.*scope: cluster' "$CONFIG" || { echo "could not make /llm cluster-wide in $CONFIG" >&2; exit 1; }
  "$BIN/gateway" -c data/gateway-2.yaml --upgrade-sock "$PWD/data/gateway-2-upgrade.sock" > data/logs/gateway-2.log 2>&1 &
  pids+=($!)
  echo "$!" > data/gateway-2.pid
fi
# TLS on :8443 (HTTP/2 and HTTP/1.1) with a self-signed certificate made here, once, and
# :8080 redirecting to it: the demo's config is $CONFIG with those listeners added.
mkdir -p data/tls
if [ ! -s data/tls/localhost.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout data/tls/localhost.key -out data/tls/localhost.pem 2>/dev/null
fi
tls_listen="{address: \"0.0.0.0:8443\", tls: {certificates: [{cert: \"$PWD/data/tls/localhost.pem\", key: \"$PWD/data/tls/localhost.key\"}]}}"
redirect_listen="{address: \"0.0.0.0:8080\", redirect_https: {port: 8443}}"
sed -E "s|^listen: \[(.*)\]$|listen: [\1, $tls_listen, $redirect_listen]|" "$CONFIG" > data/gateway-demo.yaml
CONFIG=data/gateway-demo.yaml
"$BIN/gateway" -c "$CONFIG" --upgrade-sock "$PWD/data/gateway-upgrade.sock" > data/logs/gateway.log 2>&1 &
gateway_pid=$!
pids+=($gateway_pid)
echo "$gateway_pid" > data/gateway.pid

wait_http http://127.0.0.1:9000/health
for i in 1 2 3; do wait_http "http://127.0.0.1:800$i/ready"; done
wait_http http://127.0.0.1:8000/items
[ "$GATEWAYS" = 2 ] && wait_http http://127.0.0.1:8010/items
# The gateway routes to a backend once a health check passed: wait for all three.
for _ in $(seq 1 100); do
  up=$(curl -s http://127.0.0.1:9100/metrics | grep -c '^gateway_backend_up{.*} 1$' || true)
  [ "$up" = 3 ] && break
  sleep 0.1
done

replicas=""
if [ "$GATEWAYS" = 2 ]; then
  replicas="
  second gateway http://localhost:8010        (config: data/gateway-2.yaml, stats :9110)
                 both share the /llm per-IP limit and the global limit through $REDIS_URL
  # one client's /llm limit (20/min, burst 5: 6 at once) holds across both gateways: 6 pass (7 at most: a lease in flight), not 12
  for i in \$(seq 1 6); do for p in 8000 8010; do curl -s -o /dev/null -w \"\$p:%{http_code} \" --interface 127.0.0.3 -XPOST localhost:\$p/llm; done; done; echo
  curl -s localhost:9110/metrics | grep -E 'gateway_cluster_(replicas|limits_degraded)'
"
fi
cat <<MSG

Floodgate is running.$replicas
  gateway        http://localhost:8000        (config: $CONFIG)
                 https://localhost:8443       (HTTP/2 and HTTP/1.1; self-signed: data/tls/localhost.pem)
                 http://localhost:8080        (redirects to https://localhost:8443)
  gateway stats  http://localhost:9100/metrics
  backends       http://localhost:8001 .. 8003 (each has /health, /ready, /metrics)
  mock vendor    http://localhost:9000/stats  (contract 500 calls/min)
  logs           data/logs/

Demo API keys:
$(sed 's/^/  /' data/logs/seed.txt)

Try:
  # round robin, visible in X-Served-By
  for i in 1 2 3 4 5 6; do curl -s -D- -o /dev/null localhost:8000/items | grep -i x-served-by; done
  # over TLS and HTTP/2
  curl --http2 --cacert data/tls/localhost.pem https://localhost:8443/items
  # the seed's payload
  curl -s -XPOST -H 'Content-Type: application/json' -d '{"name":"x","description":"y"}' localhost:8000/items
  # a per-IP 429 from the gateway (/llm allows 20/min, burst 5, per client IP; 127.0.0.1 is exempt)
  for i in \$(seq 1 8); do curl -s -o /dev/null -w '%{http_code} ' --interface 127.0.0.2 -XPOST localhost:8000/llm; done; echo
  # a per-user 429 from the backends (free tier: 10/min)
  for i in \$(seq 1 12); do curl -s -o /dev/null -w '%{http_code} ' -H 'X-API-Key: fg_demo_free_key' localhost:8000/items; done; echo
  # a vendor call through the guarded pipeline
  curl -s -XPOST -H 'X-API-Key: fg_demo_pro_key' -H 'Content-Type: application/json' -d '{"prompt":"hello"}' localhost:8000/llm
  # metrics
  curl -s localhost:9100/metrics | grep -E 'gateway_(requests|rejections)_total'
  curl -s localhost:8001/metrics | grep backend_vendor_stage_total
  # reload the gateway config in place (edit $CONFIG first)
  kill -HUP \$(cat data/gateway.pid)
  # the seed's load tests
  wrk -t10 -c100 -d10s http://localhost:8000/items
  hey -n 1000 -c 100 -m POST -H "Content-Type: application/json" -d '{"name":"x","description":"y"}' http://localhost:8000/items

Ctrl-C stops everything.
MSG

if [ -n "${DEMO_SECONDS:-}" ]; then
  # In the background so a signal to this script runs the cleanup at once.
  sleep "$DEMO_SECONDS" &
  pids+=($!)
  wait "$!" || true
else
  wait -n "${pids[@]}" || true
  echo "a process exited; see data/logs/"
fi
