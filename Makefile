# Floodgate. `make demo` runs it, `make test` tests it. Every target that builds installs
# missing system packages first (scripts/deps.sh: apt-get when root, the exact command otherwise).

CARGO ?= cargo
CONFIG ?= config/gateway.yaml

.PHONY: deps deps-bench build test unit-test demo-check check-deploy images compose-check run demo migrate fmt lint ci loadtest loadtest-smoke clean

deps:
	@scripts/deps.sh

deps-bench: deps
	@scripts/deps.sh bench

build: deps
	$(CARGO) build --release --bins

# Every test: unit and black-box tests (real PostgreSQL, Redis, upstreams, signals), a scripted
# run of the demo, the deployment checks, the compose demo in containers (a SKIP line where no
# Docker engine is reachable), and a smoke run of the load tests.
test: unit-test demo-check check-deploy compose-check loadtest-smoke

unit-test: deps
	$(CARGO) test --workspace --all-targets
	# The gateway's black-box tests again with the own HTTP/1 engine off: pingora's engine
	# serves every request then (it serves bodies and the unusual ones always). The attack
	# suite runs both engines itself, so it is not run twice.
	FLOODGATE_TEST_PATH=pingora $(CARGO) test -p floodgate-proxy --test gateway -- --skip attacks::

demo-check: deps
	$(CARGO) build --bins
	BIN=target/debug scripts/demo-check.sh

check-deploy: deps
	$(CARGO) build --bins
	BIN=target/debug scripts/check-deploy.sh

# The compose demo's images without a registry: debootstrapped bases, the host's release
# binaries (then: docker-compose -f compose.yaml -f compose.local.yaml up -d).
images: deps
	$(CARGO) build --release --bins
	BIN=target/release scripts/images.sh

# The compose demo started, exercised, broken on purpose and load-tested in containers
# (scripts/compose-check.sh); prints a SKIP line and passes where no Docker engine is reachable.
compose-check: deps
	@if docker info >/dev/null 2>&1; then \
	  $(CARGO) build --bins && BIN=target/debug scripts/compose-check.sh; \
	else \
	  echo "compose-check: SKIP (no Docker engine reachable: 'docker info' failed)"; \
	fi

run: demo

demo: build
	scripts/demo.sh

migrate: deps
	$(CARGO) run --release --bin backend -- migrate

fmt:
	$(CARGO) fmt --all

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

ci:
	.ci/run

# The full comparison with nginx and HAProxy (minutes); writes loadtest/results/<date>/.
loadtest: deps-bench
	$(CARGO) build --release --bins --examples
	loadtest/run.sh

# A few seconds a scenario, debug binaries: keeps the runner and the report from rotting.
loadtest-smoke: deps-bench
	$(CARGO) build --bins --examples
	SMOKE=1 BIN=target/debug loadtest/run.sh

clean:
	$(CARGO) clean
