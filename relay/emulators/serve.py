"""``relay emulate ...``: one emulator on loopback ports until SIGINT/SIGTERM.

The emulators' serving loop, apart from the operator CLI: it prints one JSON
line with the emulator's addresses once it listens, runs its traffic, and
stops cleanly on a signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from typing import Any


class ListenError(Exception):
    """A port cannot be listened on; the message names the option."""


def serve(emulator: Any, host: str, ports: tuple[int, ...], banner: dict[str, Any],
          start_traffic: Callable[[], None], announce: Callable[[str], object]) -> None:
    async def run() -> None:
        server = emulator.make_server(host, list(ports))
        try:
            await server.start()
        except OSError as exc:
            await server.stop()
            raise ListenError(f"--port: cannot listen on {host} {', '.join(map(str, ports))}:"
                              f" {exc.strerror or exc}") from None
        start_traffic()
        announce(json.dumps({**banner, "urls": server.urls,
                             "admin": f"{server.urls[0]}/_emulator/stats"}))
        try:
            await asyncio.Event().wait()
        finally:
            emulator.set_traffic(0)
            await server.stop()

    async def main_task() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run()

    asyncio.run(main_task())
