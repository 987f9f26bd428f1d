#!/usr/bin/env bash
# `make images`: the compose demo's images on a machine that can pull nothing (no registry).
#
#   1. Two Debian bookworm root filesystems made with debootstrap (Debian's packages are the
#      only thing fetched): a minimal runtime one (ca-certificates, curl) and one for the
#      services (PostgreSQL 15, Redis), each `docker import`ed as a base image.
#   2. From them: the project's image (the repository's Dockerfile, its `PREBUILT_BIN` build
#      argument: the binaries built on the host are copied in instead of running cargo) and
#      stand-ins for `postgres:15` and `redis:7` (same environment variables, volume path,
#      commands and health checks as compose.yaml uses with the official images).
#
# compose.local.yaml selects these images: docker-compose -f compose.yaml -f compose.local.yaml up
#
#   BIN            where the host's binaries are (default target/release; any profile: they are
#                  copied as given)
#   IMAGES_DIR     cache of the root filesystems (default .images, gitignored)
#   DEBIAN_MIRROR  default http://deb.debian.org/debian
#
# Cache: a base image is tagged with a hash of its inputs (suite, packages, mirror, and the
# code below that shapes it) and skipped when the engine has it; its tarball is kept in
# IMAGES_DIR so an emptied engine re-imports it without debootstrap. The images on top are
# `docker build`s, cached by the engine as usual (same binaries: nothing rebuilt).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
IMAGES_DIR=${IMAGES_DIR:-.images}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FLOODGATE_IMAGE=floodgate:local
POSTGRES_IMAGE=floodgate-postgres:15-local
REDIS_IMAGE=floodgate-redis:7-local

# `scripts/images.sh bases`: only what needs no binaries (bases, PostgreSQL and Redis images).
only_bases=0
[ "${1:-}" = bases ] && only_bases=1
for b in gateway backend mock-vendor; do
  [ "$only_bases" = 1 ] || [ -x "$BIN/$b" ] || { echo "images: $BIN/$b missing (build the binaries first, or set BIN)" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "images: no Docker engine reachable" >&2; exit 1; }
mkdir -p "$IMAGES_DIR"
# docker build's own output only when it fails (the classic builder's deprecation notice aside).
build() { # docker build arguments...
  if ! docker build -q "$@" >"$IMAGES_DIR/build.log" 2>&1; then
    cat "$IMAGES_DIR/build.log" >&2
    echo "images: docker build $* failed" >&2
    exit 1
  fi
}
# One build at a time per cache (two checkouts' runs would otherwise debootstrap twice).
exec 9>"$IMAGES_DIR/.lock"
flock 9

# Shapes a fresh root filesystem before it is imported (its text is part of the cache key).
customize() { # dir name
  local dir=$1 name=$2
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
  if [ "$name" = services ]; then
    # The package's own cluster is not used: the entrypoint makes one in the volume.
    rm -rf "$dir"/var/lib/postgresql/15/main "$dir"/etc/postgresql/15/main
    mkdir -p "$dir"/var/lib/postgresql/data "$dir"/run/postgresql
    chroot "$dir" chown postgres:postgres /var/lib/postgresql/data /run/postgresql
    chmod 700 "$dir"/var/lib/postgresql/data
    # What the official image's entrypoint does for compose.yaml: POSTGRES_USER,
    # POSTGRES_PASSWORD and POSTGRES_DB create the cluster, the role and the database on first
    # start (an empty volume); later starts use the volume as it is.
    cat > "$dir"/usr/local/bin/postgres-entrypoint <<'SH'
#!/bin/sh
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "postgres-entrypoint: POSTGRES_PASSWORD is required" >&2; exit 1; }
  pw=$(mktemp)
  printf '%s' "$POSTGRES_PASSWORD" > "$pw"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  if [ "$POSTGRES_DB" != postgres ]; then
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    createdb -U "$POSTGRES_USER" "$POSTGRES_DB"
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  echo "postgres-entrypoint: cluster created in $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi
exec "$@"
SH
    chmod 755 "$dir"/usr/local/bin/postgres-entrypoint
  fi
}

# Prints the name of the base image NAME (debootstrapped with PACKAGES), making it if needed.
base_image() { # name packages
  local name=$1 include=$2 key image tar dir log
  key=$(printf '%s\n' v1 "$SUITE" minbase "$include" "$MIRROR" "$(declare -f customize)" | sha256sum | cut -c1-12)
  image="floodgate-$name-base:$SUITE-$key"
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "images: $image cached" >&2
    echo "$image"; return
  fi
  tar="$IMAGES_DIR/$name-$SUITE-$key.tar"
  if [ ! -f "$tar" ]; then
    if ! command -v debootstrap >/dev/null 2>&1; then
      [ "$(id -u)" = 0 ] || { echo "images: debootstrap missing: sudo apt-get install -y debootstrap" >&2; exit 1; }
      apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1 ||
        { apt-get update >/dev/null; apt-get install -y --no-install-recommends debootstrap >/dev/null; }
    fi
    [ "$(id -u)" = 0 ] || { echo "images: debootstrap needs root" >&2; exit 1; }
    dir="$IMAGES_DIR/rootfs-$name.tmp"
    log="$IMAGES_DIR/debootstrap-$name.log"
    rm -rf "$dir"
    echo "images: debootstrap $SUITE ($include) -> $tar" >&2
    if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$dir" "$MIRROR" > "$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "images: debootstrap failed (full log: $log)" >&2
      exit 1
    fi
    customize "$dir" "$name"
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -C "$dir" -cf "$tar.tmp" .
    mv "$tar.tmp" "$tar"
    rm -rf "$dir"
  fi
  echo "images: importing $tar" >&2
  docker import -c 'CMD ["bash"]' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    "$tar" "$image" >/dev/null
  echo "$image"
}

runtime_base=$(base_image runtime ca-certificates,curl)
services_base=$(base_image services ca-certificates,postgresql-15,redis-server)

echo "images: $POSTGRES_IMAGE, $REDIS_IMAGE from $services_base" >&2
build -t "$POSTGRES_IMAGE" --label org.floodgate.images=local - <<EOF
FROM $services_base
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
USER postgres
WORKDIR /var/lib/postgresql
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
CMD ["postgres"]
EOF
build -t "$REDIS_IMAGE" --label org.floodgate.images=local - <<EOF
FROM $services_base
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
[ "$only_bases" = 1 ] && exit 0

# The project's image: the Dockerfile's stages from the local base, the host's binaries.
ctx="$IMAGES_DIR/context"
rm -rf "$ctx"
mkdir -p "$ctx/bin"
cp Dockerfile "$ctx/"
cp -r config "$ctx/"
cp "$BIN/gateway" "$BIN/backend" "$BIN/mock-vendor" "$ctx/bin/"
echo "images: $FLOODGATE_IMAGE from $runtime_base and $BIN" >&2
build -t "$FLOODGATE_IMAGE" --label org.floodgate.images=local \
  --build-arg BUILDER="$runtime_base" --build-arg RUNTIME_BASE="$runtime_base" \
  --build-arg PREBUILT_BIN=bin "$ctx"
rm -rf "$ctx"
# New binaries leave the previous image and build stage untagged (a few hundred MB each): only
# this script's own, by their labels, are removed.
docker image prune -f --filter label=org.floodgate.images=local >/dev/null
docker image prune -f --filter label=org.floodgate.prebuilt-bin=bin >/dev/null

echo "images: ready: $FLOODGATE_IMAGE $POSTGRES_IMAGE $REDIS_IMAGE"
