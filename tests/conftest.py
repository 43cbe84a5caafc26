from __future__ import annotations

import os
from collections.abc import Generator

import pytest
from hypothesis import settings

from tests.support import relay_process

pytest_plugins = ["tests.support.kafka_fixtures", "tests.support.postgres_fixtures"]

# CI explores the same examples every run (a failure there must be reproducible);
# elsewhere every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None]:
    # A relay that exited early or stalled says why only in its log file, which a
    # failure report does not show by itself: a failed test shows every relay it ran.
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for relay in relay_process.started:
            report.sections.append(("relay log", relay.describe()))
    if report.when == "teardown":  # a module's relay, still running, stays listed
        relay_process.started[:] = [r for r in relay_process.started if r.running()]
