"""Suite-wide settings: hypothesis profiles (``make fuzz`` raises the example count) and the
``fuzz`` marker, put on every hypothesis test here so ``make fuzz`` (``-m fuzz``) selects
each property test by what it is, not by what it happens to be called."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)


@pytest.fixture(scope="session", autouse=True)
def _finish_background_drops() -> Iterator[None]:
    """Throwaway PostgreSQL databases are dropped on a background thread
    (tests/server/conftest.py); the session ends only when all of them are gone."""
    yield
    server_conftest = sys.modules.get("tests.server.conftest")
    if server_conftest is not None:
        server_conftest.finish_pg_drops()
