# syntax=docker/dockerfile:1
# Multi-stage build: a Rust builder, then a small Debian runtime with CA certificates,
# running as a non-root user with a read-only root filesystem in mind (nothing is written).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
COPY schema ./schema
# The production image is built without the `dev-tools` feature: no stub API, no `seed`
# (which can empty tables), no `demo`. docker-compose.yml, a local cluster, builds with
# `--build-arg CARGO_FEATURES=dev-tools` to get them.
ARG CARGO_FEATURES=""
RUN cargo build --release --locked --bin loansync --no-default-features \
    ${CARGO_FEATURES:+--features "$CARGO_FEATURES"}

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin loansync
COPY --from=build /src/target/release/loansync /usr/local/bin/loansync
USER 10001:10001
ENV LOG_FORMAT=json METRICS_ADDR=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/loansync"]
CMD ["worker"]
