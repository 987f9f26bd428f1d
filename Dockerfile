# One image for `gateway`, `backend` and `mock-vendor`.
# Build stage: release binaries (cmake is needed by pingora's build).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gateway --bin backend --bin mock-vendor

# Runtime stage: slim, non-root; curl only for container health checks.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app floodgate \
    && mkdir -p /app/data && chown floodgate /app/data
COPY --from=build /src/target/release/gateway /src/target/release/backend /src/target/release/mock-vendor /usr/local/bin/
COPY config/ /etc/floodgate/
WORKDIR /app
USER floodgate
EXPOSE 8000 8001 9000 9100
CMD ["gateway", "-c", "/etc/floodgate/gateway.compose.yaml"]
