#!/usr/bin/env bash
# Scenario 1, proxy overhead: a trivial upstream that answers at once, so the proxy is the
# bottleneck. Interleaved rounds of: direct to the upstream (the ceiling), Floodgate with its
# protections off, Floodgate with every protection on at values that never reject, nginx.
#   ROUNDS (3)  DURATION (5s)  CONNS (50)  THREADS (2)  WORKERS (2)  EXTRA_YAML (appended)
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5s}; CONNS=${CONNS:-50}; THREADS=${THREADS:-2}
WORKERS=${WORKERS:-2}; UP=${UP_PORT:-18101}; GW=${GW_PORT:-18000}; NG=${NGINX_PORT:-18080}
LABEL=${LABEL:-proxy_overhead}

"$ROOT/target/release/examples/fast_upstream" "$UP" 1 & bench_pids+=($!)
GWP=$((GW + 10))
gateway_config() { # port protections
  cat <<YAML
listen: ["127.0.0.1:$1"]
metrics_listen: "127.0.0.1:$(($1 + 1))"
workers: $WORKERS
log_level: warn
access_log: false
upstream:
  backends: ["127.0.0.1:$UP"]
  health_check: {interval: 1s}
YAML
  if [ "$2" = off ]; then
    printf 'limits: {per_ip: null, global: null}\nconnections: {per_ip: 0, total: 0}\n'
  else
    cat <<YAML
  max_concurrent_per_backend: 100000
limits:
  global: {rate: 10000000r/s, burst: 1000000}
  per_ip: {rate: 1000000r/s, burst: 100000}
  routes: [{prefix: /llm, per_ip: {rate: 1000r/s, burst: 100}}]
connections: {per_ip: 100000, total: 100000}
buffers: {max_body_bytes: 1048576, max_header_bytes: 16384, max_headers: 100}
slow_clients: {header_timeout: 10s, body_idle_timeout: 10s, keepalive_timeout: 60s}
YAML
  fi
}
gateway_config "$GW" off > "$TMP/gateway.yaml"
gateway_config "$GWP" on > "$TMP/gateway-protected.yaml"
"$ROOT/target/release/gateway" -c "$TMP/gateway.yaml" --upgrade-sock "$TMP/up.sock" 2>"$TMP/gateway.log" & bench_pids+=($!)
"$ROOT/target/release/gateway" -c "$TMP/gateway-protected.yaml" --upgrade-sock "$TMP/up2.sock" 2>"$TMP/gateway2.log" & bench_pids+=($!)
sed -e "s|__WORKERS__|$WORKERS|; s|__TMP__|$TMP|g; s|__PORT__|$NG|; s|__UPSTREAMS__|server 127.0.0.1:$UP;|" \
  "$ROOT/loadtest/nginx/overhead.conf.tmpl" > "$TMP/nginx.conf"
mkdir -p "$TMP/body" "$TMP/proxy"
nginx -c "$TMP/nginx.conf" -p "$TMP"
wait_http "http://127.0.0.1:$UP/"; wait_http "http://127.0.0.1:$NG/"
sleep 1.5; wait_http "http://127.0.0.1:$GW/"; wait_http "http://127.0.0.1:$GWP/"

declare -A rps p50 p99
for r in $(seq 1 "$ROUNDS"); do
  for target in direct floodgate floodgate_protected nginx; do
    case $target in direct) port=$UP;; floodgate) port=$GW;; floodgate_protected) port=$GWP;; nginx) port=$NG;; esac
    read -r q a b bad < <(wrk_run "http://127.0.0.1:$port/items" -t"$THREADS" -c"$CONNS" -d"$DURATION")
    echo "round $r $target: $q req/s p50 ${a}ms p99 ${b}ms non-2xx $bad"
    rps[$target]+="$q "; p50[$target]+="$a "; p99[$target]+="$b "
  done
done
med() { tr ' ' '\n' <<<"$1" | grep . | median; }
{
  echo "## $LABEL ($(date -u +%FT%TZ))"
  machine
  echo "- wrk -t$THREADS -c$CONNS -d$DURATION, $ROUNDS interleaved rounds, $WORKERS proxy workers, medians"
  echo
  echo "| target | req/s | p50 ms | p99 ms |"
  echo "|---|---|---|---|"
  for t in direct floodgate floodgate_protected nginx; do echo "| $t | $(med "${rps[$t]}") | $(med "${p50[$t]}") | $(med "${p99[$t]}") |"; done
  fg=$(med "${rps[floodgate]}"); fp=$(med "${rps[floodgate_protected]}"); ng=$(med "${rps[nginx]}")
  echo
  echo "- Floodgate / nginx req/s: $(awk -v a="$fg" -v b="$ng" 'BEGIN{printf "%.2f", a/b}')"
  echo "- Floodgate protected / Floodgate unprotected req/s: $(awk -v a="$fp" -v b="$fg" 'BEGIN{printf "%.2f", a/b}')"
} | tee -a "$RESULTS/report.md"
