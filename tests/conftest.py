from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.kafka_fixtures"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
