from __future__ import annotations

import os

import pytest
from hypothesis import settings

pytest_plugins = ["tests.support.kafka_fixtures", "tests.support.postgres_fixtures"]

# CI explores the same examples every run (a failure there must be reproducible);
# elsewhere every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
