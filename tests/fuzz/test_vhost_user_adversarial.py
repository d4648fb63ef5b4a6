"""Adversarial vhost-user front-end against the real server (``VhostUserServer``) over a socket.

The server runs in its own trio loop in a thread; the test is a blocking front-end
(``tests.balloon_dev.transport.vhost_user.frontend.Frontend`` connected to the server's path) that
mixes QEMU's well-formed start sequence with hostile messages.
tests/balloon_dev/transport/vhost_user/test_session_fuzz.py feeds the sans-I/O session directly;
this file adds what only the server exercises: fds of the wrong kind arriving over SCM_RIGHTS and
then *used* by the server (a kick "eventfd" that is a pipe at EOF or a socket, a back-end channel
that is not a socket, memory-table fds that cannot be mapped or are too small), more fds than a
message may carry, and framing lost in every way.

Seeded-random sequences (a failing seed replays exactly). The properties:

* every message gets exactly the replies the protocol says (REPLY_REQUESTS always, NEED_REPLY
  with REPLY_ACK negotiated); a GET_FEATURES barrier after each message checks the connection
  is still in step and the server answers correctly;
* framing errors close the connection; the next front-end is served by a reset device;
* nothing escapes the server's loop; no internal error is logged;
* once the front-end is gone, the process has no more fds open than before it came;
* the server does not spin: a kick fd at EOF is dropped, not polled in a busy loop.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from balloon_dev.device import BalloonDevice
from balloon_dev.transport.vhost_user_server import VhostUserServer
from guestmem import GuestMemory
from protocol import vhost_user as vu
from tests.balloon_dev.transport.vhost_user.frontend import RAM_SIZE, RAM_UADDR, Frontend
from tests.fdutil import eventfd, open_fds
from tests.serverthread import trio_server_in_thread, wait_until

R = vu.VhostUserRequest
PF = vu.VhostUserProtocolFeature
V = vu.VHOST_USER_VERSION


def fd_table() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


@contextmanager
def served() -> Iterator[tuple[str, VhostUserServer]]:
    """A ``VhostUserServer`` running in a thread; yields (socket path, server)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vhost-user.sock"
        mem = GuestMemory()
        server = VhostUserServer(BalloonDevice(mem), mem, path, on_effects=lambda _e: None,
                                 backend_timeout=0.2)
        with trio_server_in_thread(server.run):
            yield str(path), server


def hostile_fds(rng: random.Random, kind: str) -> list[int]:
    if kind == "none":
        return []
    if kind == "eventfd":
        return [eventfd()]
    if kind == "memfd":
        fd = os.memfd_create("ram")
        os.ftruncate(fd, rng.choice([0, 4096, RAM_SIZE]))
        return [fd]
    if kind == "pipe_eof":  # readable forever, reads return b""
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "pipe_w":  # a write end: epoll says never readable, read fails
        r, w = os.pipe()
        os.close(r)
        return [w]
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()  # the peer is gone: readable at EOF
        return [a.detach()]
    if kind == "file":
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
        return [fd]
    if kind == "many":
        return [eventfd() for _ in range(rng.randint(2, 5))]
    raise AssertionError(kind)


FD_KINDS = ["none", "none", "eventfd", "memfd", "pipe_eof", "pipe_w", "socket", "file", "many"]
ADDR = [RAM_UADDR, RAM_UADDR + 0x100000, RAM_UADDR + RAM_SIZE - 16, 0, (1 << 64) - 1,
        RAM_UADDR + RAM_SIZE]


def random_message(rng: random.Random) -> tuple[int, int, bytes, list[int]]:
    """(request, flags, payload, fds): well framed, hostile content."""
    req = rng.choice([r for r in R if r not in (R.SET_PROTOCOL_FEATURES,)] + [0, 99, 0xFFFF])
    flags = V | (vu.VHOST_USER_NEED_REPLY_MASK if rng.random() < 0.5 else 0)
    if rng.random() < 0.05:
        flags |= vu.VHOST_USER_REPLY_MASK
    k = rng.randrange(6)
    fds = hostile_fds(rng, rng.choice(FD_KINDS))
    q = rng.choice([0, 1, 2, 3, 4, 0xFF, 0xFFFFFFFF])
    if k == 0:
        payload = rng.randbytes(rng.choice([0, 1, 8, 12, 40, 200, 4096]))
    elif k == 1:  # memory tables: counts, sizes and offsets of every kind, any fds
        req = rng.choice([R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG])
        regions = [vu.MemoryRegion(rng.choice([0, 0x100000, 1 << 40, (1 << 64) - 4096]),
                                   rng.choice([4096, RAM_SIZE, 0, 1 << 40, (1 << 64) - 1]),
                                   rng.choice(ADDR), rng.choice([0, 4096, 1 << 63, 1]))
                   for _ in range(rng.choice([0, 1, 1, 2, 8, 9]))]
        if req == R.SET_MEM_TABLE:
            payload = vu.build_memory_table(regions) if regions else struct.pack("=II", 0, 0)
        else:
            r0 = regions[0] if regions else vu.MemoryRegion(0, 4096, RAM_UADDR, 0)
            payload = struct.pack("=Q", 0) + struct.pack("=QQQQ", r0.guest_phys_addr,
                                                         r0.memory_size, r0.userspace_addr,
                                                         r0.mmap_offset)
    elif k == 2:  # ring files: any fd kind on KICK/CALL/ERR, NOFD with or without fds
        req = rng.choice([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR,
                          R.SET_BACKEND_REQ_FD])
        payload = vu.build_u64((q & 0xFF) | (0x100 if rng.random() < 0.2 else 0)) \
            if req != R.SET_BACKEND_REQ_FD else b""
    elif k == 3:
        req = rng.choice([R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE,
                          R.SET_VRING_ENABLE])
        payload = vu.build_vring_state(q, rng.choice([0, 1, 2, 64, 128, 256, 0x8000,
                                                      0xFFFFFFFF]))
    elif k == 4:
        req = R.SET_VRING_ADDR
        payload = vu.build_vring_addr(vu.VringAddr(q, rng.choice([0, 1, 0xFF]), rng.choice(ADDR),
                                                   rng.choice(ADDR), rng.choice(ADDR),
                                                   rng.choice([0, 1 << 63])))
    else:
        req = rng.choice([R.SET_CONFIG, R.GET_CONFIG])
        off, size = rng.choice([0, 4, 8, 12, 16, 255, 256, 0xFFFFFFFF]), rng.choice(
            [0, 1, 4, 16, 256, 257])
        payload = struct.pack("=III", off, size, rng.choice([0, 1, 2])) + \
            rng.randbytes(min(size, 256))
    return req, flags, payload, fds


class Peer:
    """A raw front-end connection, with the fds it sends closed after sending."""

    def __init__(self, path: str) -> None:
        self.fe = Frontend(connect=path)

    def send(self, req: int, flags: int, payload: bytes, fds: list[int]) -> None:
        data = struct.pack("=III", req, flags, len(payload)) + payload
        try:
            self.fe.send_raw(data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def barrier(self, offered: int) -> None:
        r = self.fe.request(R.GET_FEATURES)
        assert r is not None and r.request == R.GET_FEATURES and r.u64 == offered, r


def _reply_due(server: VhostUserServer, req: int, flags: int) -> bool:
    # Read between messages: the server is blocked reading the next one, nothing changes.
    return req in vu.REPLY_REQUESTS or bool(
        flags & vu.VHOST_USER_NEED_REPLY_MASK
        and server.session.has_protocol_feature(PF.REPLY_ACK))


@pytest.mark.parametrize("seed", range(1, 7))
def test_server_survives_random_messages(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(seed)
    caplog.set_level(logging.WARNING)
    with served() as (path, server):
        baseline = open_fds()
        table = fd_table()
        for _conn in range(3):
            p = Peer(path)
            p.fe.init()
            offered = p.fe.offered
            if rng.random() < 0.6:
                p.fe.start()  # live device with real rings; then the hostile part
            for _step in range(50):
                req, flags, payload, fds = random_message(rng)
                due = _reply_due(server, req, flags)
                p.send(req, flags, payload, fds)
                if due:
                    r = p.fe.recv_reply()
                    assert r.request == req and r.flags == V | vu.VHOST_USER_REPLY_MASK, (req, r)
                p.barrier(offered)
            kicks = server.counters["kicks"]
            time.sleep(0.1)
            # An EOF kick fd must not be polled in a loop (a few kicks may still be in flight).
            assert server.counters["kicks"] - kicks < 20, server.counters
            p.fe.close()
            del p  # its mmap of guest RAM holds a dup of the memfd until collected
            assert wait_until(lambda: not server.busy)
        assert wait_until(lambda: open_fds() <= baseline), (
            {k: v for k, v in fd_table().items() if table.get(k) != v}, server.counters)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_kick_fd_at_eof_is_not_busy_polled() -> None:
    """A kick "eventfd" that is a pipe whose writer is gone is readable forever; the watcher
    must give it up (counted, warned) rather than spin the server's only thread."""
    with served() as (path, server):
        p = Peer(path)
        p.fe.init()
        p.fe.start()
        r, w = os.pipe()
        os.close(w)
        p.fe.request(R.SET_VRING_KICK, vu.build_vring_file(0), fds=[r])
        os.close(r)
        p.barrier(p.fe.offered)
        before = server.counters["kicks"]
        time.sleep(0.3)
        assert server.counters["kicks"] - before < 5, server.counters
        assert server.counters["kick_fd_eof"] >= 1
        p.barrier(p.fe.offered)
        p.fe.close()


def test_backend_channel_that_is_not_a_socket_leaks_no_fd() -> None:
    """SET_BACKEND_REQ_FD with an eventfd: the server cannot use it as a channel; that must not
    cost an fd per later message (the failed ``socket(fileno=dup)`` keeps no dup open)."""
    with served() as (path, server):
        p = Peer(path)
        p.fe.init()
        ev = eventfd()
        r = p.fe.request(R.SET_BACKEND_REQ_FD, fds=[ev], need_reply=True)
        os.close(ev)
        assert r is not None
        p.barrier(p.fe.offered)
        before = open_fds()
        for _ in range(50):
            p.barrier(p.fe.offered)
        assert open_fds() <= before, (open_fds(), before)
        p.fe.close()


def test_too_many_fds_refuse_that_message_only() -> None:
    """More fds than VHOST_USER_MAX_FDS (the kernel drops the rest): the message is refused
    (the connection's one policy, balloon_dev.transport.connection), the fds that arrived are
    closed, and the same connection goes on."""
    with served() as (path, server):
        baseline = open_fds()
        p = Peer(path)
        p.fe.init()
        fds = [eventfd() for _ in range(vu.VHOST_USER_MAX_FDS + 3)]
        p.fe.send_raw(struct.pack("=III", R.GET_FEATURES, V, 0), fds)
        for fd in fds:
            os.close(fd)
        r = p.fe.recv_reply()  # GET_FEATURES always replies: a failure is an empty payload
        assert r.request == R.GET_FEATURES and r.payload == b""
        p.barrier(p.fe.offered)  # the connection is still served
        assert server.counters["fds_truncated"] == 1
        assert server.session is not None
        assert server.session.counters["fds_truncated"] == 1
        p.fe.close()
        del p
        assert wait_until(lambda: not server.busy)
        assert wait_until(lambda: open_fds() <= baseline), (open_fds(), baseline)


def test_lost_framing_closes_only_that_connection() -> None:
    """A bad version, an over-size payload, EOF mid-message: each closes the connection
    (framing is lost), fds closed; the next front-end is served."""
    with served() as (path, server):
        baseline = open_fds()
        breakers: list[tuple[bytes, int]] = [
            (struct.pack("=III", R.GET_FEATURES, 0, 0), 1),  # version 0
            (struct.pack("=III", R.SET_MEM_TABLE, V, vu.VHOST_USER_MAX_PAYLOAD + 1), 2),
            (struct.pack("=III", R.SET_MEM_TABLE, V, 40) + b"\0" * 10, 1),  # then EOF
            (b"\x01\x00\x00", 0),  # EOF inside the header
        ]
        for data, nfds in breakers:
            p = Peer(path)
            p.fe.init()
            fds = [eventfd() for _ in range(nfds)]
            p.fe.send_raw(data, fds)
            for fd in fds:
                os.close(fd)
            p.fe.sock.shutdown(socket.SHUT_WR)
            assert p.fe.sock.recv(1) == b""  # closed by the server
            p.fe.close()
            del p
            assert wait_until(lambda: not server.busy)
        p = Peer(path)
        p.fe.init()
        p.fe.start()
        p.barrier(p.fe.offered)
        p.fe.close()
        del p
        assert wait_until(lambda: not server.busy)
        assert wait_until(lambda: open_fds() <= baseline), (open_fds(), baseline)
        assert server.counters["framing_errors"] >= 2


def test_frontend_that_leaves_without_reading_its_replies() -> None:
    """A front-end pipelines requests that all reply and closes at once (the server's sends fail
    with EPIPE): only that connection ends; the next front-end is served."""
    with served() as (path, server):
        baseline = open_fds()
        for _ in range(3):
            p = Peer(path)
            p.fe.init()
            p.fe.send_raw(b"".join(vu.build_request(R.GET_FEATURES, b"") for _ in range(300)))
            p.fe.close()
            del p
            assert wait_until(lambda: not server.busy)
        p = Peer(path)
        p.fe.init()
        p.barrier(p.fe.offered)
        p.fe.close()
        del p
        assert wait_until(lambda: not server.busy)
        assert wait_until(lambda: open_fds() <= baseline), (open_fds(), baseline)
        assert server.connections == 4


def test_memory_table_replaced_under_running_rings() -> None:
    """A live device whose guest RAM is swapped for a 4 KiB table (the rings now lie outside
    guest memory): the next kicks must not touch the old mapping or crash; the device goes to
    DEVICE_NEEDS_RESET, and a fresh start with the real RAM brings it back."""
    with served() as (path, server):
        baseline = open_fds()
        p = Peer(path)
        p.fe.init()
        p.fe.start()
        assert wait_until(lambda: server.session.live)
        small = os.memfd_create("small")
        os.ftruncate(small, 4096)
        table = vu.build_memory_table([vu.MemoryRegion(0, 4096, RAM_UADDR, 0)])
        r = p.fe.request(R.SET_MEM_TABLE, table, fds=[small], need_reply=True)
        os.close(small)
        assert r is not None
        for q in list(p.fe.kick):
            os.write(p.fe.kick[q], struct.pack("=Q", 1))
        assert wait_until(lambda: bool(server.dev.status & 0x40)), server.dev.status
        p.barrier(p.fe.offered)
        # Recovery as QEMU does it after the guest resets the device: stop, then start afresh.
        p.fe.stop()
        p.fe.request(R.SET_STATUS, vu.build_u64(0))
        p.fe.start()
        assert wait_until(lambda: server.session.live and not server.dev.status & 0x40)
        p.fe.add_u32(p.fe.vrings[0], 42)  # inflate pfn 42 on the fresh rings
        os.write(p.fe.kick[0], struct.pack("=Q", 1))
        assert wait_until(p.fe.vrings[0].more_used)
        p.fe.close()
        del p
        assert wait_until(lambda: not server.busy)
        assert wait_until(lambda: open_fds() <= baseline), (open_fds(), baseline)
