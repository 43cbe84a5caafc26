"""pytest fixtures around :class:`tests.support.kafka_broker.KafkaBroker`.

Register in ``tests/conftest.py`` with::

    pytest_plugins = ["tests.support.kafka_fixtures"]

(a plugin module, so that the ``pytest_terminal_summary`` hook below that
reports the broker start-up time is registered as well as the fixtures).

* ``kafka_broker`` (session): one real broker for the whole session, stopped
  at the end.  If it cannot start, the requesting tests are skipped with the
  reason, or fail when ``CI=true``.
* ``kafka_topic`` (function): a fresh, uniquely named topic with 3 partitions.

The start-up time is recorded as junit-xml test-suite properties
(``kafka_broker_startup_seconds`` ...) and printed in the terminal summary
("kafka test broker" section).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from .kafka_broker import KafkaBroker

__all__ = ["kafka_broker", "kafka_topic", "pytest_terminal_summary"]

_SUMMARY_KEY = pytest.StashKey[list[str]]()


def _broker_unavailable(reason: str) -> None:
    """Fail under CI (``CI=true``), skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Kafka test broker unavailable (CI=true, so failing): {reason}", pytrace=False)
    pytest.skip(f"Kafka test broker unavailable: {reason}")


def _sigterm_as_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(scope="session")
def kafka_broker(
    request: pytest.FixtureRequest,
    record_testsuite_property: Callable[[str, object], None],
) -> Iterator[KafkaBroker]:
    """A real single-node KRaft Kafka broker on 127.0.0.1, shared by the session."""
    # A SIGTERM to pytest would otherwise end Python without any clean-up and
    # leave the JVM (in its own session) running: turn it into a
    # KeyboardInterrupt so the fixture teardown / atexit stop the broker.
    previous_sigterm: Any = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.getsignal(signal.SIGTERM)
        if previous_sigterm == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _sigterm_as_keyboard_interrupt)
        else:
            previous_sigterm = None
    broker = KafkaBroker(num_partitions=3)
    try:
        broker.start()
    except Exception as exc:  # KafkaBrokerError, missing aiokafka/java/mvn, OSError ...
        broker.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        _broker_unavailable(f"{type(exc).__name__}: {exc}")
    try:
        info = broker.connection_info()
        jar_seconds = broker.jar_resolution_seconds or 0.0
        startup_seconds = broker.startup_seconds or 0.0
        record_testsuite_property("kafka_version", broker.version)
        record_testsuite_property("kafka_broker_startup_seconds", f"{startup_seconds:.2f}")
        record_testsuite_property("kafka_jar_resolution_seconds", f"{jar_seconds:.2f}")
        request.config.stash.setdefault(_SUMMARY_KEY, []).append(
            f"Kafka {broker.version} at {info['bootstrap']} (SASL {info['sasl_bootstrap']}): "
            f"broker start-up {startup_seconds:.2f}s, jar resolution {jar_seconds:.2f}s "
            f"(log: {broker.log_file})"
        )
        yield broker
    finally:
        broker.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _topic_name(node_name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", node_name).strip("-.")[:80] or "topic"
    return f"test-{base}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def kafka_topic(kafka_broker: KafkaBroker, request: pytest.FixtureRequest) -> str:
    """A fresh unique topic (3 partitions, every partition with a leader).

    Not deleted afterwards: the session broker and its data are thrown away
    at the end of the session anyway.
    """
    name = _topic_name(request.node.name)
    kafka_broker.create_topic(name, partitions=3)
    return name


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Print the broker start-up time (visible with or without ``-s``)."""
    lines = config.stash.get(_SUMMARY_KEY, [])
    if lines:
        terminalreporter.write_sep("-", "kafka test broker")
        for line in lines:
            terminalreporter.write_line(line)
