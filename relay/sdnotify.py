"""The systemd notification protocol (``sd_notify``): READY, WATCHDOG, STOPPING, STATUS.

A datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket). Without the variable (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._socket: socket.socket | None = None
        if self.address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout systemd expects pings within, if it set one."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1_000_000 / 2

    def notify(self, *fields: str) -> None:
        if self._socket is None:
            return
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        # systemd gone or socket unreachable: nothing useful to do about it.
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(fields).encode(), target)

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
