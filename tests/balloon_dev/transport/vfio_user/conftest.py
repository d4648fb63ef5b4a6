"""Fixtures for the vfio-user tests: a session with the real device core behind it."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.balloon_dev.transport.vfio_user.client import Client


@pytest.fixture
def fresh() -> Iterator[Client]:
    """A session before VERSION."""
    c = Client()
    yield c
    c.close()


@pytest.fixture
def client(fresh: Client) -> Client:
    """A session after VERSION."""
    fresh.version()
    return fresh


@pytest.fixture
def ram(client: Client) -> Client:
    """VERSION done and 16 MiB of guest RAM mapped from a memfd at gpa 0."""
    client.map_ram()
    return client
