"""A real single-node KRaft Apache Kafka broker for tests and benchmarks.

The broker is assembled from Maven artifacts (``tests/support/kafka/pom.xml``)
and run with ``java`` directly: no Docker, no Kafka distribution tarball.

* :func:`ensure_kafka_jars` resolves the broker's runtime jars once into a
  cache directory (``$RELAY_KAFKA_CACHE/<version>/lib``, by default
  ``~/.cache/im-relay/kafka/<version>/lib``).  Resolution goes into a temporary
  sibling directory that is renamed into place only when complete, so a killed
  run never leaves a half-filled cache.
* :class:`KafkaBroker` runs one broker+controller process on free loopback
  ports with three listeners: ``PLAINTEXT`` (also inter-broker),
  ``SASL_PLAINTEXT`` (SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN) and
  ``CONTROLLER``.

``python -m tests.support.kafka_broker`` starts a broker, prints one JSON line
with the connection details and runs until SIGINT/SIGTERM.

Environment variables:

``RELAY_TEST_KAFKA_VERSION``
    Kafka release to run (default :data:`DEFAULT_KAFKA_VERSION`).
``RELAY_TEST_LOG4J_VERSION``
    log4j2 release for the SLF4J 1.7 binding; only needed for a Kafka release
    missing from :data:`LOG4J_FOR_KAFKA`.
``RELAY_KAFKA_CACHE``
    Root of the jar cache (default ``~/.cache/im-relay/kafka``).
``JAVA_HOME``
    Used to find ``java`` (else ``java`` on ``PATH``); Java 17+ is required.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import fcntl
import functools
import json
import os
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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, Self, TypeVar

from aiokafka.admin import (  # type: ignore[import-untyped,unused-ignore]
    AIOKafkaAdminClient,
    NewTopic,
)
from aiokafka.errors import (  # type: ignore[import-untyped,unused-ignore]
    for_code,
)

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "LOG4J_FOR_KAFKA",
    "SASL_MECHANISMS",
    "KafkaBroker",
    "KafkaBrokerError",
    "KafkaToolMissingError",
    "ensure_kafka_jars",
    "kafka_jar_cache_dir",
    "resolve_kafka_version",
]

DEFAULT_KAFKA_VERSION: Final = "4.4.0"
KAFKA_VERSION_ENV: Final = "RELAY_TEST_KAFKA_VERSION"
LOG4J_VERSION_ENV: Final = "RELAY_TEST_LOG4J_VERSION"
CACHE_ENV: Final = "RELAY_KAFKA_CACHE"

#: The log4j2 release each Kafka release depends on (keys are exact versions
#: or ``major.minor`` prefixes).  Kafka's POM brings log4j-api/-core but no
#: SLF4J binding; the binding must be ``log4j-slf4j-impl`` (SLF4J 1.7) at the
#: same version.  Unknown releases fall back to the pom's default.
LOG4J_FOR_KAFKA: Final[Mapping[str, str]] = {
    "4.4.0": "2.25.5",
    "4.3": "2.25.4",
    "4.2": "2.25.4",
    "4.1.1": "2.24.3",
}

#: SASL mechanisms enabled on the ``SASL_PLAINTEXT`` listener.
SASL_MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")

POM_PATH: Final = Path(__file__).resolve().parent / "kafka" / "pom.xml"

_VERSION_RE: Final = re.compile(r"[0-9][0-9A-Za-z._-]*")
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;]*m")
_MANIFEST: Final = ".complete.json"
_SERVER_LOG_NAME: Final = "server"
_MVN_TIMEOUT_S: Final = 1800.0
_FORMAT_TIMEOUT_S: Final = 180.0
_TOPIC_ALREADY_EXISTS: Final = 36

T = TypeVar("T")


class KafkaBrokerError(RuntimeError):
    """The broker could not be prepared, started, stopped or used."""


class KafkaToolMissingError(KafkaBrokerError):
    """``java`` or ``mvn`` is not installed / not on ``PATH``."""


# --------------------------------------------------------------------------
# Jar resolution
# --------------------------------------------------------------------------


def resolve_kafka_version(version: str | None = None) -> str:
    """*version*, else ``$RELAY_TEST_KAFKA_VERSION``, else the default."""
    resolved = version or os.environ.get(KAFKA_VERSION_ENV) or DEFAULT_KAFKA_VERSION
    if not _VERSION_RE.fullmatch(resolved):
        raise ValueError(f"not a Kafka version: {resolved!r}")
    return resolved


def log4j_version_for(kafka_version: str) -> str | None:
    """The log4j2 release to pair with *kafka_version* (None: pom default)."""
    override = os.environ.get(LOG4J_VERSION_ENV)
    if override:
        return override
    if kafka_version in LOG4J_FOR_KAFKA:
        return LOG4J_FOR_KAFKA[kafka_version]
    minor = ".".join(kafka_version.split(".")[:2])
    return LOG4J_FOR_KAFKA.get(minor)


def kafka_jar_cache_dir(version: str | None = None) -> Path:
    """Where :func:`ensure_kafka_jars` keeps the jars of *version*."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "im-relay" / "kafka"
    return base / resolve_kafka_version(version) / "lib"


def find_java() -> str:
    """Path of the ``java`` launcher (``$JAVA_HOME/bin/java`` or ``PATH``)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise KafkaToolMissingError(
            "`java` not found (neither $JAVA_HOME/bin/java nor on PATH); "
            "the Kafka test broker needs a Java 17+ runtime (e.g. openjdk-17-jre-headless)"
        )
    return found


def find_mvn() -> str:
    """Path of the ``mvn`` launcher on ``PATH``."""
    found = shutil.which("mvn")
    if found is None:
        raise KafkaToolMissingError(
            "`mvn` not found on PATH; Apache Maven 3.8+ is needed once to resolve "
            "the Kafka broker jars (e.g. apt-get install maven)"
        )
    return found


def _cache_complete(lib: Path) -> bool:
    try:
        manifest = json.loads((lib / _MANIFEST).read_text(encoding="utf-8"))
        jars: dict[str, int] = manifest["jars"]
        return bool(jars) and all(
            (lib / name).stat().st_size == size for name, size in jars.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _tail_text(text: str, n: int) -> str:
    return "\n".join(_ANSI_RE.sub("", text).splitlines()[-n:])


def ensure_kafka_jars(version: str | None = None) -> Path:
    """Resolve the broker jars of *version* once; return the ``lib`` directory.

    Skips Maven entirely when the cache is complete.  Concurrent callers are
    serialised with a lock file; resolution goes into a temporary directory
    that is renamed into place only after it is complete.
    """
    version = resolve_kafka_version(version)
    lib = kafka_jar_cache_dir(version)
    if _cache_complete(lib):
        return lib
    java = find_java()
    mvn = find_mvn()
    if not POM_PATH.is_file():
        raise KafkaBrokerError(f"missing {POM_PATH}")
    version_dir = lib.parent
    version_dir.mkdir(parents=True, exist_ok=True)
    with open(version_dir / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _cache_complete(lib):  # another process finished meanwhile
                return lib
            # Leftovers of killed runs (we hold the lock, so none is in use).
            for stale in version_dir.glob("lib.partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            partial = Path(tempfile.mkdtemp(prefix="lib.partial-", dir=version_dir))
            try:
                _run_mvn(mvn, java, version, partial)
                partial.chmod(0o755)  # mkdtemp made it 0700
                if lib.exists():  # incomplete copy from elsewhere: replace it
                    shutil.rmtree(lib)
                os.rename(partial, lib)
            finally:
                if partial.exists():
                    shutil.rmtree(partial, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lib


def _run_mvn(mvn: str, java: str, version: str, out_dir: Path) -> None:
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(POM_PATH),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={out_dir}",
        f"-Dkafka.version={version}",
    ]
    log4j = log4j_version_for(version)
    if log4j:
        cmd.append(f"-Dlog4j.version={log4j}")
    env = dict(os.environ)
    env.setdefault("JAVA_HOME", str(Path(java).resolve().parent.parent))
    try:
        proc = subprocess.run(
            cmd,
            cwd=out_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=_MVN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaBrokerError(
            f"mvn did not finish within {_MVN_TIMEOUT_S:.0f}s: {' '.join(cmd)}"
        ) from exc
    if proc.returncode != 0:
        raise KafkaBrokerError(
            f"resolving Kafka {version} jars with Maven failed (exit {proc.returncode}): "
            f"{' '.join(cmd)}\n{_tail_text(proc.stdout, 40)}"
        )
    jars = {p.name: p.stat().st_size for p in out_dir.glob("*.jar")}
    for required in (f"kafka_2.13-{version}.jar", f"kafka-clients-{version}.jar"):
        if required not in jars:
            raise KafkaBrokerError(f"Maven resolved no {required} into {out_dir}")
    if not any(name.startswith("log4j-slf4j-impl-") for name in jars):
        raise KafkaBrokerError(
            "Maven resolved no log4j-slf4j-impl binding: the broker would not log"
        )
    manifest = {"kafka_version": version, "log4j_version": log4j, "jars": jars}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    (out_dir / _MANIFEST).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """*count* distinct currently free TCP ports on 127.0.0.1."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private event loop in a helper
    thread, so this works whether or not the caller already runs a loop."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-harness") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _read_tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
    except FileNotFoundError:
        return []


def _cluster_id() -> str:
    """A Kafka ``Uuid`` in its base64 form (what ``StorageTool random-uuid`` prints)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):
            return text


async def _probe_metadata(bootstrap: str, within: float) -> int:
    """Fetch cluster metadata with aiokafka; return the number of brokers."""
    async with asyncio.timeout(within):
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="im-relay-kafka-harness",
            request_timeout_ms=max(1000, int(within * 1000)),
        )
        try:
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
        finally:
            await admin.close()
    brokers = list(cluster.get("brokers") or [])
    if not brokers:
        raise KafkaBrokerError("metadata response lists no brokers yet")
    return len(brokers)


_LIVE: set[KafkaBroker] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_live_brokers() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for broker in brokers:
        with contextlib.suppress(Exception):
            broker.stop(timeout=10.0)
            broker.close()


# --------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------


class KafkaBroker:
    """One real KRaft Kafka process (broker + controller) on 127.0.0.1.

    Ports are picked on the first :meth:`start` and kept for the life of the
    object, so :meth:`stop` / :meth:`kill` followed by :meth:`start` (or
    :meth:`restart`) brings the same broker back on the same addresses with
    its data.  Use as a context manager, or call :meth:`close` (which stops the
    broker and removes a work directory that it created itself).
    """

    def __init__(
        self,
        *,
        version: str | None = None,
        num_partitions: int = 3,
        work_dir: str | os.PathLike[str] | None = None,
        sasl_username: str = "relay",
        sasl_password: str | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        heap_options: Sequence[str] = ("-Xms128m", "-Xmx512m"),
        extra_properties: Mapping[str, str] | None = None,
        keep_work_dir: bool = False,
    ) -> None:
        if num_partitions < 1:
            raise ValueError("num_partitions must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", sasl_username):
            raise ValueError("sasl_username must match [A-Za-z0-9_.-]+")
        password = sasl_password if sasl_password is not None else secrets.token_hex(12)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", password):
            raise ValueError(
                "sasl_password must match [A-Za-z0-9_.-]+ (it is embedded in JAAS and SCRAM specs)"
            )
        self.version: Final = resolve_kafka_version(version)
        self.num_partitions: Final = num_partitions
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._heap_options = list(heap_options)
        self._extra_properties = dict(extra_properties or {})
        self._sasl_username = sasl_username
        self._sasl_password = password
        self._owns_work_dir = work_dir is None and not keep_work_dir
        if work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="im-relay-kafka-"))
        else:
            self.work_dir = Path(work_dir).resolve()
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir: Final = self.work_dir / "data"
        self.logs_dir: Final = self.work_dir / "logs"
        self.properties_file: Final = self.work_dir / "server.properties"
        self.log4j_file: Final = self.work_dir / "log4j2.xml"
        self._lib: Path | None = None
        self._java: str | None = None
        self._cluster_id = _cluster_id()
        self._ports: tuple[int, int, int] | None = None  # plaintext, sasl, controller
        self._formatted = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._closed = False
        #: Seconds spent in :func:`ensure_kafka_jars` by the first start.
        self.jar_resolution_seconds: float | None = None
        #: Seconds the last :meth:`start` took, excluding jar resolution
        #: (includes formatting the storage on the first start).
        self.startup_seconds: float | None = None
        #: Seconds spent formatting the storage (first start only).
        self.format_seconds: float | None = None
        #: Whether the last :meth:`stop` had to fall back to SIGKILL.
        self.last_stop_forced: bool | None = None

    # -- addresses and credentials ------------------------------------------

    def _port(self, index: int) -> int:
        if self._ports is None:
            raise KafkaBrokerError("the broker has not been started yet: no ports assigned")
        return self._ports[index]

    @property
    def port(self) -> int:
        """The PLAINTEXT listener port."""
        return self._port(0)

    @property
    def sasl_port(self) -> int:
        """The SASL_PLAINTEXT listener port."""
        return self._port(1)

    @property
    def controller_port(self) -> int:
        return self._port(2)

    @property
    def bootstrap(self) -> str:
        """``bootstrap_servers`` for the PLAINTEXT listener."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """``bootstrap_servers`` for the SASL_PLAINTEXT listener."""
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def sasl_username(self) -> str:
        return self._sasl_username

    @property
    def sasl_password(self) -> str:
        return self._sasl_password

    @property
    def sasl_mechanisms(self) -> tuple[str, ...]:
        return SASL_MECHANISMS

    @property
    def log_file(self) -> Path:
        """The broker's log4j log."""
        return self.logs_dir / f"{_SERVER_LOG_NAME}.log"

    @property
    def stdout_file(self) -> Path:
        """The JVM's stdout/stderr (JVM crashes end up here, not in the log)."""
        return self.logs_dir / "kafka.out"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def connection_info(self) -> dict[str, Any]:
        """Everything a client (or a benchmark) needs, JSON-serialisable."""
        return {
            "kafka_version": self.version,
            "bootstrap": self.bootstrap,
            "sasl_bootstrap": self.sasl_bootstrap,
            "sasl_security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanisms": list(SASL_MECHANISMS),
            "sasl_username": self.sasl_username,
            "sasl_password": self.sasl_password,
            "startup_seconds": self.startup_seconds,
            "jar_resolution_seconds": self.jar_resolution_seconds,
            "pid": self.pid,
            "work_dir": str(self.work_dir),
            "log_file": str(self.log_file),
        }

    # -- diagnostics ---------------------------------------------------------

    def log_tail(self, n: int = 50) -> str:
        """The last *n* lines of the broker log."""
        return "\n".join(_read_tail(self.log_file, n))

    def _diagnostics(self, n: int = 40) -> str:
        parts: list[str] = []
        for title, path in (("broker log", self.log_file), ("JVM output", self.stdout_file)):
            lines = _read_tail(path, n)
            if lines:
                header = f"--- last {len(lines)} lines of {title} {path} ---"
                parts.append(header + "\n" + "\n".join(lines))
        return "\n" + "\n".join(parts) if parts else f"\n(no broker output in {self.logs_dir})"

    def _error(self, message: str) -> KafkaBrokerError:
        return KafkaBrokerError(
            f"Kafka {self.version} broker in {self.work_dir}: {message}{self._diagnostics()}"
        )

    # -- configuration -------------------------------------------------------

    def _server_properties(self) -> dict[str, str]:
        plain, sasl, controller = self._port(0), self._port(1), self._port(2)
        user, password = self._sasl_username, self._sasl_password
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{plain},SASL_PLAINTEXT://127.0.0.1:{sasl},CONTROLLER://127.0.0.1:{controller}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{plain},SASL_PLAINTEXT://127.0.0.1:{sasl}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            # SCRAM credentials live in the cluster metadata (added at format
            # time); the login module needs no options on the server side.
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{user}" password="{password}" user_{user}="{password}";'
            ),
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": "true",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # 50 partitions by default: slow to create on a 2-core machine.
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": "16777216",
            "num.recovery.threads.per.data.dir": "1",
            # After a SIGKILL the restarted broker can only re-register once the
            # old incarnation's session expired (default 9 s): shorten it.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4500",
        }
        props.update(self._extra_properties)
        return props

    def _write_config(self) -> None:
        lines = ["# Written by tests/support/kafka_broker.py (single-node KRaft test broker)"]
        for key, value in self._server_properties().items():
            escaped = value.replace("\\", "\\\\")
            lines.append(f"{key}={escaped}")
        self.properties_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.log4j_file.write_text(_LOG4J2_XML, encoding="utf-8")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    def _jvm_args(self, *, log_name: str, heap: Sequence[str]) -> list[str]:
        return [
            *heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Drelay.kafka.log.name={log_name}",
        ]

    def _classpath(self) -> str:
        assert self._lib is not None
        return str(self._lib / "*")

    def _format(self) -> None:
        assert self._java is not None
        user, password = self._sasl_username, self._sasl_password
        cmd = [
            self._java,
            *self._jvm_args(log_name="storage-tool", heap=("-Xmx256m", "-XX:TieredStopAtLevel=1")),
            "-cp",
            self._classpath(),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self._cluster_id,
            "-c",
            str(self.properties_file),
            "--add-scram",
            f"SCRAM-SHA-256=[name={user},password={password}]",
            "--add-scram",
            f"SCRAM-SHA-512=[name={user},password={password}]",
        ]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=_FORMAT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise self._error(
                f"StorageTool format did not finish within {_FORMAT_TIMEOUT_S:.0f}s"
            ) from exc
        if proc.returncode != 0:
            output = _tail_text(proc.stdout, 40)
            raise self._error(f"StorageTool format failed (exit {proc.returncode}):\n{output}")
        self.format_seconds = time.monotonic() - started
        self._formatted = True

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the broker and wait until clients can use it.

        Formats the storage on the first start (with the SCRAM users); later
        starts reuse the ports and the data.  Raises :class:`KafkaBrokerError`
        (with the last broker log lines) if it does not become ready within
        ``startup_timeout`` seconds.
        """
        if self._closed:
            raise KafkaBrokerError("this KafkaBroker has been closed")
        if self.is_running:
            raise KafkaBrokerError(f"already running (pid {self.pid})")
        self._reap()
        if self._lib is None:
            self._java = find_java()
            started = time.monotonic()
            self._lib = ensure_kafka_jars(self.version)
            self.jar_resolution_seconds = time.monotonic() - started
        started = time.monotonic()
        # A port picked as free may be taken by someone else before the JVM
        # binds it: on a first start, retry with new ports a couple of times.
        attempts = 1 if self._formatted else 3
        for attempt in range(1, attempts + 1):
            if not self._formatted:
                plain, sasl, controller = _free_ports(3)
                self._ports = (plain, sasl, controller)
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self._write_config()
                self._format()
            try:
                self._launch_and_wait(started + self.startup_timeout)
                break
            except _PortInUseError as exc:
                if attempt == attempts or attempts == 1:
                    raise self._error(f"could not bind its ports: {exc}") from None
                self._formatted = False
        self.startup_seconds = time.monotonic() - started

    def _launch_and_wait(self, deadline: float) -> None:
        assert self._java is not None
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self._java,
            *self._jvm_args(log_name=_SERVER_LOG_NAME, heap=self._heap_options),
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.properties_file),
        ]
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._stdout = open(self.stdout_file, "ab")  # noqa: SIM115 - closed in _reap()
        try:
            # Own session: a Ctrl-C in the terminal reaches only the Python
            # process, which then stops the broker in an orderly way.
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=self._stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._reap()
            raise self._error(f"could not launch java: {exc}") from exc
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(deadline, log_offset)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        last_problem = "PLAINTEXT port not accepting connections yet"
        while True:
            code = proc.poll()
            if code is not None:
                new_log = self._log_since(log_offset)
                if "Address already in use" in new_log:
                    raise _PortInUseError(f"exit code {code}")
                raise self._error(f"the broker process exited with code {code} during start-up")
            if _port_accepts(self.port) and _port_accepts(self.sasl_port):
                probe = functools.partial(
                    _probe_metadata,
                    self.bootstrap,
                    max(1.0, min(10.0, deadline - time.monotonic())),
                )
                try:
                    _run_async(probe)
                    return
                except Exception as exc:  # reported if the deadline passes
                    last_problem = f"metadata probe failed: {type(exc).__name__}: {exc}"
            elif _port_accepts(self.port):
                last_problem = "SASL_PLAINTEXT port not accepting connections yet"
            if time.monotonic() >= deadline:
                raise self._error(f"not ready within {self.startup_timeout:.0f}s ({last_problem})")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # poll interval; returns early if it dies

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _reap(self) -> None:
        """Forget a finished process and close its output file."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._stdout is not None:
                self._stdout.close()
                self._stdout = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the broker process to exit; its exit code, or None on timeout
        (or if no process was started)."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (orderly shutdown), then SIGKILL after *timeout* seconds
        (default ``stop_timeout``).

        Returns the exit code (None if no process was started).  The JVM
        exits with 143 (128 + SIGTERM) after an orderly shutdown;
        :attr:`last_stop_forced` tells whether SIGKILL was needed.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.last_stop_forced = False
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.last_stop_forced = True
                proc.kill()
                proc.wait()
        code = proc.returncode
        self._reap()
        return code

    def kill(self) -> int | None:
        """SIGKILL the broker (a crash); :meth:`start` recovers it later."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        code = proc.returncode
        self._reap()
        return code

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and delete the work directory if this object made it."""
        try:
            self.stop()
        finally:
            self._closed = True
            if self._owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.bootstrap if self._ports is not None else "not started"
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<KafkaBroker {self.version} {where} {state}>"

    # -- topics --------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int | None = None,
        *,
        replication_factor: int = 1,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> str:
        """Create *name* (default ``num_partitions`` partitions) and wait until
        every partition has a leader.  Blocking; from async code use
        :meth:`acreate_topic`."""
        return _run_async(
            functools.partial(
                self.acreate_topic,
                name,
                partitions,
                replication_factor=replication_factor,
                exist_ok=exist_ok,
                timeout=timeout,
            )
        )

    async def acreate_topic(
        self,
        name: str,
        partitions: int | None = None,
        *,
        replication_factor: int = 1,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> str:
        """Async :meth:`create_topic` (aiokafka admin client)."""
        count = partitions or self.num_partitions
        try:
            async with asyncio.timeout(timeout):
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.bootstrap, client_id="im-relay-kafka-harness"
                )
                try:
                    await admin.start()
                    topic = NewTopic(
                        name=name, num_partitions=count, replication_factor=replication_factor
                    )
                    response = await admin.create_topics([topic], timeout_ms=int(timeout * 1000))
                    for entry in response.topic_errors:
                        code = int(entry[1])
                        if code == 0 or (code == _TOPIC_ALREADY_EXISTS and exist_ok):
                            continue
                        message = entry[2] if len(entry) > 2 else None
                        error = for_code(code).__name__
                        raise KafkaBrokerError(
                            f"creating topic {name!r} failed: {error} ({code}) {message or ''}"
                        )
                    await _wait_topic_ready(admin, name, count)
                finally:
                    await admin.close()
        except TimeoutError:
            raise KafkaBrokerError(f"topic {name!r} not ready within {timeout:.0f}s") from None
        return name


async def _wait_topic_ready(admin: Any, name: str, partitions: int) -> None:
    """Poll metadata until *name* has *partitions* partitions, all with a leader."""
    while True:
        topics: list[dict[str, Any]] = await admin.describe_topics([name])
        for topic in topics:
            parts = topic.get("partitions") or []
            if (
                topic.get("topic") == name
                and topic.get("error_code") == 0
                and len(parts) >= partitions
                and all(p.get("error_code") == 0 and p.get("leader", -1) >= 0 for p in parts)
            ):
                return
        await asyncio.sleep(0.05)  # poll interval (the caller holds the deadline)


class _PortInUseError(Exception):
    pass


_LOG4J2_XML: Final = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by tests/support/kafka_broker.py -->
<Configuration status="WARN" name="im-relay-kafka-test-broker">
  <Appenders>
    <File name="file" append="true"
          fileName="${sys:kafka.logs.dir}/${sys:relay.kafka.log.name:-server}.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="INFO">
      <AppenderRef ref="file"/>
    </Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
  </Loggers>
</Configuration>
"""


# --------------------------------------------------------------------------
# python -m tests.support.kafka_broker
# --------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.kafka_broker",
        description=(
            "Start a single-node KRaft Kafka broker on 127.0.0.1, print one JSON line with "
            "its addresses and credentials, and run until SIGINT/SIGTERM."
        ),
    )
    parser.add_argument(
        "--kafka-version",
        default=None,
        help=f"default: ${KAFKA_VERSION_ENV} or {DEFAULT_KAFKA_VERSION}",
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="num.partitions for auto-created topics"
    )
    parser.add_argument(
        "--work-dir", default=None, help="keep config, data and logs here (default: a temp dir)"
    )
    parser.add_argument("--sasl-password", default=None, help="default: random")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    parser.add_argument("--heap", default="-Xms128m -Xmx512m", help="JVM heap options")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    broker: KafkaBroker | None = None
    try:
        broker = KafkaBroker(
            version=args.kafka_version,
            num_partitions=args.partitions,
            work_dir=args.work_dir,
            sasl_password=args.sasl_password,
            startup_timeout=args.startup_timeout,
            heap_options=args.heap.split(),
        )
        broker.start()
        print(json.dumps(broker.connection_info()), flush=True)
        code = broker.wait()
        details = broker._diagnostics()
        print(f"Kafka broker exited unexpectedly (code {code}){details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except KafkaBrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if broker is not None:
            broker.close()


if __name__ == "__main__":
    sys.exit(main())
