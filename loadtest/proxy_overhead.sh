#!/usr/bin/env bash
# Scenario 1, proxy overhead: a trivial upstream that answers at once, so the proxy is the
# bottleneck. Interleaved rounds of: direct to the upstream (the ceiling), Floodgate, nginx.
#   ROUNDS (3)  DURATION (5s)  CONNS (50)  THREADS (2)  WORKERS (2)  EXTRA_YAML (appended)
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-5s}; CONNS=${CONNS:-50}; THREADS=${THREADS:-2}
WORKERS=${WORKERS:-2}; UP=${UP_PORT:-18101}; GW=${GW_PORT:-18000}; NG=${NGINX_PORT:-18080}
LABEL=${LABEL:-proxy_overhead}

"$ROOT/target/release/examples/fast_upstream" "$UP" 1 & bench_pids+=($!)
cat > "$TMP/gateway.yaml" <<YAML
listen: ["127.0.0.1:$GW"]
metrics_listen: "127.0.0.1:$((GW + 1))"
workers: $WORKERS
log_level: warn
access_log: false
upstream:
  backends: ["127.0.0.1:$UP"]
  health_check: {interval: 1s}
${EXTRA_YAML:-}
YAML
"$ROOT/target/release/gateway" -c "$TMP/gateway.yaml" --upgrade-sock "$TMP/up.sock" 2>"$TMP/gateway.log" & bench_pids+=($!)
sed -e "s|__WORKERS__|$WORKERS|; s|__TMP__|$TMP|g; s|__PORT__|$NG|; s|__UPSTREAMS__|server 127.0.0.1:$UP;|" \
  "$ROOT/loadtest/nginx/overhead.conf.tmpl" > "$TMP/nginx.conf"
mkdir -p "$TMP/body" "$TMP/proxy"
nginx -c "$TMP/nginx.conf" -p "$TMP"
wait_http "http://127.0.0.1:$UP/"; wait_http "http://127.0.0.1:$NG/"
sleep 1.5; wait_http "http://127.0.0.1:$GW/"

declare -A rps p50 p99
for r in $(seq 1 "$ROUNDS"); do
  for target in direct floodgate nginx; do
    case $target in direct) port=$UP;; floodgate) port=$GW;; nginx) port=$NG;; esac
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
  for t in direct floodgate nginx; do echo "| $t | $(med "${rps[$t]}") | $(med "${p50[$t]}") | $(med "${p99[$t]}") |"; done
  fg=$(med "${rps[floodgate]}"); ng=$(med "${rps[nginx]}")
  echo
  echo "Floodgate / nginx req/s: $(awk -v a="$fg" -v b="$ng" 'BEGIN{printf "%.2f", a/b}')"
} | tee -a "$RESULTS/report.md"
