"""``relay demo``: the emulators, the relay and a file sink, with no configuration.

Everything lives under one folder (``./var/demo`` by default): the generated
``relay.toml`` (so ``relay status --config var/demo/relay.toml`` works), the
journal and ``events.jsonl``.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

import anyio
import click

from relay.app import Relay
from relay.config import load_config
from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator
from relay.emulators.wukongim import ServerQuirks, WuKongIMEmulator
from relay.logs import configure_logging, register_secrets
from relay.private_files import make_private_dirs

_CONFIG = """\
# Written by `relay demo`: the relay's configuration for the demo emulators.
shutdown_grace = "10s"

[journal]
path = "{dir}/relay.db"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[sources.rongcloud]
type = "rongcloud"
app_key = "{app_key}"
app_secret = "{app_secret}"
base_urls = [{rc_urls}]
idle_interval = "500ms"

[sources.wukongim]
type = "wukongim"
base_url = "{wk_url}"
token = "{wk_token}"
uids = ["u1", "u2"]
channels = [{{ id = "g1", type = 2 }}]
idle_interval = "500ms"

[sources.leancloud]
type = "leancloud"
base_url = "{lc_url}"
app_id = "demo-app-id"
master_key = "{lc_key}"
settle_delay = "1s"
start = "1h"
idle_interval = "500ms"

[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"
rotate_bytes = "64MiB"
"""


def _banner(directory: Path, relay: Relay, urls: str) -> str:
    events = directory / "events.jsonl"
    config = directory / "relay.toml"
    port = relay.metrics_port
    return "\n".join([
        "",
        "IM Relay demo is running (Ctrl-C to stop).",
        f"  emulators    {urls}",
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


def _free_port() -> int:
    """A loopback port for the demo's metrics, written into its relay.toml: `relay top
    --config var/demo/relay.toml` and `relay status` then find the running demo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(directory: Path, rate: float) -> None:
    make_private_dirs(directory)
    configure_logging("info", "auto")
    app_secret = secrets.token_urlsafe(16)
    wk_token = secrets.token_urlsafe(16)
    lc_key = secrets.token_urlsafe(16)
    register_secrets([app_secret, wk_token, lc_key])

    async def main() -> None:
        rongcloud = RongCloudEmulator("demo-app-key", app_secret, redelivery_ratio=0.02,
                                      batch_size=50)
        # The real server's behaviours (WUKONGIM-SERVER.md), its one-minute window of acks
        # that do nothing shortened so that the demo's acknowledgements show soon.
        wukongim = WuKongIMEmulator(
            wk_token, uids=("u1", "u2"), channels=(("g1", 2),),
            quirks=ServerQuirks.real().updated({"conversation_persist_seconds": 5.0}))
        leancloud = LeanCloudEmulator("demo-app-id", lc_key)
        servers = [rongcloud.make_server("127.0.0.1", [0, 0]),  # a primary and a backup domain
                   wukongim.make_server("127.0.0.1", [0]),
                   leancloud.make_server("127.0.0.1", [0])]
        for server in servers:
            await server.start()
        # A backlog, as after a restart, then steady traffic.
        rongcloud.generate(150)
        wukongim.generate(40)
        wukongim.generate_channel(40)
        leancloud.generate(60, age=60)
        rongcloud.set_traffic(rate)
        wukongim.set_traffic(rate / 10)
        leancloud.set_traffic(rate / 2)
        config_file = directory / "relay.toml"
        config_file.write_text(_CONFIG.format(
            dir=directory.as_posix(), app_key="demo-app-key", app_secret=app_secret,
            rc_urls=", ".join(f'"{u}"' for u in servers[0].urls),
            wk_url=servers[1].urls[0], wk_token=wk_token, lc_url=servers[2].urls[0],
            lc_key=lc_key, metrics_port=_free_port(),
        ))
        config_file.chmod(0o600)
        relay = Relay(load_config(config_file))
        urls = (f"RongCloud {', '.join(servers[0].urls)}; WuKongIM {servers[1].urls[0]};"
                f" LeanCloud {servers[2].urls[0]}")

        async def ready(r: Relay) -> None:
            click.echo(_banner(directory, r, urls))
            tg.start_soon(_progress, directory / "events.jsonl", r)

        try:
            async with anyio.create_task_group() as tg:
                async def run_relay(task_group: Any = tg) -> None:
                    await relay.run(ready)
                    task_group.cancel_scope.cancel()

                tg.start_soon(run_relay)
        finally:
            for emulator in (rongcloud, wukongim, leancloud):
                emulator.set_traffic(0)
            for server in servers:
                await server.stop()

    anyio.run(main)
