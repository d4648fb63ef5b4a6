"""``balloon-hint ctl`` against a peer that is not a control socket: a clear error, exit 1."""
from __future__ import annotations

import os
import socket
import tempfile
import threading

import pytest

from vmsim.cli import main


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
])
def test_peer_that_is_not_a_control_socket(lines: list[bytes],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ctl")
        t = _serve_once(path, lines)
        assert main(["ctl", path, "stats", "--timeout", "5"]) == 1
        t.join(5)
    err = capsys.readouterr().err
    assert err.startswith(f"ctl: {path}: ")
