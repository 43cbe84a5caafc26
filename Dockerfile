# syntax=docker/dockerfile:1
# Build: docker build -t im-relay .
# Run (read-only root file system, with a /tmp for Python and gzip; /metrics,
# /healthz, /readyz and /stats published on the host's loopback only; 40 s for
# the 20 s shutdown_grace, where docker stop would SIGKILL after 10 s):
#   docker run -d --name im-relay --read-only --tmpfs /tmp -p 127.0.0.1:9464:9464 \
#     --stop-timeout 40 -v relay-data:/var/lib/relay \
#     -v ./relay.toml:/etc/relay/relay.toml:ro im-relay
# Secrets: mount files (e.g. -v ./secrets:/run/secrets/im-relay:ro) and point the
# *_file keys of relay.toml at them; never pass them as -e variables.
# Erase a user with the relay stopped (erase rewrites the journal), with the same
# mounts as the relay (secrets too: it reads the whole configuration), then start it:
#   docker stop im-relay
#   docker run --rm --entrypoint relay -v relay-data:/var/lib/relay \
#     -v ./relay.toml:/etc/relay/relay.toml:ro im-relay erase --user ID
#   docker start im-relay
# Other commands the same way: --entrypoint relay ... status | check --offline | dlq list.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN python -m venv /opt/relay \
 && /opt/relay/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0700 /var/lib/relay
COPY --from=build /opt/relay /opt/relay
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_CONFIG_FILE=/etc/relay/relay.toml \
    RELAY_JOURNAL__PATH=/var/lib/relay/relay.db \
    RELAY_METRICS__LISTEN=0.0.0.0:9464
USER 10001:10001
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay"]
EXPOSE 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay", "run"]
