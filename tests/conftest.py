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


@pytest.fixture(scope="session")
def wire(tmp_path_factory):
    """The protocol modules generated from the .proto file alone (tests/wire_client.py)."""
    from tests.wire_client import PROTO, generate

    return generate(PROTO, tmp_path_factory.mktemp("wire"))
