"""``balloon-hint ctl`` against a peer that is not a control socket: a clear error, exit 1."""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

import pytest

from protocol.errors import EnvironmentFailure
from vmsim.cli import main
from vmsim.cmd_ctl import ControlSocketError, call


def _serve_once(path: str, lines: list[bytes]) -> threading.Thread:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)

    def peer() -> None:
        with lsock, lsock.accept()[0] as c:
            for line in lines:
                c.sendall(line)
                c.recv(4096)  # the command, then the next line

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("lines", [
    [b"42\n"],                                        # welcome is not an object
    [b'{"QMP": {}}\n', b"[1, 2]\n"],                  # answer is not an object
    [b'{"hello": 1}\n'],                              # not a QMP-style welcome
    [b'{"QMP": {}}\n'],                               # closes without an answer
])
def test_peer_that_is_not_a_control_socket(lines: list[bytes],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ctl")
        t = _serve_once(path, lines)
        assert main(["ctl", path, "stats", "--timeout", "5"]) == 1
        t.join(5)
        # the same peer through the API: an environment failure, not a bare RuntimeError
        os.unlink(path)
        t = _serve_once(path, lines)
        with pytest.raises(ControlSocketError, match=f"^{path}: ") as e:
            call(path, "stats", timeout=5)
        assert isinstance(e.value, EnvironmentFailure)
        t.join(5)
    err = capsys.readouterr().err
    assert err.startswith(f"ctl: {path}: ") and err.count("\n") == 1


def test_ctl_waits_while_the_accept_queue_is_full() -> None:
    """A busy server whose accept queue is full: ``ctl`` keeps trying until its timeout
    instead of failing at once with EAGAIN (issue 15 item 2)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ctl")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(0)
        fillers = []
        while True:  # fill the queue until a non-blocking connect is refused with EAGAIN
            f = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            f.setblocking(False)
            try:
                f.connect(path)
            except BlockingIOError:
                f.close()
                break
            fillers.append(f)
            assert len(fillers) < 100

        def server() -> None:
            time.sleep(0.5)  # busy for a while, then drain the queue and answer
            for _ in range(len(fillers)):
                lsock.accept()[0].close()
            with lsock.accept()[0] as c:
                c.sendall(b'{"QMP": {}}\n')
                c.recv(4096)
                c.sendall(b'{"return": {}}\n')

        t = threading.Thread(target=server, daemon=True)
        t.start()
        t0 = time.monotonic()
        assert call(path, "stats", timeout=10) == {"return": {}}
        assert time.monotonic() - t0 >= 0.4
        t.join(5)
        for f in fillers:
            f.close()
        lsock.close()
