"""Fixtures for checking a device: the target, a connected client, guests.

``pytest --balloon-target vfio-user:PATH [--balloon-control CTL]`` (the plugin,
vmsim/conformance/plugin.py; ``balloon-hint conformance --target`` passes the same options)
names the target. Without it (the repository's own test run) the target is our own device:
``balloon-hint serve`` started in a subprocess on a socket in a temporary folder, offering every
feature it has (REPORTING included) so that every check runs; then everything observable must
pass.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator

import pytest

from vmsim.conformance import harness
from vmsim.conformance.harness import (
    ALL_FEATURES,
    Client,
    DriverGuest,
    RawGuest,
    Target,
    connect,
    start_server,
    stop_server,
)
from vmsim.conformance.plugin import configured_target


@pytest.fixture(autouse=True)
def _current_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Lets ``harness.note`` attach notes to the running check's report."""
    harness._current_item = request.node
    yield
    harness._current_item = None


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    given = configured_target(request.config)
    if given is not None:
        yield Target(*given)
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
