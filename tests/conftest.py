"""Fixtures shared by the worker and end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# No per-example deadline and no speed health check: tests assert behaviour, never timing, and
# this machine's 2 cores are often shared (a deadline there only makes tests flaky).
settings.register_profile("exo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("exo")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight llama (see tests/support/tiny_model.py), built once per test session."""
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
