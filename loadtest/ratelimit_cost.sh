#!/usr/bin/env bash
# What a per-user limit costs: GET /items/1 on one backend (SQLite, private Redis) with an
# enterprise key (limited: one Redis round trip per request) vs anonymous (not limited),
# interleaved rounds, medians of p50/p99 and the difference.
#   ROUNDS (3)  DURATION (5s)  CONNS (20)
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5s}; CONNS=${CONNS:-20}
PORT=${BACKEND_PORT:-18501}; RPORT=${REDIS_PORT:-16398}
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$TMP" >/dev/null & bench_pids+=($!)
for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
export DATA_DIR="$TMP/data" REDIS_URL="redis://127.0.0.1:$RPORT/" TIER_LIMITS="free=10/min,pro=100/min,enterprise=100000000/min"
"$ROOT/target/release/backend" seed >/dev/null
PORT=$PORT MAX_IN_FLIGHT=1000 LOG_LEVEL=warn "$ROOT/target/release/backend" 2>"$TMP/backend.log" & bench_pids+=($!)
wait_http "http://127.0.0.1:$PORT/ready"
curl -fsS -XPOST -H 'Content-Type: application/json' -d '{"name":"x"}' "http://127.0.0.1:$PORT/items" >/dev/null
declare -A p50 p99 rps
for r in $(seq 1 "$ROUNDS"); do
  for mode in anonymous limited; do
    if [ $mode = limited ]; then hdr=(-H "X-API-Key: fg_demo_enterprise_key"); else hdr=(); fi
    read -r q a b bad < <(wrk_run "http://127.0.0.1:$PORT/items/1" "${hdr[@]}" -t2 -c"$CONNS" -d"$DURATION")
    echo "round $r $mode: $q req/s p50 ${a}ms p99 ${b}ms non-2xx $bad"
    rps[$mode]+="$q "; p50[$mode]+="$a "; p99[$mode]+="$b "
  done
done
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
{
  echo "## ratelimit_cost ($(date -u +%FT%TZ))"
  machine
  echo "- GET /items/1, one backend (SQLite), wrk -t2 -c$CONNS -d$DURATION, $ROUNDS interleaved rounds, medians"
  echo
  echo "| caller | req/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|"
  for m in anonymous limited; do echo "| $m | $(med "${rps[$m]}") | $(med "${p50[$m]}") | $(med "${p99[$m]}") |"; done
  echo
  echo "Added by the limit: p50 +$(awk -v a="$(med "${p50[limited]}")" -v b="$(med "${p50[anonymous]}")" 'BEGIN{printf "%.3f", a-b}') ms, p99 +$(awk -v a="$(med "${p99[limited]}")" -v b="$(med "${p99[anonymous]}")" 'BEGIN{printf "%.3f", a-b}') ms"
} | tee -a "$RESULTS/report.md"
