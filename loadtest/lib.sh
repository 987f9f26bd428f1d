# Shared helpers for the load-test scripts (sourced).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-$ROOT/loadtest/results/$(date +%Y-%m-%d)}
mkdir -p "$RESULTS"
TMP=$(mktemp -d /tmp/floodgate-bench.XXXXXX)
bench_pids=()
bench_cleanup() {
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${bench_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -f "$TMP/nginx.pid" ] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
  rm -rf "$TMP"
}
trap bench_cleanup EXIT

# wait_http URL: until it answers
wait_http() {
  for _ in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "not answering: $1" >&2; return 1
}

# wrk_run URL ARGS...: prints "rps p50_ms p99_ms non2xx"
wrk_run() {
  local url=$1; shift
  local out; out=$(wrk --latency "$@" "$url")
  echo "$out" >> "$TMP/wrk.log"
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 }
    /^ +50%/ { p50=ms($2) } /^ +99%/ { p99=ms($2) }
    /Non-2xx/ { bad=$NF }
    END { printf "%.0f %.3f %.3f %d\n", rps, p50, p99, bad+0 }' <<<"$out"
}

# median of numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# machine facts for the report
machine() {
  echo "- cores: $(nproc), kernel: $(uname -r)"
  echo "- $(wrk --version 2>&1 | head -1)"
  echo "- $(nginx -v 2>&1)"
  echo "- $(rustc --version)"
}
