"""``balloon_dev.transport.unixsock.listen_private``: the one way both transport servers and the
control socket create their listening sockets (mode 0600, a stale socket replaced, nothing else
ever replaced, one exception type per cause)."""
from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from balloon_dev.transport.unixsock import listen_private, unlink_quietly


def test_created_mode_0600_even_under_a_permissive_umask_and_accepts() -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s"
        old = os.umask(0)
        try:
            s = listen_private(p, 1)
        finally:
            os.umask(old)
        try:
            st = p.lstat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(p))  # it is listening
            conn, _ = s.accept()
            conn.close()
            c.close()
        finally:
            s.close()


def test_stale_socket_is_replaced() -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(p))
        stale.close()
        s = listen_private(p, 1)
        try:
            assert stat.S_ISSOCK(p.lstat().st_mode)
            # connectable: the stale file refused connections (ECONNREFUSED), the new one listens
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(p))
            c.close()
        finally:
            s.close()


@pytest.mark.parametrize("kind", ["regular file", "folder", "symlink to a socket"])
def test_anything_but_a_socket_is_left_alone(kind: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s"
        if kind == "regular file":
            p.write_text("keep me")
        elif kind == "folder":
            p.mkdir()
        else:
            target = Path(d) / "real.sock"
            real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            real.bind(str(target))
            real.close()
            p.symlink_to(target)
        before = p.lstat()
        with pytest.raises(FileExistsError, match="not a socket") as ei:
            listen_private(p, 1)
        assert ei.value.errno == errno.EEXIST and str(p) in str(ei.value)
        after = p.lstat()
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        if kind == "regular file":
            assert p.read_text() == "keep me"


def test_missing_folder_is_named() -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "missing"
        with pytest.raises(FileNotFoundError, match="does not exist") as ei:
            listen_private(folder / "s", 1)
        assert str(folder) in str(ei.value)


def test_unlink_quietly_tolerates_a_missing_file() -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s"
        s = listen_private(p, 1)
        s.close()
        unlink_quietly(p)
        assert not p.exists()
        unlink_quietly(p)  # already gone: no error
