"""Fixtures for checking an external device: the target, a connected client, guests.

``balloon-hint conformance --target vfio-user:PATH [--target-control CTL]`` puts the target in
the environment (``harness.TARGET_ENV``, ``harness.TARGET_CONTROL_ENV``). Without it (plain
pytest, CI) the target is our own device: ``balloon-hint serve`` started in a subprocess on a
socket in a temporary folder, offering every feature it has (REPORTING included) so that every
check runs; then everything observable must pass.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.conformance_target.harness import (
    ALL_FEATURES,
    Client,
    DriverGuest,
    RawGuest,
    Target,
    connect,
    env_target,
    start_server,
    stop_server,
)


@pytest.fixture(scope="session")
def target() -> Iterator[Target]:
    t = env_target()
    if t is not None:
        yield t
        return
    with tempfile.TemporaryDirectory(prefix="bh-target-") as tmp:
        sock, ctl = os.path.join(tmp, "balloon.sock"), os.path.join(tmp, "balloon.ctl")
        proc = start_server([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock,
                             "--control", ctl, "--features", ALL_FEATURES], sock, ctl)
        try:
            yield Target("vfio-user", sock, ctl)
        finally:
            stop_server(proc)


@pytest.fixture
def client(target: Target) -> Iterator[Client]:
    c = connect(target)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def raw(client: Client) -> RawGuest:
    return RawGuest(client)


@pytest.fixture
def guest(client: Client) -> DriverGuest:
    return DriverGuest(client)


@pytest.fixture
def host(target: Target) -> Iterator[Target]:
    """The target, for checks that need host requests; skipped without a control socket. The
    balloon target goes back to 0 afterwards so the next check starts from a still balloon."""
    target.require_host()
    yield target
    target.host("set-target", pages=0)
