"""Emulators running in a background thread of the test process."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from relay.emulators.harness import BackgroundLoop, EmulatorServer


@contextmanager
def serving(
    emulator: Any, ports: list[int] | None = None
) -> Iterator[tuple[BackgroundLoop, EmulatorServer]]:
    loop = BackgroundLoop()
    loop.start()
    server: EmulatorServer = emulator.make_server("127.0.0.1", ports or [0])
    loop.run(server.start())
    try:
        yield loop, server
    finally:
        if hasattr(emulator, "set_traffic"):
            loop.call(lambda: emulator.set_traffic(0))
        loop.run(server.stop())
        loop.stop()


def refused_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
