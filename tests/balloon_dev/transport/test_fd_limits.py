"""The server outlives clients that exhaust its file descriptors (issue 15 item 1).

Each test runs ``balloon-hint serve`` in a child process under a low RLIMIT_NOFILE and attacks
it from here the three ways a client can: many idle control connections, many connections to the
device socket while one client is served, and one vfio-user client mapping guest RAM fd after fd.
Afterwards the server must still answer ``ctl stats``, and say what it refused.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from protocol import vfio_user as vu
from vmsim.cmd_ctl import call

#: The child sets its fd limit, then runs the CLI.
_CHILD = ("import resource, sys; n = int(sys.argv[1]); "
          "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
          "from vmsim.cli import main; sys.exit(main(sys.argv[2:]))")


@contextmanager
def serve_limited(limit: int) -> Iterator[tuple[subprocess.Popen[bytes], str, str, Any]]:
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile() as log:
        sock, ctl = os.path.join(d, "s"), os.path.join(d, "s.ctl")
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(limit), "serve",
                                 "--vfio-user", sock], stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 20
            while not (os.path.exists(sock) and os.path.exists(ctl)):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            yield proc, sock, ctl, log
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def stderr_of(log: Any) -> str:
    log.seek(0)
    return str(log.read().decode(errors="replace"))


def still_serving(proc: subprocess.Popen[bytes], ctl: str) -> dict[str, Any]:
    assert proc.poll() is None, "serve ended"
    ans = call(ctl, "stats", timeout=20)
    assert "return" in ans, ans
    return dict(ans["return"])


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:  # the accept queue is full: the server is busy, not gone
        s.close()
        return None
    return s


def test_control_connection_flood_is_survived() -> None:
    """More idle control connections than the server has fds: accept() fails with EMFILE,
    and the server backs off instead of ending; once they leave it answers again."""
    with serve_limited(24) as (proc, _sock, ctl, log):
        held = [s for s in (_connect(ctl) for _ in range(60)) if s is not None]
        deadline = time.monotonic() + 20
        while "accept failed" not in stderr_of(log):
            assert time.monotonic() < deadline, stderr_of(log)
            time.sleep(0.05)
        assert proc.poll() is None
        for s in held:
            s.close()
        stats = still_serving(proc, ctl)
        assert stats["fds"]["peak"] <= stats["fds"]["limit"] == 24


def test_device_connection_flood_is_refused_at_once() -> None:
    """While one client is served, at most a few more wait; the rest are closed at once."""
    with serve_limited(64) as (proc, sock, ctl, log):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(sock)
        _request(client, 1, vu.Command.VERSION, vu.build_version(0, 0, {}))
        flood = [s for s in (_connect(sock) for _ in range(40)) if s is not None]
        t0 = time.monotonic()
        closed = 0
        for s in flood:
            s.settimeout(10)
            if s.recv(1) == b"":
                closed += 1
        assert closed == len(flood)
        stats = still_serving(proc, ctl)
        refused = stats["server_counters"].get("connections_refused_full", 0)
        busy = stats["server_counters"].get("connections_refused_busy", 0)
        assert refused >= len(flood) - 5 and refused + busy == len(flood), stats
        assert "refusing a connection: one peer is served" in stderr_of(log)
        assert time.monotonic() - t0 < 10
        for s in flood:
            s.close()
        client.close()


def test_dma_map_flood_is_refused_before_the_fds_run_out() -> None:
    """One client maps guest RAM fd after fd (every mapping costs the server an fd): the
    server refuses with ENOSPC while fds remain for the control socket."""
    with serve_limited(128) as (proc, sock, ctl, _log):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(sock)
        _request(client, 1, vu.Command.VERSION, vu.build_version(0, 0, {}))
        ram = os.memfd_create("guest-ram")
        os.ftruncate(ram, 4096)
        errors = []
        flags = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
        for i in range(200):
            h = _request(client, 2 + i, vu.Command.DMA_MAP,
                         vu.build_dma_map(flags, 0, i * 4096, 4096), fds=[ram])
            errors.append(h.error if h.flags & vu.VFIO_USER_F_ERROR else 0)
        os.close(ram)
        assert errors[0] == 0 and set(errors) == {0, errno.ENOSPC}, set(errors)
        first = errors.index(errno.ENOSPC)
        assert all(e == errno.ENOSPC for e in errors[first:])
        stats = still_serving(proc, ctl)
        assert stats["fds"]["open"] < stats["fds"]["limit"]
        assert stats["session_counters"]["peer_error_ENOSPC"] == 200 - first
        client.close()


def _request(s: socket.socket, msg_id: int, cmd: int, payload: bytes,
             fds: list[int] | None = None) -> vu.Header:
    msg = vu.encode_request(msg_id, cmd, payload)
    if fds:
        socket.send_fds(s, [msg], fds)
    else:
        s.sendall(msg)
    raw = _exact(s, vu.HEADER_SIZE)
    h = vu.decode_header(raw)
    _exact(s, h.payload_size)
    assert h.msg_id == msg_id and h.is_reply, h
    return h


def _exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "the server closed the connection"
        buf += chunk
    return buf

