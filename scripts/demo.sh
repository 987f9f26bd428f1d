#!/usr/bin/env bash
# `make demo`: three backend instances (8001-8003) and the gateway on :8000, in the
# foreground. Ctrl-C stops every process this script started.
#   DATABASE_URL  use PostgreSQL instead of the embedded SQLite file under data/
#   REDIS_URL     share per-user limits through Redis (see README)
#   DEMO_SECONDS  stop by itself after this many seconds (scripted runs)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
mkdir -p data/logs
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping ${#pids[@]} processes..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "stopped."
}
trap cleanup INT TERM EXIT

if [ -n "${DATABASE_URL:-}" ]; then echo "storage: PostgreSQL ($DATABASE_URL)"; else echo "storage: embedded SQLite (data/floodgate.db)"; fi
"$BIN/backend" seed > data/logs/seed.txt
for i in 1 2 3; do
  PORT=800$i INSTANCE_ID=backend-$i "$BIN/backend" > "data/logs/backend-$i.log" 2>&1 &
  pids+=($!)
done
"$BIN/gateway" -c "${CONFIG:-config/gateway.yaml}" > data/logs/gateway.log 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fsS -o /dev/null http://127.0.0.1:8000/items 2>/dev/null && break
  sleep 0.1
done

cat <<MSG

Floodgate is running.
  gateway        http://localhost:8000        (config: ${CONFIG:-config/gateway.yaml})
  gateway stats  http://localhost:9100/metrics
  backends       http://localhost:8001 .. 8003 (each has /health, /ready, /metrics)
  logs           data/logs/

Demo API keys:
$(sed 's/^/  /' data/logs/seed.txt)

Try:
  for i in 1 2 3 4 5 6; do curl -s -D- -o /dev/null localhost:8000/items | grep -i x-served-by; done
  curl -s -XPOST -H 'Content-Type: application/json' -d '{"name":"x","description":"y"}' localhost:8000/items
  curl -s localhost:9100/metrics | grep gateway_requests_total
  wrk -t10 -c100 -d10s http://localhost:8000/items
  hey -n 1000 -c 100 -m POST -H "Content-Type: application/json" -d '{"name":"x","description":"y"}' http://localhost:8000/items

Ctrl-C stops everything.
MSG

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
else
  wait -n "${pids[@]}" || true
  echo "a process exited; see data/logs/"
fi
