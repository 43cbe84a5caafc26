"""``relay demo``: the emulators, the relay and a file sink, with no configuration.

Everything lives under one folder (``./var/demo`` by default): the generated
``relay.toml`` (so ``relay status --config var/demo/relay.toml`` works), the
journal and ``events.jsonl``.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import anyio
import click

from relay.app import Relay
from relay.config import load_config
from relay.emulators.rongcloud import RongCloudEmulator
from relay.logs import configure_logging, register_secrets

_CONFIG = """\
# Written by `relay demo`: the relay's configuration for the demo emulators.
shutdown_grace = "10s"

[journal]
path = "{dir}/relay.db"

[metrics]
listen = "127.0.0.1:0"

[sources.rongcloud]
type = "rongcloud"
app_key = "{app_key}"
app_secret = "{app_secret}"
base_urls = [{rc_urls}]
idle_interval = "500ms"

[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"
rotate_bytes = "64MiB"
"""


def _banner(directory: Path, relay: Relay, urls: list[str]) -> str:
    events = directory / "events.jsonl"
    config = directory / "relay.toml"
    port = relay.metrics_port
    return "\n".join([
        "",
        "IM Relay demo is running (Ctrl-C to stop).",
        f"  emulators    RongCloud at {', '.join(urls)}",
        f"  events land  {events}  (one JSON event per line)",
        f"  watch them   tail -f {events}",
        f"  status       relay status --config {config}",
        f"  metrics      http://127.0.0.1:{port}/metrics" if port else "  metrics      off",
        "",
    ])


async def _progress(events: Path, relay: Relay) -> None:
    last = -1
    while True:
        await anyio.sleep(10)
        try:
            with events.open("rb") as f:
                count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            count = 0
        if count != last:
            click.echo(f"  … {count} events in {events}")
            last = count


def run_demo(directory: Path, rate: float) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    configure_logging("info", "auto")
    app_secret = secrets.token_urlsafe(16)
    register_secrets([app_secret])

    async def main() -> None:
        rongcloud = RongCloudEmulator("demo-app-key", app_secret, redelivery_ratio=0.02,
                                      batch_size=50)
        server = rongcloud.make_server("127.0.0.1", [0, 0])  # a primary and a backup domain
        await server.start()
        rongcloud.generate(150)  # a backlog, as after a restart
        rongcloud.set_traffic(rate)
        config_file = directory / "relay.toml"
        config_file.write_text(_CONFIG.format(
            dir=directory.as_posix(), app_key="demo-app-key", app_secret=app_secret,
            rc_urls=", ".join(f'"{u}"' for u in server.urls),
        ))
        config_file.chmod(0o600)
        relay = Relay(load_config(config_file))

        async def ready(r: Relay) -> None:
            click.echo(_banner(directory, r, server.urls))
            tg.start_soon(_progress, directory / "events.jsonl", r)

        try:
            async with anyio.create_task_group() as tg:
                async def run_relay(task_group: Any = tg) -> None:
                    await relay.run(ready)
                    task_group.cancel_scope.cancel()

                tg.start_soon(run_relay)
        finally:
            rongcloud.set_traffic(0)
            await server.stop()

    anyio.run(main)
