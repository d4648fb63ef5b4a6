"""Fixtures for checking an external device: the target, a connected client, guests.

``balloon-hint conformance --target vfio-user:PATH [--target-control CTL]`` puts the target in
the environment (``harness.TARGET_ENV``, ``harness.TARGET_CONTROL_ENV``). Without it (plain
pytest, CI) the target is our own device: ``balloon-hint serve`` started in a subprocess on a
socket in a temporary folder, offering every feature it has (REPORTING included) so that every
check runs; then everything observable must pass.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance_target.harness import (DriverGuest, RawGuest, Target, connect,
                                              env_target)
from vmsim.vfio_user_client import VfioUserClient

REPO_ROOT = Path(__file__).resolve().parents[2]
ALL_FEATURES = "MUST_TELL_HOST,STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,REPORTING,RING_EVENT_IDX,RING_INDIRECT_DESC"


def start_server(argv: list[str], sock: str, ctl: str | None,
                 timeout: float = 20.0) -> subprocess.Popen[bytes]:
    """Start a device server ``argv`` and wait until its sockets exist."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not (os.path.exists(sock) and (ctl is None or os.path.exists(ctl))):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"device server exited with {proc.returncode}: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"device server did not create {sock} within {timeout} s")
        time.sleep(0.02)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


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
def client(target: Target) -> Iterator[VfioUserClient]:
    c = connect(target)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def raw(client: VfioUserClient) -> RawGuest:
    return RawGuest(client)


@pytest.fixture
def guest(client: VfioUserClient) -> DriverGuest:
    return DriverGuest(client)


@pytest.fixture
def host(target: Target) -> Iterator[Target]:
    """The target, for checks that need host requests; skipped without a control socket. The
    balloon target goes back to 0 afterwards so the next check starts from a still balloon."""
    target.require_host()
    yield target
    target.host("set-target", pages=0)
