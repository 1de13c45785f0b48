# syntax=docker/dockerfile:1
# parley: multi-stage build. The runtime image holds the stripped binary, its default
# configuration, the CA bundle, the source of the MPL-2.0 crate it is built with, and the
# licence and notice files of every crate in the binary (/usr/share/doc/parley/
# third-party, by scripts/notices: jemalloc's, aws-lc's and SQLite's among them); it
# runs as an unprivileged user (uid 10001) and writes only under /var/lib/parley, so it
# runs with a read-only root filesystem.
#
#   scripts/image                       # picks docker, buildah or podman; tags parley:dev
#   docker build -t parley:dev .        # the same with docker (BuildKit)
#   docker run --rm parley:dev init --env > parley.env   # fresh secrets
#   docker run --env-file parley.env -p 8080:8080 -v parley-data:/var/lib/parley parley:dev
#
# Base images are build arguments so that a machine without registry access can pass
# local ones (scripts/image makes them from Debian's packages when no registry answers).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole build context (.dockerignore keeps out target/, node_modules, data): the
# crate, its build script and proto/, the patched crates in vendor/, the workspace's bench
# crate, and web/dist + web/demo that src/web.rs embeds.
COPY . .
# Dependencies are cached across builds in cache mounts (the registry and target/), so a
# change to parley's code rebuilds parley alone. The binary is built without debug line
# tables and stripped: ~21 MB instead of ~138 MB.
# jemalloc (the default allocator) is built for a page size fixed at build time: on
# arm64 it is built for 64 KiB pages, which also runs on 4 and 16 KiB kernels (built on
# a 4 KiB machine, it would refuse to start on a 64 KiB one).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    if [ "$(uname -m)" = aarch64 ]; then export JEMALLOC_SYS_WITH_LG_PAGE=16; fi \
    && CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p parley --bin parley \
    && install -D -m 0755 target/release/parley /out/usr/local/bin/parley \
    && install -D -m 0644 config/parley.toml /out/etc/parley/parley.toml \
    && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ca-certificates.crt \
    && mkdir -p /out/usr/share/doc/parley \
    && cp -r vendor/yawc /out/usr/share/doc/parley/yawc-source \
    && cp vendor/patches/yawc-*.patch /out/usr/share/doc/parley/ \
    && cp vendor/README.md /out/usr/share/doc/parley/vendor-README.md \
    && scripts/notices /out/usr/share/doc/parley/third-party

FROM ${RUNTIME_IMAGE}
# The user and its data folder (the only place parley writes: SQLite store, files).
RUN groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/parley --no-create-home \
       --shell /usr/sbin/nologin parley \
    && mkdir -p /var/lib/parley && chown 10001:10001 /var/lib/parley
COPY --from=build /out/ /
USER 10001:10001
WORKDIR /var/lib/parley
# Listens on every interface inside the container: it refuses to start so unless a JWT
# secret (or key) is configured: PARLEY_AUTH__JWT_SECRET, or a config file from
# `parley init`. SSL_CERT_FILE: the CA bundle for outgoing TLS (S3).
ENV PARLEY_CONFIG=/etc/parley/parley.toml \
    PARLEY_SERVER__LISTEN=0.0.0.0:8080 \
    PARLEY_STORE__PATH=/var/lib/parley/parley.db \
    PARLEY_FILES__DIR=/var/lib/parley/files \
    PARLEY_LOG__FORMAT=json \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
VOLUME /var/lib/parley
EXPOSE 8080
# `parley health` probes the configured listen port on loopback, so it follows
# PARLEY_SERVER__LISTEN.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["parley", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["parley"]
CMD ["serve"]
