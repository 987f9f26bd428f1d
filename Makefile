# Floodgate. `make demo` runs it, `make test` tests it. Every target that builds installs
# missing system packages first (scripts/deps.sh: apt-get when root, the exact command otherwise).

CARGO ?= cargo
CONFIG ?= config/gateway.yaml

.PHONY: deps deps-bench build release test run demo fmt lint ci loadtest clean

deps:
	@scripts/deps.sh

deps-bench:
	@scripts/deps.sh bench

build: deps
	$(CARGO) build --release --bins

release: build

test: deps
	$(CARGO) test --workspace --all-targets

run: build
	scripts/demo.sh

demo: build
	scripts/demo.sh

fmt:
	$(CARGO) fmt --all

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

ci:
	.ci/run

clean:
	$(CARGO) clean
