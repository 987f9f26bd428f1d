#!/usr/bin/env bash
# The seed's load-test commands as written, against a running stack (default: the gateway that
# `make demo` starts on :8000), plus the same POST through wrk with loadtest/post.lua.
#   loadtest/seed.sh [URL]        DURATION=30s by default (the seed's)
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${1:-http://localhost:8000/items}
case "$URL" in
  http://localhost[:/]* | http://127.*) ;;
  *) echo "loopback targets only: $URL" >&2; exit 2 ;;
esac
D=${DURATION:-30s}
echo "== wrk -t10 -c100 -d$D $URL"
wrk -t10 -c100 -d"$D" "$URL"
echo "== hey -n 1000 -c 100 -m POST -H 'Content-Type: application/json' -d '{\"name\":\"x\",\"description\":\"y\"}' $URL"
hey -n 1000 -c 100 -m POST -H "Content-Type: application/json" -d '{"name":"x","description":"y"}' "$URL"
echo "== wrk -t10 -c100 -d$D -s loadtest/post.lua $URL"
wrk -t10 -c100 -d"$D" -s loadtest/post.lua "$URL"
