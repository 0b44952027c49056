# Sluice container image: build on Debian 12, run as a non-root user on a slim Debian 12.
FROM debian:12 AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libevent-dev libcurl4-openssl-dev libjansson-dev \
      libssl-dev libhiredis-dev libyaml-dev libpcre2-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSLUICE_TESTS=OFF \
    && cmake --build build -j"$(nproc)" \
    && strip build/sluice build/sluice-mockllm

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      libevent-2.1-7 libevent-pthreads-2.1-7 libevent-openssl-2.1-7 libcurl4 libjansson4 \
      libssl3 libhiredis0.14 libyaml-0-2 libpcre2-8-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /src/build/sluice /src/build/sluice-mockllm /usr/local/bin/
COPY conf/sluice.yaml /etc/sluice/sluice.yaml
USER sluice
EXPOSE 8080 9180
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["-c", "/etc/sluice/sluice.yaml"]
