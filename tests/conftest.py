"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from tests.deploy_helpers import Proc


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
