# parley: multi-stage build. The runtime image holds only the binary, its default
# configuration and CA certificates, and runs as an unprivileged user.
#   docker build -t parley .
#   docker run -p 8080:8080 -e PARLEY_AUTH__JWT_SECRET=... parley

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so they are cached when only parley's code changes.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src benches bench/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/codec.rs && echo 'fn main() {}' > benches/store.rs \
    && echo 'fn main() {}' > bench/src/main.rs && touch bench/src/lib.rs \
    && cargo build --release --locked -p parley \
    && rm -rf src benches
COPY src src
COPY benches benches
# The browser SDK build and demo page that src/web.rs embeds (include_str!).
COPY web/dist web/dist
COPY web/demo web/demo
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p parley --bin parley

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/parley --create-home parley
COPY --from=build /src/target/release/parley /usr/local/bin/parley
COPY config/parley.toml /etc/parley/parley.toml
USER parley
WORKDIR /var/lib/parley
ENV PARLEY_CONFIG=/etc/parley/parley.toml \
    PARLEY_SERVER__LISTEN=0.0.0.0:8080 \
    PARLEY_STORE__PATH=/var/lib/parley/parley.db \
    PARLEY_FILES__DIR=/var/lib/parley/files \
    PARLEY_LOG__FORMAT=json
VOLUME /var/lib/parley
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["parley", "health", "127.0.0.1:8080"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["parley"]
CMD ["serve"]
