#!/usr/bin/env bash
# A scripted, bounded run of the demo, as a new user would try it: starts `scripts/demo.sh`,
# checks each feature it advertises, runs a scaled-down wrk and hey, then sends Ctrl-C
# (SIGINT) and verifies that nothing it started is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
export BIN=${BIN:-target/debug}
rm -rf data
demo=""
fail() {
  echo "demo-check FAILED: $*" >&2
  tail -n 20 data/logs/*.log >&2 || true
  # Stop the demo (and so everything it started) before leaving.
  if [ -n "$demo" ]; then kill -INT "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true; fi
  exit 1
}

# Job control on: a background job started without it ignores SIGINT (so Ctrl-C could not
# be tested); with it, the demo runs in its own process group, like in a terminal.
set -m
DEMO_SECONDS=600 scripts/demo.sh > /tmp/floodgate-demo.out 2>&1 &
demo=$!
set +m
for _ in $(seq 1 300); do grep -q "Ctrl-C stops everything" /tmp/floodgate-demo.out && break; sleep 0.2; done
grep -q "Ctrl-C stops everything" /tmp/floodgate-demo.out || { cat /tmp/floodgate-demo.out; fail "demo did not start"; }

code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
[ "$(code localhost:8000/items)" = 200 ] || fail "GET /items"
[ "$(code -XPOST -H 'Content-Type: application/json' -d '{"name":"x","description":"y"}' localhost:8000/items)" = 201 ] || fail "POST /items"
h2=$(curl -s -o /dev/null -w '%{http_version} %{http_code}' --http2 --cacert data/tls/localhost.pem https://localhost:8443/items)
[ "$h2" = "2 200" ] || fail "curl --http2 https://localhost:8443/items: $h2"
grep -q "curl --http2 --cacert data/tls/localhost.pem https://localhost:8443/items" /tmp/floodgate-demo.out || fail "the demo does not print the TLS curl"
moved=$(curl -s -o /dev/null -w '%{http_code} %{redirect_url}' localhost:8080/items?x=1)
[ "$moved" = "308 https://localhost:8443/items?x=1" ] || fail "GET :8080/items is not redirected to :8443: $moved"
served=$(for i in $(seq 1 9); do curl -s -D- -o /dev/null localhost:8000/items | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2}'; done | sort -u | wc -l)
[ "$served" = 3 ] || fail "round robin over 3 backends, saw $served"
llm=$(curl -s -XPOST -H 'X-API-Key: fg_demo_pro_key' -H 'Content-Type: application/json' -d '{"prompt":"hello"}' localhost:8000/llm)
echo "$llm" | grep -q completion || fail "/llm: $llm"
per_ip=$(for i in $(seq 1 8); do code --interface 127.0.0.2 -XPOST localhost:8000/llm; echo; done | grep -c 429 || true)
[ "$per_ip" -ge 1 ] || fail "no per-IP 429"
per_user=$(for i in $(seq 1 12); do code -H 'X-API-Key: fg_demo_free_key' localhost:8000/items; echo; done | grep -c 429 || true)
[ "$per_user" -ge 1 ] || fail "no per-user 429"
# (Read whole before grep: `grep -q` stops at its match, and under pipefail the curl it cut
# off would fail the check.)
metrics=$(curl -s localhost:9100/metrics)
grep -q 'gateway_rejections_total{reason="rate_limit_ip"}' <<<"$metrics" || fail "gateway metrics"
metrics=$(curl -s localhost:8001/metrics)
grep -q backend_requests_total <<<"$metrics" || fail "backend metrics"
kill -HUP "$(cat data/gateway.pid)"; sleep 0.5
metrics=$(curl -s localhost:9100/metrics)
grep -q 'gateway_config_reloads_total{result="success"} 1' <<<"$metrics" || fail "reload"

wrk_out=$(wrk -t2 -c20 -d2s http://localhost:8000/items)
echo "$wrk_out" | grep -q "Socket errors" && fail "wrk socket errors: $wrk_out"
echo "$wrk_out" | grep -q "Non-2xx" && fail "wrk non-2xx: $wrk_out"
hey_out=$(hey -n 200 -c 20 -m POST -H "Content-Type: application/json" -d '{"name":"x","description":"y"}' http://localhost:8000/items)
echo "$hey_out" | grep -q "\[201\].*200 responses" || fail "hey: $hey_out"

# Issue 19 through the gateway: thirty posts with a NUL in a field are 422 each, and no
# backend leaves the rotation for them (readiness counts only an instance's own failures).
nul=$(for i in $(seq 1 30); do code -XPOST -H 'Content-Type: application/json' -d '{"name":"a\u0000b","description":"y"}' localhost:8000/items; echo; done | sort | uniq -c | tr -s ' ')
[ "$(echo "$nul" | tr -d ' \n')" = "30422" ] || fail "NUL posts: $nul"
sleep 2.5   # more than a health-check interval
for i in 1 2 3; do [ "$(code localhost:800$i/ready)" = 200 ] || fail "backend-$i not ready after the NUL posts"; done
up=$(curl -s localhost:9100/metrics | grep -c '^gateway_backend_up{.*} 1$' || true)
[ "$up" = 3 ] || fail "the gateway routes to $up backends after the NUL posts"
# SIGTERM to a backend under load: it fails /ready at once and serves on for its drain delay,
# the gateway stops routing to it first: no request fails.
victim=$(ss -ltnpH 'sport = :8002' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
[ -n "$victim" ] || fail "no backend on :8002"
hey -z 12s -c 10 http://localhost:8000/items > /tmp/floodgate-demo-sigterm.txt 2>&1 &
load=$!
sleep 2
kill -TERM "$victim"
wait "$load"
grep -q "\[200\]" /tmp/floodgate-demo-sigterm.txt || fail "SIGTERM under load: $(cat /tmp/floodgate-demo-sigterm.txt)"
codes=$(sed -n '/Status code distribution/,/^$/p' /tmp/floodgate-demo-sigterm.txt | grep -c '\[' || true)
[ "$codes" = 1 ] && ! grep -q "Error distribution" /tmp/floodgate-demo-sigterm.txt \
  || fail "SIGTERM under load: not every request answered 200: $(cat /tmp/floodgate-demo-sigterm.txt)"
echo "demo-check: SIGTERM under load: $(grep -o '\[200\][^r]*responses' /tmp/floodgate-demo-sigterm.txt), none failed"

kill -INT "$demo"
wait "$demo" || true
sleep 0.5
# What the demo started is in its process group (it ran as a job of its own; nothing it starts
# daemonizes). Not by name: a gateway someone else runs on this machine is not the demo's.
left=$(pgrep -g "$demo" || true)
[ -z "$left" ] || fail "processes left behind: $left"
# GATEWAYS=2: a second replica on :8010; one client's /llm limit (20/min, burst 5) holds across
# both through the demo's Redis (scope: cluster): 6 pass (7 at most: a lease), not 12.
set -m
GATEWAYS=2 DEMO_SECONDS=600 scripts/demo.sh > /tmp/floodgate-demo2.out 2>&1 &
demo=$!
set +m
for _ in $(seq 1 300); do grep -q "Ctrl-C stops everything" /tmp/floodgate-demo2.out && break; sleep 0.2; done
grep -q "Ctrl-C stops everything" /tmp/floodgate-demo2.out || { cat /tmp/floodgate-demo2.out; fail "GATEWAYS=2 demo did not start"; }
grep -q "localhost:8010" /tmp/floodgate-demo2.out || fail "GATEWAYS=2: no second gateway announced"
codes=$(for i in $(seq 1 6); do for p in 8000 8010; do code --interface 127.0.0.3 -XPOST localhost:$p/llm; echo; done; done)
passed=$(grep -vc 429 <<<"$codes" || true)
{ [ "$passed" -ge 6 ] && [ "$passed" -le 7 ]; } || fail "GATEWAYS=2: $passed of 12 /llm requests passed the gateways (want 6-7: one limit for both): $(echo $codes)"
m2=$(curl -s localhost:9110/metrics)
grep -q '^gateway_cluster_replicas 2$' <<<"$m2" || fail "GATEWAYS=2: the replicas do not count each other: $(grep '^gateway_cluster' <<<"$m2")"
kill -INT "$demo"
wait "$demo" || true
sleep 0.5
left=$(pgrep -g "$demo" || true)
[ -z "$left" ] || fail "GATEWAYS=2: processes left behind: $left"
echo "demo-check: GATEWAYS=2: one client's /llm limit across :8000 and :8010: $passed of 12 passed ($(echo $codes))"

echo "demo-check: OK (HTTP/2 over TLS on :8443, :8080 redirected to it, round robin over 3, /llm, per-IP and per-user 429, metrics, reload, wrk and hey clean, 30 NUL posts 422 with every backend kept, a backend SIGTERMed under load with none failed, nothing left running; GATEWAYS=2 shares the /llm limit)"
