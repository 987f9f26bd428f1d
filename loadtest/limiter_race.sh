#!/usr/bin/env bash
# The seed's read-then-add vendor limiter vs Floodgate's atomic Lua script, same load, same
# private Redis: how many calls each admits for a limit of LIMIT in one window.
#   LIMIT (50)  CALLERS (200)  ROUNDS (5)
source "$(dirname "$0")/lib.sh"
PORT=${REDIS_PORT:-16399}
cargo build -q --release -p floodgate-backend --example limiter_race
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" >/dev/null & bench_pids+=($!)
for _ in $(seq 1 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
{
  echo "## limiter_race ($(date -u +%FT%TZ))"
  echo '```'
  "$ROOT/target/release/examples/limiter_race" "redis://127.0.0.1:$PORT/" "${LIMIT:-50}" "${CALLERS:-200}" "${ROUNDS:-5}"
  echo '```'
} | tee -a "$RESULTS/report.md"
