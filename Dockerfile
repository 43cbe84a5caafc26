# syntax=docker/dockerfile:1
# Build: docker build -t im-relay .
# Run:   docker run --read-only -v relay-data:/var/lib/relay -v ./relay.toml:/etc/relay/relay.toml:ro im-relay

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
