"""pytest fixtures around :class:`tests.support.postgres.PostgresServer`.

Registered in ``tests/conftest.py`` through ``pytest_plugins`` (a plugin module, so
that the ``pytest_terminal_summary`` hook reporting the start-up time is registered
as well as the fixtures).

* ``postgres_server`` (session): one real server for the whole session, closed at the
  end.  A test may :meth:`~PostgresServer.stop` or :meth:`~PostgresServer.kill` it and
  :meth:`~PostgresServer.start` it again; ``postgres_dsn`` restarts it after a test
  that left it down.  If it cannot start, the requesting tests are skipped with the
  reason, or fail when ``CI=true``.
* ``postgres_dsn`` (function): the DSN of a fresh database of its own (owned by the
  password role, cloned from ``relay_template``), dropped after the test.
* ``make_postgres_server`` (function): a factory for private servers (same arguments
  as :class:`PostgresServer`), for tests that need a server to themselves; each is
  closed after the test.

``RELAY_TEST_PG_FSYNC=off`` runs the session server with ``fsync = off`` (faster, but
then nothing measured against it says anything about durability).

The start-up time is recorded as junit-xml test-suite properties
(``postgres_startup_seconds`` ...) and printed in the terminal summary ("postgres test
server" section).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import pytest

from .postgres import PostgresServer

__all__ = ["make_postgres_server", "postgres_dsn", "postgres_server", "pytest_terminal_summary"]

FSYNC_ENV = "RELAY_TEST_PG_FSYNC"
_SUMMARY_KEY = pytest.StashKey[list[str]]()


def _server_unavailable(reason: str) -> None:
    """Fail under CI (``CI=true``), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL test server unavailable (CI=true, so failing): {reason}",
                    pytrace=False)
    pytest.skip(f"PostgreSQL test server unavailable: {reason}")


def _fsync_from_env() -> bool:
    value = os.environ.get(FSYNC_ENV, "on").strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0"):
        raise pytest.UsageError(f"{FSYNC_ENV} must be on or off, not {value!r}")
    return value in ("on", "true", "1")


def _sigterm_as_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _start(server: PostgresServer) -> None:
    try:
        server.start()
    except Exception as exc:  # PostgresServerError, missing binaries or user, OSError ...
        server.close()
        _server_unavailable(f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def postgres_server(
    request: pytest.FixtureRequest,
    record_testsuite_property: Callable[[str, object], None],
) -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1, shared by the session."""
    # The postmaster runs in a session of its own: a SIGTERM to pytest would end Python
    # without clean-up and leave it running.  As a KeyboardInterrupt, teardown runs.
    previous_sigterm: Any = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        if previous_sigterm == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm_as_keyboard_interrupt)
        else:
            previous_sigterm = None
    try:
        server = PostgresServer(fsync=_fsync_from_env())
        _start(server)
        startup = server.startup_seconds or 0.0
        initdb = server.initdb_seconds or 0.0
        record_testsuite_property("postgres_version", server.version or "")
        record_testsuite_property("postgres_startup_seconds", f"{startup:.2f}")
        record_testsuite_property("postgres_initdb_seconds", f"{initdb:.2f}")
        request.config.stash.setdefault(_SUMMARY_KEY, []).append(
            f"PostgreSQL {server.version} at {server.host}:{server.port} as "
            f"{server.os_user}, fsync {'on' if server.fsync else 'off'}: start-up "
            f"{startup:.2f}s (initdb {initdb:.2f}s) (log: {server.log_file})"
        )
        try:
            yield server
        finally:
            server.close()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """``postgresql://relay:…@127.0.0.1:PORT/test_…``: a fresh database for this test."""
    if not postgres_server.is_running:  # an earlier test stopped it and did not restart it
        postgres_server.start()
    dsn = postgres_server.create_database()
    yield dsn
    if not postgres_server.is_running:
        postgres_server.start()
    postgres_server.drop_database(urlsplit(dsn).path.lstrip("/"))


@pytest.fixture
def make_postgres_server() -> Iterator[Callable[..., PostgresServer]]:
    """``make_postgres_server(**kwargs)``: a started private server, closed after the test."""
    servers: list[PostgresServer] = []

    def make(**kwargs: Any) -> PostgresServer:
        server = PostgresServer(**kwargs)
        servers.append(server)
        _start(server)
        return server

    yield make
    for server in servers:
        server.close()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Print the server's start-up time (visible with or without ``-s``)."""
    lines = config.stash.get(_SUMMARY_KEY, [])
    if lines:
        terminalreporter.write_sep("-", "postgres test server")
        for line in lines:
            terminalreporter.write_line(line)
