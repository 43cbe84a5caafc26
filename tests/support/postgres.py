"""A real PostgreSQL server for tests and benchmarks, from the machine's binaries.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` (found by :func:`find_bindir`)
on a free port of 127.0.0.1, with the data directory, the log and the unix socket in
a temporary folder.  Nothing of the machine's own PostgreSQL set-up is used or
touched: no system cluster, no ``/var/run/postgresql``.

``initdb`` and ``postgres`` refuse to run as root, and sessions and CI run as root:
then every server command runs as an unprivileged user through ``runuser -u USER --``
(``postgres``, which Debian's package creates; ``$RELAY_TEST_PG_OS_USER`` to change
it) and the temporary folder belongs to that user.  Anyone else runs them directly.

The server has

* a password role (:attr:`PostgresServer.user`, ``CREATEDB``) owning the database
  :attr:`PostgresServer.database` and the template :data:`TEMPLATE_DATABASE`, from
  which :meth:`PostgresServer.create_database` makes a fresh database per test;
* the superuser ``postgres``: with a password over TCP (:attr:`PostgresServer.admin_dsn`),
  trusted on the unix socket, whose folder only the server's user can enter;
* ``fsync`` on unless asked otherwise (the relay's durability is measured against it).

:meth:`~PostgresServer.stop` (``pg_ctl stop``: ``fast`` by default, or ``smart`` =
SIGTERM, ``immediate``), :meth:`~PostgresServer.kill` (SIGKILL to the postmaster and
every backend) and :meth:`~PostgresServer.start` again bring the same server back on
the same port with the same data.

``python -m tests.support.postgres`` starts a server, prints one JSON line with the
connection details and runs until SIGINT/SIGTERM.

Environment variables:

``RELAY_TEST_PG_BINDIR``
    Directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``psql`` (else see
    :func:`find_bindir`).
``RELAY_TEST_PG_OS_USER``
    The unprivileged user the server runs as when we are root (default ``postgres``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import quote

__all__ = [
    "PREFERRED_MAJOR",
    "TEMPLATE_DATABASE",
    "PostgresServer",
    "PostgresServerError",
    "PostgresToolMissingError",
    "StopMode",
    "find_bindir",
]

#: The major release the project targets; others found on the machine are used too.
PREFERRED_MAJOR: Final = 15
TEMPLATE_DATABASE: Final = "relay_template"
BINDIR_ENV: Final = "RELAY_TEST_PG_BINDIR"
OS_USER_ENV: Final = "RELAY_TEST_PG_OS_USER"
SUPERUSER: Final = "postgres"
_TOOLS: Final = ("initdb", "pg_ctl", "postgres", "psql")
_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_CONF_NAME: Final = "relay-test.conf"
_INITDB_TIMEOUT_S: Final = 120.0
_PSQL_TIMEOUT_S: Final = 60.0
_BIND_FAILURES: Final = ("could not bind", "Address already in use", "could not create any TCP")

StopMode = Literal["smart", "fast", "immediate"]


class PostgresServerError(RuntimeError):
    """The server could not be prepared, started, stopped or used."""


class PostgresToolMissingError(PostgresServerError):
    """No PostgreSQL server binaries, or no unprivileged user to run them as root."""


# --------------------------------------------------------------------------
# Finding the binaries
# --------------------------------------------------------------------------


def _has_tools(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in _TOOLS)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _debian_bindirs() -> list[Path]:
    """``/usr/lib/postgresql/<major>/bin``, the preferred major first, then newest first."""
    found: list[tuple[int, Path]] = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        with contextlib.suppress(ValueError):
            found.append((int(candidate.parent.name), candidate))
    found.sort(key=lambda item: (item[0] != PREFERRED_MAJOR, -item[0]))
    return [path for _, path in found]


def bindir_candidates() -> list[Path]:
    """Where the server binaries are looked for, in order."""
    candidates: list[Path] = []
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        return [Path(explicit)]
    candidates.append(Path(f"/usr/lib/postgresql/{PREFERRED_MAJOR}/bin"))
    from_pg_config = _pg_config_bindir()
    if from_pg_config is not None:
        candidates.append(from_pg_config)
    on_path = shutil.which("initdb")
    if on_path is not None:  # often a symlink into the real bindir (pg_ctl lives beside it)
        candidates.append(Path(on_path).resolve().parent)
        candidates.append(Path(on_path).parent)
    candidates.extend(_debian_bindirs())
    return list(dict.fromkeys(candidates))


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``psql``.

    ``$RELAY_TEST_PG_BINDIR`` if set; else ``/usr/lib/postgresql/15/bin``; else
    ``pg_config --bindir``; else where ``initdb`` on ``PATH`` lives; else any other
    ``/usr/lib/postgresql/*/bin`` (newest first).
    """
    candidates = bindir_candidates()
    for candidate in candidates:
        if _has_tools(candidate):
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise PostgresToolMissingError(
        f"no PostgreSQL server binaries ({', '.join(_TOOLS)}) in {looked}; install Debian's "
        f"postgresql-{PREFERRED_MAJOR} (or postgresql) package, `make test` does it as root, "
        f"or set ${BINDIR_ENV}"
    )


def server_version(bindir: Path) -> str:
    """``postgres --version`` without the program name, e.g. ``15.18 (Debian 15.18-0+deb12u1)``."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, timeout=30, check=False)
    text = out.stdout.strip()
    if out.returncode != 0 or not text:
        raise PostgresServerError(f"{bindir / 'postgres'} --version failed: {out.stderr.strip()}")
    return text.removeprefix("postgres (PostgreSQL) ")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _read_tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
    except FileNotFoundError:
        return []


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


_DEAD: Final = ("Z", "X")  # a zombie is dead, only not yet reaped by its parent


def _alive(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in _DEAD


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] == "Z"


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group *pgid* (the postmaster and its backends)."""
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] not in _DEAD:
            members.append(int(entry.name))
    return members


def _conf_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("'", "''") + "'"


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _checked_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} must match {_NAME_RE.pattern}: {name!r}")
    return name


_LIVE: set[PostgresServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_servers() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class PostgresServer:
    """One real PostgreSQL server on 127.0.0.1, its files in a temporary folder.

    The port is picked on the first :meth:`start` and kept for the life of the object,
    so :meth:`stop` / :meth:`kill` followed by :meth:`start` brings the same server
    back on the same address with its data.  Use as a context manager, or call
    :meth:`close` (which stops the server and removes the folder).
    """

    def __init__(
        self,
        *,
        fsync: bool = True,
        user: str = "relay",
        database: str = "relay",
        password: str | None = None,
        settings: Mapping[str, str | int | bool] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        bindir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.fsync: Final = fsync
        self.user: Final = _checked_name(user, "user")
        self.database: Final = _checked_name(database, "database")
        self._password = password if password is not None else secrets.token_hex(16)
        self._admin_password = secrets.token_hex(16)
        self._settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._bindir_arg = Path(bindir) if bindir is not None else None
        self._bindir: Path | None = None
        self.version: str | None = None
        self.os_user: str | None = None
        self.work_dir: Path | None = None
        self._port: int | None = None
        self._initialized = False
        self._bootstrapped = False
        self._closed = False
        #: Seconds ``initdb`` took (first start only).
        self.initdb_seconds: float | None = None
        #: Seconds the last :meth:`start` took, ``initdb`` and bootstrap SQL included.
        self.startup_seconds: float | None = None
        #: Whether the last :meth:`stop` had to fall back to :meth:`kill`.
        self.last_stop_forced: bool | None = None

    # -- paths, addresses, credentials ----------------------------------------

    def _work(self) -> Path:
        if self.work_dir is None:
            raise PostgresServerError("the server has not been started yet")
        return self.work_dir

    @property
    def data_dir(self) -> Path:
        return self._work() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._work() / "socket"

    @property
    def log_file(self) -> Path:
        """The server's log (``pg_ctl -l``)."""
        return self._work() / "postgres.log"

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = self._bindir_arg if self._bindir_arg is not None else find_bindir()
        return self._bindir

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresServerError("the server has not been started yet: no port assigned")
        return self._port

    @property
    def password(self) -> str:
        """The password of :attr:`user`."""
        return self._password

    def dsn(self, database: str | None = None) -> str:
        """``postgresql://`` URL for :attr:`user` (password included) to *database*."""
        return self._url(self.user, self._password, database or self.database)

    @property
    def admin_dsn(self) -> str:
        """The superuser, over TCP with its password, to the ``postgres`` database."""
        return self._url(SUPERUSER, self._admin_password, "postgres")

    def _url(self, user: str, password: str, database: str) -> str:
        return (f"postgresql://{quote(user)}:{quote(password, safe='')}@{self.host}:{self.port}"
                f"/{quote(database)}")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        if self.work_dir is None:
            return None
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first)
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    def connection_info(self) -> dict[str, Any]:
        """Everything a client (or a benchmark) needs, JSON-serialisable."""
        return {
            "version": self.version,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self._password,
            "database": self.database,
            "dsn": self.dsn(),
            "admin_dsn": self.admin_dsn,
            "fsync": self.fsync,
            "pid": self.pid,
            "work_dir": str(self.work_dir),
            "log_file": str(self.log_file),
            "startup_seconds": self.startup_seconds,
        }

    # -- diagnostics ------------------------------------------------------------

    def log_tail(self, n: int = 50) -> str:
        """The last *n* lines of the server log."""
        return "\n".join(_read_tail(self.log_file, n)) if self.work_dir is not None else ""

    def _error(self, message: str) -> PostgresServerError:
        where = f" in {self.work_dir}" if self.work_dir is not None else ""
        tail = self.log_tail(30)
        details = f"\n--- last lines of {self.log_file} ---\n{tail}" if tail else ""
        return PostgresServerError(f"PostgreSQL {self.version or ''}{where}: {message}{details}")

    # -- running commands as the server's user ----------------------------------

    def _pick_os_user(self) -> None:
        if os.geteuid() != 0:
            self.os_user = pwd.getpwuid(os.geteuid()).pw_name
            return
        name = os.environ.get(OS_USER_ENV, "postgres")
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise PostgresToolMissingError(
                f"running as root, and initdb/postgres refuse root, but there is no user "
                f"{name!r} to run them as (Debian's postgresql package creates `postgres`; "
                f"or set ${OS_USER_ENV})"
            ) from None
        if shutil.which("runuser") is None:
            raise PostgresToolMissingError("running as root and `runuser` (util-linux) is missing")
        self.os_user = name

    def _as_server_user(self, argv: Sequence[str]) -> list[str]:
        if os.geteuid() == 0:
            assert self.os_user is not None
            return ["runuser", "-u", self.os_user, "--", *argv]
        return list(argv)

    def _run(self, argv: Sequence[str], what: str, timeout: float,
             *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            # Our working directory may be one the server's user cannot enter.
            return subprocess.run(self._as_server_user(argv), cwd=self._work(), input=stdin,
                                  capture_output=True, text=True, timeout=timeout, check=False,
                                  env=self._env())
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"{what} did not finish within {timeout:.0f}s") from exc
        except OSError as exc:
            raise self._error(f"{what} could not be run: {exc}") from exc

    @staticmethod
    def _env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"  # messages we parse, and a cluster that ignores the host's locale
        return env

    def _make_work_dir(self) -> Path:
        base = Path(tempfile.gettempdir())
        if os.geteuid() == 0 and not self._others_can_enter(base):
            base = Path("/tmp")  # e.g. TMPDIR under /root: the server's user cannot reach it
        work = Path(tempfile.mkdtemp(prefix="im-relay-pg-", dir=base))
        (work / "socket").mkdir()
        if os.geteuid() == 0:
            assert self.os_user is not None
            entry = pwd.getpwnam(self.os_user)
            for path in (work, work / "socket"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return work

    @staticmethod
    def _others_can_enter(path: Path) -> bool:
        return all(part.stat().st_mode & 0o001 for part in (path, *path.parents))

    # -- set-up -----------------------------------------------------------------

    def _initdb(self) -> None:
        pwfile = self._work() / "superuser.pw"
        pwfile.write_text(self._admin_password + "\n")
        if os.geteuid() == 0:
            assert self.os_user is not None
            entry = pwd.getpwnam(self.os_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        started = time.monotonic()
        try:
            proc = self._run(
                [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                 f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
                 "--auth-local=trust", "--auth-host=scram-sha-256",
                 # The data dir dies with the test session: a machine crash is not a case
                 # the tests cover, so initdb's final sync of ~40 MB is wasted time.  The
                 # running server itself keeps fsync on (see _write_config).
                 "--no-sync", "--no-instructions"],
                "initdb", _INITDB_TIMEOUT_S)
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise self._error(f"initdb failed (exit {proc.returncode}):\n"
                              f"{(proc.stderr or proc.stdout).strip()}")
        self.initdb_seconds = time.monotonic() - started
        (self.data_dir / "pg_hba.conf").write_text(
            "# Written by tests/support/postgres.py\n"
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 trust\n"
            "host    all       all   127.0.0.1/32  scram-sha-256\n"
        )
        # Included last, so its settings win; postgresql.auto.conf stays ALTER SYSTEM's.
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"\ninclude '{_CONF_NAME}'\n")
        self._initialized = True

    def _write_config(self) -> None:
        settings: dict[str, str | int | bool] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": self.fsync,
            "synchronous_commit": True,
            "full_page_writes": True,
            "max_connections": 100,
            "shared_buffers": "64MB",
            "password_encryption": "scram-sha-256",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
        }
        settings.update(self._settings)
        lines = ["# Written by tests/support/postgres.py"]
        lines += [f"{key} = {_conf_value(value)}" for key, value in settings.items()]
        (self.data_dir / _CONF_NAME).write_text("\n".join(lines) + "\n")

    def _psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run *sql* as the superuser over the unix socket; its output (unaligned, no header)."""
        proc = self._run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-f", "-"],
            "psql", _PSQL_TIMEOUT_S, stdin=sql)
        if proc.returncode != 0:
            raise self._error(f"SQL failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def _bootstrap(self) -> None:
        user = self.user
        self._psql(
            f"CREATE ROLE {user} LOGIN CREATEDB PASSWORD {_sql_literal(self._password)};\n"
            f"CREATE DATABASE {TEMPLATE_DATABASE} OWNER {user} IS_TEMPLATE true;\n"
            f"CREATE DATABASE {self.database} TEMPLATE {TEMPLATE_DATABASE} OWNER {user};\n"
        )
        self._bootstrapped = True

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        The first start runs ``initdb`` and creates the role and databases; later
        starts reuse the port and the data (after :meth:`kill`, the server recovers
        from its WAL).  Raises :class:`PostgresServerError` with the log's last lines
        if it does not come up within ``startup_timeout`` seconds.
        """
        if self._closed:
            raise PostgresServerError("this PostgresServer has been closed")
        if self.is_running:
            raise PostgresServerError(f"already running (pid {self.pid})")
        started = time.monotonic()
        if self.work_dir is None:
            if self.version is None:
                self.version = server_version(self.bindir)
            self._pick_os_user()
            self.work_dir = self._make_work_dir()
            with _LIVE_LOCK:
                _LIVE.add(self)
        if not self._initialized:
            self._initdb()
        # A port picked as free may be taken before the server binds it: on the first
        # start, retry with another one.
        attempts = 1 if self._port is not None else 3
        for attempt in range(1, attempts + 1):
            if attempts > 1:
                self._port = _free_port()
            self._write_config()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._run(
                [str(self.bindir / "pg_ctl"), "start", "-D", str(self.data_dir), "-l",
                 str(self.log_file), "-w", "-t", str(max(1, int(self.startup_timeout))), "-s"],
                "pg_ctl start", self.startup_timeout + 30.0)
            if proc.returncode == 0:
                break
            self.kill()  # pg_ctl gave up waiting: leave no half-started postmaster behind
            new_log = self._log_since(log_offset)
            if attempt < attempts and any(text in new_log for text in _BIND_FAILURES):
                continue
            raise self._error(f"pg_ctl start failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")
        if not self._bootstrapped:
            self._bootstrap()
        self.startup_seconds = time.monotonic() - started

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, mode: StopMode = "fast", timeout: float | None = None) -> bool:
        """``pg_ctl stop -m MODE``: ``smart`` (SIGTERM: waits for clients to leave),
        ``fast`` (SIGINT: ends sessions, then a clean shutdown) or ``immediate``
        (SIGQUIT: no shutdown checkpoint, recovery at the next start).

        Falls back to :meth:`kill` after *timeout* seconds (default ``stop_timeout``);
        :attr:`last_stop_forced` tells whether it had to.  Returns whether a server
        was running.
        """
        if not self.is_running:
            return False
        wait = self.stop_timeout if timeout is None else timeout
        proc = self._run(
            [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w",
             "-t", str(max(1, int(wait))), "-s"],
            "pg_ctl stop", wait + 30.0)
        self.last_stop_forced = proc.returncode != 0 and self.is_running
        if self.last_stop_forced:
            self.kill()
        return True

    def kill(self) -> bool:
        """SIGKILL the postmaster and every backend, as a crash would; returns whether a
        server was running.  :meth:`start` recovers it from its WAL."""
        pid = self.pid
        if pid is None:
            return False
        # pg_ctl starts the postmaster in a session of its own; its backends share the
        # group.  Killing only the postmaster would leave backends attached to the
        # shared memory, and the next postmaster refuses to start until they exit.
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30.0
        while _alive(pid) or _group_members(pid):
            if time.monotonic() > deadline:
                raise self._error(f"processes of group {pid} still alive 30 s after SIGKILL")
            time.sleep(0.02)  # poll interval while the kernel tears the processes down
        # The postmaster was pg_ctl's child and is now an orphan: until the init process
        # reaps it (here that can take over a second) it is a zombie, which the next
        # postmaster's kill(pid, 0) takes for a live server holding the lock files.  A
        # zombie holds nothing, so its lock files are stale.
        if _is_zombie(pid):
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
        return True

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the server (``immediate``: its data is thrown away) and delete its folder."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.work_dir is not None:
                self.stop("immediate", timeout=10.0)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<PostgresServer {self.version or '?'} {where} {state}>"

    # -- databases ----------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by :attr:`user`, cloned from :data:`TEMPLATE_DATABASE`;
        returns its DSN."""
        name = _checked_name(name or f"test_{uuid.uuid4().hex[:16]}", "database")
        self._psql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DATABASE} OWNER {self.user};")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop *name*, ending its sessions first."""
        name = _checked_name(name, "database")
        self._psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);")

    def sql(self, sql: str, *, database: str = "postgres") -> str:
        """Run *sql* as the superuser (psql over the unix socket); unaligned output."""
        return self._psql(sql, database=database)


# --------------------------------------------------------------------------
# python -m tests.support.postgres
# --------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.postgres",
        description=("Start a PostgreSQL server on 127.0.0.1, print one JSON line with its "
                     "addresses and credentials, and run until SIGINT/SIGTERM."))
    parser.add_argument("--no-fsync", action="store_true", help="run with fsync = off")
    parser.add_argument("--password", default=None,
                        help="the test role's password (default: random)")
    args = parser.parse_args(argv)
    with _sigterm_as_interrupt():
        server = PostgresServer(fsync=not args.no_fsync, password=args.password)
        try:
            server.start()
            print(json.dumps(server.connection_info()), flush=True)
            while server.is_running:
                time.sleep(1.0)  # the postmaster is not our child: nothing to wait() on
            print(f"PostgreSQL exited unexpectedly\n{server.log_tail(30)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        except PostgresServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            server.close()


if __name__ == "__main__":
    sys.exit(main())
