"""``balloon-hint serve`` usage errors: a bad option value or a socket path that cannot be
created ends with one line naming it and a non-zero status, not a traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from vmsim.cli import main
from vmsim.cmd_ctl import call


def test_bad_msix_vector_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        assert main(["serve", "--vfio-user", os.path.join(d, "s"), "--msix-vectors", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balloon-hint serve: ") and "msix_vectors=0" in err


@pytest.mark.parametrize("transport", ["--vfio-user", "--vhost-user"])
@pytest.mark.parametrize("where", ["missing folder", "file in the way"])
def test_socket_path_that_cannot_be_created(transport: str, where: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "no", "such", "dir", "s")
        if where == "file in the way":
            path = os.path.join(d, "f")
            open(path, "w").close()
        assert main(["serve", transport, path]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"serve: cannot serve on {path} ") and "Traceback" not in err
    # One exception type per cause, whichever transport (balloon_dev.transport.unixsock).
    expected = "FileExistsError" if where == "file in the way" else "FileNotFoundError"
    assert f"{expected}: " in err


# -- usage errors in the socket paths (issue 15 item 3) ------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--vhost-user", ""],
    ["--vfio-user", "S", "--control", "S"],
    ["--vhost-user", "S", "--control", "./S"],
])
def test_bad_socket_paths_are_usage_errors(argv: list[str]) -> None:
    # A child process: without the check, serve would run (or fail) instead of refusing.
    with tempfile.TemporaryDirectory() as d:
        argv = [os.path.join(d, a) if a in ("S", "./S") else a for a in argv]
        done = subprocess.run([sys.executable, "-m", "vmsim", "serve", *argv], cwd=d,
                              capture_output=True, timeout=30)
        assert os.listdir(d) == []  # nothing was created
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.startswith("balloon-hint serve: --") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# -- signals and a second serve (issue 13 items 6 and 7), each in a child process ------------------
def _serve(d: str, transport: str, name: str = "s") -> tuple[subprocess.Popen[bytes], str, str]:
    sock, ctl = os.path.join(d, name), os.path.join(d, name + ".ctl")
    proc = subprocess.Popen([sys.executable, "-m", "vmsim", "serve", transport, sock],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (os.path.exists(sock) and os.path.exists(ctl)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "serve did not create its sockets"
        time.sleep(0.05)
    assert "return" in call(ctl, "stats", timeout=10)  # serving
    return proc, sock, ctl


@pytest.mark.parametrize("transport", ["--vfio-user", "--vhost-user"])
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_stop_signal_exits_with_one_line_and_removes_the_sockets(
        transport: str, sig: signal.Signals, status: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        proc, sock, ctl = _serve(d, transport)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == status, err
        assert err.decode().strip().splitlines() == [f"balloon-hint serve: stopped by {sig.name}"]
        assert not os.path.exists(sock) and not os.path.exists(ctl)


def test_second_serve_on_a_live_socket_is_refused() -> None:
    with tempfile.TemporaryDirectory() as d:
        first, sock, ctl = _serve(d, "--vfio-user")
        try:
            second = subprocess.run([sys.executable, "-m", "vmsim", "serve", "--vfio-user", sock,
                                     "--control", os.path.join(d, "other.ctl")],
                                    capture_output=True, timeout=30)
            err = second.stderr.decode()
            assert second.returncode == 1, err
            assert "a server is listening there already" in err and "Traceback" not in err
            assert "return" in call(ctl, "stats", timeout=10)  # the first still serves
            assert os.path.exists(sock)
        finally:
            first.terminate()
            first.communicate(timeout=20)
