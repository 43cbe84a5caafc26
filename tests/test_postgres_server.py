"""The test suite's PostgreSQL server: a real one, durable, that can be stopped, killed and
brought back on the same address with its data (tests/support/postgres.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.support.postgres import PostgresServer, PostgresToolMissingError, find_bindir

pytestmark = pytest.mark.anyio

# Failures a client may see from a server that went away: the server's FATAL
# admin_shutdown (a PostgresError), a connection already closed (InterfaceError),
# or the socket itself (OSError: reset, refused).
GONE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


async def test_committed_row_survives_a_stop_and_a_start(postgres_server: PostgresServer,
                                                         postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("CREATE TABLE events (seq bigint PRIMARY KEY, id text UNIQUE)")
        await conn.execute("INSERT INTO events VALUES (1, 'rc:a')")
        port = postgres_server.port

        assert postgres_server.stop() is True
        assert not postgres_server.last_stop_forced
        assert not postgres_server.is_running
        with pytest.raises(GONE):
            await conn.fetchval("SELECT count(*) FROM events")
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(postgres_dsn, timeout=5)
    finally:
        await conn.close(timeout=5)

    postgres_server.start()
    assert postgres_server.port == port
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch("SELECT seq, id FROM events")
        assert [tuple(row) for row in rows] == [(1, "rc:a")]
    finally:
        await conn.close()


async def test_committed_row_survives_kill_9(postgres_server: PostgresServer,
                                             postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("CREATE TABLE events (seq bigint PRIMARY KEY, id text UNIQUE)")
        await conn.execute("INSERT INTO events VALUES (1, 'rc:a')")
        pid = postgres_server.pid
        assert pid is not None

        assert postgres_server.kill() is True
        assert not postgres_server.is_running
        with pytest.raises(GONE):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()

    postgres_server.start()  # crash recovery replays the WAL
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT id FROM events WHERE seq = 1") == "rc:a"
    finally:
        await conn.close()
    assert "database system was interrupted" in postgres_server.log_tail(200)


async def test_the_server_is_durable_and_not_run_as_root(postgres_server: PostgresServer,
                                                          postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SELECT current_user") == postgres_server.user
        assert int(await conn.fetchval("SHOW server_version_num")) >= 150000
    finally:
        await conn.close()
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        data_dir = Path(await admin.fetchval("SHOW data_directory"))
    finally:
        await admin.close()
    pid = postgres_server.pid
    assert pid is not None
    assert os.stat(f"/proc/{pid}").st_uid != 0
    assert data_dir == postgres_server.data_dir


async def test_each_test_gets_a_fresh_database_of_its_own(postgres_server: PostgresServer,
                                                          postgres_dsn: str) -> None:
    other = postgres_server.create_database()
    try:
        assert other != postgres_dsn
        for dsn in (postgres_dsn, other):
            conn = await asyncpg.connect(dsn)
            try:
                tables = await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                assert tables == 0
                await conn.execute("CREATE TABLE t (x int)")
            finally:
                await conn.close()
    finally:
        postgres_server.drop_database(other.rsplit("/", 1)[1])


async def test_a_wrong_password_is_refused(postgres_server: PostgresServer,
                                           postgres_dsn: str) -> None:
    wrong = postgres_dsn.replace(postgres_server.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)


def test_missing_binaries_are_reported_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("RELAY_TEST_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresToolMissingError, match="postgresql-15"):
        find_bindir()


async def test_a_private_server_with_fsync_off(make_postgres_server: Callable[...,
                                                                       PostgresServer],
                                               postgres_server: PostgresServer) -> None:
    private = make_postgres_server(fsync=False)
    assert private.port != postgres_server.port
    conn = await asyncpg.connect(private.dsn())
    try:
        assert await conn.fetchval("SHOW fsync") == "off"
    finally:
        await conn.close()
