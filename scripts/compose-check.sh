#!/usr/bin/env bash
# `make compose-check`: the docker compose demo, for real, on a machine that can pull nothing.
# Builds the images locally (scripts/images.sh), starts compose.yaml with compose.local.yaml
# under a project name of its own on free loopback ports, checks what the demo advertises
# through the published ports and from containers on the compose network, breaks containers
# on purpose (SIGHUP, SIGKILL, stop/start, restart) while counting failed requests, runs the
# seed's wrk and hey commands through the gateway, then `down -v` and verifies that no
# container, network or volume of its project is left.
#   BIN   the host's binaries copied into the image (default target/debug)
# Without a reachable Docker engine it prints a SKIP line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export BIN=${BIN:-target/debug}
t0=$(date +%s)

if ! docker info >/dev/null 2>&1; then
  echo "compose-check: SKIP (no Docker engine reachable: 'docker info' failed)"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  DC=(docker compose); WAIT=(--wait)
elif command -v docker-compose >/dev/null 2>&1; then
  DC=(docker-compose); WAIT=()   # compose v1 has no --wait: health is polled below
else
  echo "compose-check: FAILED: neither 'docker compose' nor 'docker-compose' (make deps)" >&2; exit 1
fi
for t in wrk hey curl python3 flock; do
  command -v "$t" >/dev/null || { echo "compose-check: FAILED: $t missing (make deps)" >&2; exit 1; }
done

# compose.yaml's network has a fixed subnet (the gateway exempts its host address): one check
# at a time on this machine.
exec 8>/tmp/floodgate-compose-check.lock
flock -w 1800 8 || { echo "compose-check: FAILED: another compose check holds the lock" >&2; exit 1; }

PROJECT=fgcheck$$
NET=${PROJECT}_default
export COMPOSE_PROJECT_NAME=$PROJECT
# Four free ports (two per gateway replica) below the kernel's ephemeral range (a port from
# that range can be taken by any outgoing connection before Docker binds it).
read -r FLOODGATE_PORT FLOODGATE_METRICS_PORT FLOODGATE_PORT_2 FLOODGATE_METRICS_PORT_2 < <(python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
got = []
while len(got) < 4:
    p = random.randrange(20000, min(low, 32768) - 1)
    if p in got:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); got.append(p)
    except OSError:
        pass
    s.close()
print(*got)')
export FLOODGATE_BIND=127.0.0.1 FLOODGATE_PORT FLOODGATE_METRICS_PORT FLOODGATE_PORT_2 FLOODGATE_METRICS_PORT_2
GW=http://127.0.0.1:$FLOODGATE_PORT
METRICS=http://127.0.0.1:$FLOODGATE_METRICS_PORT/metrics
OUT=$(mktemp -d /tmp/floodgate-compose-check.XXXXXX)
dc() { "${DC[@]}" -p "$PROJECT" -f compose.yaml -f compose.local.yaml "$@"; }

# Holding the lock, any other fgcheck<pid> project is one a killed check left behind (its
# network would hold the subnet): removed first.
stale=$( { docker ps -a --format '{{.Label "com.docker.compose.project"}}'
           docker network ls --format '{{.Label "com.docker.compose.project"}}'
           docker volume ls --format '{{.Label "com.docker.compose.project"}}'; } 2>/dev/null |
         grep -E '^fgcheck[0-9]+$' | sort -u || true)
for p in $stale; do
  echo "compose-check: removing what an interrupted check left: project $p"
  docker ps -aq --filter "name=^${p}-client-" | xargs -r docker rm -f >/dev/null
  "${DC[@]}" -p "$p" -f compose.yaml -f compose.local.yaml down -v --remove-orphans -t 1 >/dev/null 2>&1 || true
done
cid() { dc ps -q "$1"; }

passed=0
pass() { echo "PASS  $*"; passed=$((passed + 1)); }
fail() {
  echo "FAIL  $*" >&2
  mkdir -p target/compose-check
  dc logs --no-color --timestamps >"target/compose-check/$PROJECT.log" 2>&1 || true
  echo "---- last logs (all of them: target/compose-check/$PROJECT.log) ----" >&2
  dc logs --tail 15 --no-color >&2 2>&1 || true
  exit 1
}
clients=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ ${#clients[@]} -gt 0 ] && docker rm -f "${clients[@]}" >/dev/null 2>&1
  dc down -v --remove-orphans -t 5 >"$OUT/down.log" 2>&1
  left=$( { docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
            docker network ls -q --filter "label=com.docker.compose.project=$PROJECT"
            docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT"; } | wc -l)
  if [ "$left" != 0 ]; then
    echo "FAIL  down -v left $left containers/networks/volumes of project $PROJECT" >&2
    rc=1
  else
    echo "PASS  down -v: no container, network or volume of project $PROJECT left"
  fi
  rm -rf "$OUT"
  if [ "$rc" = 0 ]; then
    echo "compose-check: OK ($((passed + 1)) checks, $(( $(date +%s) - t0 ))s)"
  else
    echo "compose-check: FAILED" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

code() { curl -s --max-time 10 -o /dev/null -w '%{http_code}' "$@"; }
metric() { # name-with-labels-regex: sum of the matching samples on the gateway
  curl -s --max-time 10 "$METRICS" | awk -v re="^$1 " '$0 ~ re {s += $NF} END {print s + 0}'
}
# Waits until every service is healthy (or, for migrate, exited 0).
wait_healthy() { # timeout-seconds
  local deadline=$(( $(date +%s) + $1 )) c state
  while [ "$(date +%s)" -lt "$deadline" ]; do
    local pending=0
    for c in $(dc ps -q); do
      state=$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.ExitCode}}' "$c")
      case "$state" in
        *" running healthy "*) ;;
        *migrate*" exited none 0") ;;
        *) pending=1 ;;
      esac
    done
    [ "$pending" = 0 ] && return 0
    sleep 1
  done
  dc ps >&2
  return 1
}
backends_up() { metric 'gateway_backend_up\{[^}]*\}'; }
wait_backends_up() { # n timeout
  for _ in $(seq 1 "$2"); do [ "$(backends_up)" = "$1" ] && return 0; sleep 1; done
  return 1
}
# hey's status lines as "code count" pairs, and its error count.
hey_codes() { awk '/^ *\[[0-9]+\]/ {gsub(/[][]/, "", $1); print $1, $2}' "$1"; }
hey_count() { hey_codes "$1" | awk -v c="$2" '$1 == c {n += $2} END {print n + 0}'; }
hey_non() { hey_codes "$1" | awk -v c="$2" '$1 != c {n += $2} END {print n + 0}'; }
hey_errors() { awk '/^Error distribution:/ {e = 1; next} e && /^ *\[[0-9]+\]/ {gsub(/[][]/, "", $1); n += $1} END {print n + 0}' "$1"; }
summary_hey() { # file expected-code
  echo "      $(hey_count "$1" "$2") x $2, $(hey_non "$1" "$2") other statuses ($(hey_codes "$1" | tr '\n' ' ')), $(hey_errors "$1") connection errors; $(awk '/Requests\/sec/ {print $2 " req/s"}' "$1")"
}

echo "== images (BIN=$BIN)"
ti=$(date +%s)
scripts/images.sh || fail "images"
pass "images built or cached ($(( $(date +%s) - ti ))s): floodgate:local, floodgate-postgres:15-local, floodgate-redis:7-local"

echo "== docker compose up (project $PROJECT, gateway $GW, metrics $METRICS, ${DC[*]})"
tu=$(date +%s)
dc up -d "${WAIT[@]}" >"$OUT/up.log" 2>&1 || { cat "$OUT/up.log" >&2; fail "compose up"; }
wait_healthy 180 || fail "services not healthy within 180s"
wait_backends_up 3 30 || fail "gateway: $(backends_up) of 3 backends up"
pass "up: postgres, redis, mock-vendor, 3 backends, gateway healthy; gateway routes to 3 backends ($(( $(date +%s) - tu ))s)"
# The two gateway replicas count each other through Redis (the global limit is cluster-wide).
for m in "$METRICS" "http://127.0.0.1:$FLOODGATE_METRICS_PORT_2/metrics"; do
  for _ in $(seq 1 20); do
    r=$(curl -s --max-time 10 "$m" | awk '/^gateway_cluster_replicas / {print $2}')
    d=$(curl -s --max-time 10 "$m" | awk '/^gateway_cluster_limits_degraded / {print $2}')
    [ "$r" = 2 ] && [ "$d" = 0 ] && break
    sleep 0.5
  done
  [ "$r" = 2 ] && [ "$d" = 0 ] || fail "gateway at $m: $r replicas counted, degraded $d"
done
[ "$(code "http://127.0.0.1:$FLOODGATE_PORT_2/items")" = 200 ] || fail "GET /items through gateway-2"
pass "two gateway replicas share the global limit through Redis (each counts 2 replicas, not degraded); gateway-2 serves"
grep -q fg_demo_free_key <<<"$(dc logs --no-color migrate)" || fail "migrate did not seed the demo keys"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(cid migrate)")" = 0 ] || fail "migrate exit code"
pass "migrate ran once before the backends: migrations applied, demo keys seeded"

# --- the demo's checks ----------------------------------------------------------------------
[ "$(code "$GW/items")" = 200 ] || fail "GET /items"
[ "$(code -XPOST -H 'Content-Type: application/json' -d '{"name":"x","description":"y"}' "$GW/items")" = 201 ] || fail "POST /items"
served=$(for _ in $(seq 1 9); do curl -s --max-time 10 -D- -o /dev/null "$GW/items" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2}'; done | sort | uniq -c | awk '{printf "%s x %s ", $1, $2}')
[ "$(echo "$served" | grep -o backend- | wc -l)" = 3 ] || fail "round robin: $served"
pass "round robin over 3 containers by X-Served-By: $served"

# Per-IP limits see real client addresses: two client containers on the compose network.
for n in a b; do
  c=$PROJECT-client-$n
  docker run -d --name "$c" --network "$NET" --entrypoint sleep floodgate:local 600 >/dev/null || fail "client container $n"
  clients+=("$c")
done
ip_a=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$PROJECT-client-a")
ip_b=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$PROJECT-client-b")
[ -n "$ip_a" ] && [ -n "$ip_b" ] && [ "$ip_a" != "$ip_b" ] || fail "client addresses: '$ip_a' '$ip_b'"
llm_burst() { # client n: the codes of n POST /llm through the gateway
  docker exec "$PROJECT-client-$1" sh -c "for i in \$(seq 1 $2); do curl -s --max-time 10 -o /dev/null -w '%{http_code} ' -XPOST http://gateway:8000/llm; done"
}
ip_before=$(metric 'gateway_rejections_total\{reason="rate_limit_ip"\}')
a_codes=$(llm_burst a 8)
b_codes=$(llm_burst b 4)
ip_after=$(metric 'gateway_rejections_total\{reason="rate_limit_ip"\}')
a429=$(echo "$a_codes" | tr ' ' '\n' | grep -c '^429$' || true)
b429=$(echo "$b_codes" | tr ' ' '\n' | grep -c '^429$' || true)
[ "$a429" -ge 1 ] || fail "per-IP: client A ($ip_a) got no 429: $a_codes"
[ "$b429" = 0 ] || fail "per-IP: client B ($ip_b) shares A's bucket: $b_codes"
[ $((ip_after - ip_before)) = "$a429" ] || fail "per-IP: gateway counted $((ip_after - ip_before)) rate_limit_ip rejections, A got $a429 429s"
pass "per-IP 429 from the gateway: client A $ip_a: $a_codes| client B $ip_b (after A): $b_codes(separate buckets; gateway rate_limit_ip +$a429)"
dc logs --no-color gateway >"$OUT/gateway.log" 2>&1
grep -qF "$ip_a \"POST /llm\" 429" "$OUT/gateway.log" && grep -qF "$ip_b \"POST /llm\"" "$OUT/gateway.log" ||
  fail "the gateway's access log does not name the clients' addresses $ip_a $ip_b"
pass "the gateway's access log names each client's own address ($ip_a, $ip_b), not the bridge's"

# Per-user limits shared through Redis: the free tier allows 10 a minute in all, whichever
# backend container serves the request.
pu=$(for _ in $(seq 1 15); do curl -s --max-time 10 -D- -o /dev/null -H 'X-API-Key: fg_demo_free_key' "$GW/items" | tr -d '\r' |
  awk -F': ' 'NR==1 {split($0, s, " "); code=s[2]} tolower($1)=="x-served-by" {by=$2} END {print code, by}'; done)
ok_n=$(echo "$pu" | grep -c '^200 ' || true)
rej_n=$(echo "$pu" | grep -c '^429 ' || true)
rej_by=$(echo "$pu" | awk '$1 == 429 {print $2}' | sort -u | wc -l)
all_by=$(echo "$pu" | awk '{print $2}' | sort -u | wc -l)
[ "$ok_n" = 10 ] && [ "$rej_n" = 5 ] || fail "per-user: $ok_n x 200 and $rej_n x 429 of 15 (want 10 and 5): $(echo "$pu" | tr '\n' ' ')"
[ "$all_by" = 3 ] && [ "$rej_by" -ge 2 ] || fail "per-user: answers from $all_by backends, 429s from $rej_by"
pass "per-user 429 from the backends, shared across containers: 10 x 200 then 5 x 429 (429s from $rej_by backends; answers from all 3)"

llm_call() { curl -s --max-time 20 -XPOST -H 'X-API-Key: fg_demo_pro_key' -H 'Content-Type: application/json' -d '{"prompt":"hello"}' "$GW/llm"; }
llm=$(llm_call)
# A backend that lost its Redis (VENDOR_REDIS_LOST_FAILURES failures in a row over
# VENDOR_REDIS_LOST_AFTER; a stall of this loaded machine can do it) makes no vendor call for
# one contract window, by design (503 limiter_unavailable): said, then waited for.
if ! grep -q completion <<<"$llm" && grep -Eq '"stage":"(global_limiter|limiter_unavailable)"' <<<"$llm" &&
   grep -q 'no vendor calls for one window' <<<"$(dc logs --no-color backend-1 backend-2 backend-3 2>&1)"; then
  echo "NOTE  vendor calls paused for one window: a backend's Redis call timed out (its log says so); waiting"
  for _ in $(seq 1 15); do
    sleep 5
    llm=$(llm_call)
    grep -q completion <<<"$llm" && break
  done
fi
grep -q completion <<<"$llm" || fail "vendor call: $llm"
pass "vendor call through the guarded pipeline to mock-vendor: ${llm:0:80}"

curl -s --max-time 10 "$METRICS" >"$OUT/gw.metrics"
grep -q '^gateway_requests_total' "$OUT/gw.metrics" && grep -q 'gateway_rejections_total{reason="rate_limit_ip"}' "$OUT/gw.metrics" || fail "gateway /metrics"
for b in backend-1 backend-2 backend-3; do
  dc exec -T "$b" curl -s --max-time 10 http://127.0.0.1:8001/metrics >"$OUT/$b.metrics" || fail "$b /metrics"
  grep -q '^backend_requests_total' "$OUT/$b.metrics" || fail "$b /metrics: no backend_requests_total"
done
grep -q '^backend_vendor_stage_total' "$OUT"/backend-*.metrics || fail "backend /metrics: no backend_vendor_stage_total"
pass "/metrics: gateway on the published port ($(grep -c '^gateway_' "$OUT/gw.metrics") samples), each backend container ($(grep -c '^backend_' "$OUT/backend-1.metrics") samples on backend-1), vendor stages counted"

# --- containers broken on purpose -----------------------------------------------------------
# A config reload by SIGHUP under load: no failed request.
reloads0=$(metric 'gateway_config_reloads_total\{result="success"\}')
hey -z 6s -c 10 -q 40 "$GW/items" >"$OUT/hey-reload.txt" 2>&1 &
hp=$!
sleep 2
# As the README says to: not `docker kill -s HUP`, after which (Docker 20.10, seen here) the
# container counts as stopped by hand and a crash is no longer restarted.
dc exec -T gateway sh -c 'kill -HUP 1' || fail "SIGHUP by docker-compose exec"
wait "$hp" || true
reloads1=$(metric 'gateway_config_reloads_total\{result="success"\}')
[ "$reloads1" -gt "$reloads0" ] || fail "SIGHUP: reloads_total{success} $reloads0 -> $reloads1"
[ "$(hey_non "$OUT/hey-reload.txt" 200)" = 0 ] && [ "$(hey_errors "$OUT/hey-reload.txt")" = 0 ] ||
  fail "SIGHUP reload: failed requests: $(cat "$OUT/hey-reload.txt")"
pass "config reload of the gateway container by SIGHUP under load: 0 failed requests"
summary_hey "$OUT/hey-reload.txt" 200

# One backend container killed (SIGKILL) under GETs: none fails; it comes back.
hey -z 8s -c 10 -q 40 "$GW/items" >"$OUT/hey-kill.txt" 2>&1 &
hp=$!
sleep 2
docker kill "$(cid backend-2)" >/dev/null
wait "$hp" || true
[ "$(hey_non "$OUT/hey-kill.txt" 200)" = 0 ] && [ "$(hey_errors "$OUT/hey-kill.txt")" = 0 ] ||
  fail "backend killed: failed GETs: $(cat "$OUT/hey-kill.txt")"
pass "backend-2 container killed (SIGKILL) under GETs: 0 failed GETs"
summary_hey "$OUT/hey-kill.txt" 200
wait_backends_up 2 15 || fail "gateway still routes to $(backends_up) backends after the kill"
dc start backend-2 >/dev/null 2>&1
wait_healthy 60 || fail "backend-2 not healthy again"
wait_backends_up 3 30 || fail "backend-2 not back in the gateway's rotation"
pass "backend-2 started again: healthy, back in the rotation (3 up)"

# Redis stopped: the backends fall back to per-instance limits and say so; Redis started: shared again.
degraded() { # sum of backend_ratelimit_degraded over the 3 backends
  local s=0 b v
  for b in backend-1 backend-2 backend-3; do
    v=$(dc exec -T "$b" curl -s --max-time 10 http://127.0.0.1:8001/metrics | awk '$1 == "backend_ratelimit_degraded" {print $2}')
    s=$((s + ${v:-0}))
  done
  echo "$s"
}
poke() { for _ in $(seq 1 9); do code -H 'X-API-Key: fg_demo_enterprise_key' "$GW/items"; echo; done; }
dc stop -t 5 redis >/dev/null 2>&1
ok=0
for _ in $(seq 1 20); do
  codes=$(poke | sort | uniq -c | awk '{printf "%s x %s ", $1, $2}')
  [ "$(degraded)" = 3 ] && { ok=1; break; }
  sleep 1
done
[ "$ok" = 1 ] || fail "Redis stopped: backends degraded $(degraded)/3"
! grep -qE ' 5[0-9][0-9] ' <<<" $codes " || fail "Redis stopped: answers $codes"
pass "Redis container stopped: 3/3 backends degraded to local limits (backend_ratelimit_degraded), requests still served: $codes"
dc start redis >/dev/null 2>&1
wait_healthy 60 || fail "redis not healthy again"
ok=0
for _ in $(seq 1 30); do
  poke >/dev/null
  [ "$(degraded)" = 0 ] && { ok=1; break; }
  sleep 1
done
[ "$ok" = 1 ] || fail "Redis started: backends still degraded $(degraded)/3"
pass "Redis container started: 3/3 backends shared through Redis again"

# The gateway's restart policy: its process killed with SIGKILL, the container comes back.
gw=$(cid gateway)
rc0=$(docker inspect -f '{{.RestartCount}}' "$gw")
kill -9 "$(docker inspect -f '{{.State.Pid}}' "$gw")"
tk=$(date +%s)
ok=0
for _ in $(seq 1 60); do
  if [ "$(docker inspect -f '{{.RestartCount}} {{.State.Running}}' "$gw")" = "$((rc0 + 1)) true" ] &&
     [ "$(code "$GW/items")" = 200 ]; then ok=1; break; fi
  sleep 0.5
done
[ "$ok" = 1 ] || fail "gateway not restarted after kill -9: $(docker inspect -f '{{.RestartCount}} {{.State.Status}}' "$gw")"
pass "gateway process killed with kill -9: restarted by its restart policy (restart count $rc0 -> $((rc0 + 1))), serving again in $(( $(date +%s) - tk ))s"
wait_backends_up 3 30 || fail "gateway after restart: $(backends_up) backends up"

# No acknowledged write lost: POSTs while PostgreSQL restarts, a backend is SIGKILLed and
# Redis restarts; every 201 the load generator recorded is a row.
rows() { dc exec -T postgres psql -U floodgate -d floodgate -tAc 'SELECT count(*) FROM items' | tr -d '[:space:]'; }
before=$(rows)
hey -z 16s -c 4 -q 25 -m POST -H 'Content-Type: application/json' -d '{"name":"durable","description":"y"}' "$GW/items" >"$OUT/hey-writes.txt" 2>&1 &
hp=$!
sleep 3; docker restart -t 10 "$(cid postgres)" >/dev/null
sleep 3; docker kill "$(cid backend-1)" >/dev/null; dc start backend-1 >/dev/null 2>&1
sleep 2; docker restart -t 5 "$(cid redis)" >/dev/null
wait "$hp" || true
wait_healthy 60 || fail "services not healthy after the restarts"
after=$(rows)
acked=$(hey_count "$OUT/hey-writes.txt" 201)
[ "$acked" -gt 0 ] || fail "no 201 recorded: $(cat "$OUT/hey-writes.txt")"
[ $((after - before)) -ge "$acked" ] || fail "acknowledged writes lost: $acked x 201 but $((after - before)) new rows"
pass "no acknowledged write lost across a PostgreSQL restart, a backend SIGKILL and a Redis restart: $acked x 201 recorded, $((after - before)) new rows ($before -> $after)"
summary_hey "$OUT/hey-writes.txt" 201
wait_backends_up 3 30 || fail "$(backends_up) backends up after the restarts"

# --- the seed's load tests through the containers ---------------------------------------------
# Non-2xx answers are told apart by the gateway's access log: who answered (the gateway itself:
# a limit or no healthy backend; a backend: e.g. its in-flight cap's 503 shed) and the status.
# A 5xx other than 503 (a 500, or a 502/504: a backend that failed) fails the check.
now() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }
tally() { # since: "count x status (from whom)" for the non-2xx answers logged since then
  sleep 1
  docker logs --since "$1" "$(cid gateway)" 2>&1 | awk '/ access\] / {
      for (i = 2; i <= NF; i++) if ($i ~ /^backend=/) {
        who = ($i == "backend=-" || $i == "backend=none") ? "gateway" : "a backend"
        if ($(i - 1) !~ /^2/) n[$(i - 1) " from " who]++
      } }
    END { for (k in n) print n[k] " x " k }' | sort -rn
}
judge() { # name tally
  if grep -qE ' x 5(0[0-24-9]|[1-9][0-9]) ' <<<"$2"; then fail "$1: failed requests: $(echo "$2" | tr '\n' ';')"; fi
}
echo "== the seed's wrk and hey through the gateway container (published port, from the host)"
ts=$(now)
wrk -t10 -c100 -d10s "$GW/items" >"$OUT/wrk.txt" 2>&1 || fail "wrk: $(cat "$OUT/wrk.txt")"
sed 's/^/      /' "$OUT/wrk.txt"
total=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$OUT/wrk.txt"); non2xx=${non2xx:-0}
# connect, read and write errors fail; wrk's "timeout" is an answer slower than its 2 s (a
# latency figure on a loaded machine: the access log says how each request ended).
sockerr=$(awk '/Socket errors:/ {gsub(/,/, ""); print $4 + $6 + $8}' "$OUT/wrk.txt"); sockerr=${sockerr:-0}
slow=$(awk '/Socket errors:/ {print $NF}' "$OUT/wrk.txt"); slow=${slow:-0}
why=$(tally "$ts")
[ "$sockerr" = 0 ] || fail "wrk: $sockerr connect/read/write errors"
judge wrk "$why"
pass "wrk -t10 -c100 -d10s GET /items: $((total - non2xx)) x 2xx, $non2xx non-2xx, 0 connect/read/write errors, $slow over wrk's 2 s timeout, $(awk '/Requests\/sec/ {print $2}' "$OUT/wrk.txt") req/s; non-2xx in the access log: $(echo "${why:-none}" | paste -sd';' -)"
ts=$(now)
hey -n 1000 -c 100 -m POST -H "Content-Type: application/json" -d '{"name":"x","description":"y"}' "$GW/items" >"$OUT/hey.txt" 2>&1 || fail "hey: $(cat "$OUT/hey.txt")"
sed -n '/Summary:/,/Requests\/sec/p;/Status code distribution:/,$p' "$OUT/hey.txt" | sed 's/^/      /'
why=$(tally "$ts")
h201=$(hey_count "$OUT/hey.txt" 201); hnon=$(hey_non "$OUT/hey.txt" 201); herr=$(hey_errors "$OUT/hey.txt")
[ "$herr" = 0 ] || fail "hey: $herr connection errors"
[ $((h201 + hnon)) = 1000 ] || fail "hey: $h201 + $hnon answers of 1000"
judge hey "$why"
pass "hey -n 1000 -c 100 POST /items: $h201 x 201, $hnon non-2xx, 0 errors, $(awk '/Requests\/sec/ {print $2}' "$OUT/hey.txt") req/s; non-2xx in the access log: $(echo "${why:-none}" | paste -sd';' -)"
