"""``conformance.harness.start_server``: a device server that does not come up is an
environment failure naming what happened (the checks report it; no bare RuntimeError)."""
from __future__ import annotations

import sys
import time

import pytest

from protocol.errors import EnvironmentFailure
from vmsim.conformance.harness import ServerStartError, start_server


def test_a_server_that_exits_is_an_environment_failure(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('no such option', file=sys.stderr); "
            "sys.exit(3)"]
    with pytest.raises(ServerStartError, match="exited with 3: no such option") as e:
        start_server(argv, str(tmp_path / "s"), None, timeout=30)
    assert isinstance(e.value, EnvironmentFailure)


def test_a_server_that_makes_no_socket_is_an_environment_failure(tmp_path):
    sock = tmp_path / "s"
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=f"did not create {sock} within 0.5 s"):
        start_server(argv, str(sock), None, timeout=0.5)
    assert time.monotonic() - t0 < 30  # killed at the deadline, not waited for
