#!/usr/bin/env bash
# `make loadtest` / `make loadtest-smoke`: see loadtest/run.py for the scenarios and settings.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 loadtest/run.py "$@"
