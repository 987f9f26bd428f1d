# One image for `gateway`, `backend` and `mock-vendor`.
#
#   docker build -t floodgate:latest .     (compose.yaml's `build: .`): pulls rust:1-bookworm and
#                                          debian:bookworm-slim, builds the release binaries
#   scripts/images.sh (`make images`)      no registry: the same two stages from a base image
#                                          debootstrapped on the machine, with the binaries
#                                          built on the host instead of cargo:
#     --build-arg BUILDER=<base> --build-arg RUNTIME_BASE=<base> --build-arg PREBUILT_BIN=bin
#     with a context folder holding bin/{gateway,backend,mock-vendor} and config/
#
# Build arguments only (no stage is skipped by a target), so the classic builder, which builds
# every stage, pulls nothing offline either.
ARG BUILDER=rust:1-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

# Build stage: release binaries (cmake is needed by pingora's build), unless given.
FROM ${BUILDER} AS build
ARG PREBUILT_BIN=
# Lets scripts/images.sh remove its own superseded build-stage images (never a cargo one).
LABEL org.floodgate.prebuilt-bin="${PREBUILT_BIN}"
RUN if [ -z "$PREBUILT_BIN" ]; then \
      apt-get update && apt-get install -y --no-install-recommends cmake \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
RUN if [ -z "$PREBUILT_BIN" ]; then \
      cargo build --release --locked --bin gateway --bin backend --bin mock-vendor; \
    fi

# Runtime stage: slim, non-root; curl only for container health checks (the local base has
# ca-certificates and curl already: nothing is fetched then).
FROM ${RUNTIME_BASE}
ARG PREBUILT_BIN=
RUN if ! command -v curl >/dev/null || [ ! -d /etc/ssl/certs ]; then \
      apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --home-dir /app floodgate \
    && mkdir -p /app/data && chown floodgate /app/data
COPY --from=build /src/${PREBUILT_BIN:-target/release}/gateway /src/${PREBUILT_BIN:-target/release}/backend /src/${PREBUILT_BIN:-target/release}/mock-vendor /usr/local/bin/
COPY config/ /etc/floodgate/
WORKDIR /app
USER floodgate
EXPOSE 8000 8001 9000 9100
CMD ["gateway", "-c", "/etc/floodgate/gateway.compose.yaml"]
