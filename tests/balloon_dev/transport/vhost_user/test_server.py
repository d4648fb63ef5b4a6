"""The trio vhost-user server: socket creation, kicks -> device -> call eventfds, the back-end
channel, host calls, framing errors, one front-end at a time, reset between front-ends.

Each test runs the server in ``trio.run`` and a synchronous front-end
(tests/balloon_dev/transport/vhost_user/ frontend.py, a QEMU stand-in) in a worker thread; host
requests go through ``trio.from_thread``, as the control socket's would run in the server's loop.
"""
from __future__ import annotations

import os
import select
import socket
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from balloon_dev.device import BalloonDevice
from balloon_dev.effects import Effect, Inflated, PagesHinted
from balloon_dev.transport.vhost_user_server import VhostUserServer
from guestmem import GuestMemory
from protocol import vhost_user as vu
from tests.balloon_dev.transport.vhost_user.frontend import Frontend

R = vu.VhostUserRequest


def readable(fd: int | socket.socket, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def run_with_server(client: Callable[[VhostUserServer, trio.lowlevel.TrioToken], Any]) -> tuple[
        VhostUserServer, list[Effect], Any]:
    """Serve in trio; run ``client(server, token)`` in a thread; return what it returned."""
    host_effects: list[Effect] = []
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "balloon.sock"
        mem = GuestMemory()
        server = VhostUserServer(BalloonDevice(mem), mem, path, on_effects=host_effects.extend)
        out: list[Any] = []

        async def main() -> None:
            with trio.fail_after(60):
                await serve_and_run()

        async def serve_and_run() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                token = trio.lowlevel.current_trio_token()
                out.append(await trio.to_thread.run_sync(client, server, token))
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert not path.exists()  # the server removes its socket when it stops
    return server, host_effects, out[0]


def host(token: trio.lowlevel.TrioToken, server: VhostUserServer,
         fn: Callable[[Any], list[Effect]]) -> list[Effect]:
    return trio.from_thread.run_sync(server.host_call, fn, trio_token=token)


def in_loop(token: trio.lowlevel.TrioToken, fn: Callable[[], Any]) -> Any:
    return trio.from_thread.run_sync(fn, trio_token=token)


def wait_until(token: trio.lowlevel.TrioToken, cond: Callable[[], bool],
               timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if in_loop(token, cond):
            return True
        trio.from_thread.run(trio.sleep, 0.02, trio_token=token)
    return False


@contextmanager
def live_frontend(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> Iterator[Frontend]:
    """A front-end that has set the device up and started its rings; closed on leaving."""
    fe = Frontend(connect=str(server.path))
    try:
        fe.init()
        fe.start()
        assert wait_until(token, lambda: server.session.live)
        yield fe
    finally:
        fe.close()


# -- the listening socket (balloon_dev.transport.unixsock, shared with vfio-user) ---------------
def test_socket_is_created_mode_0600_and_stale_socket_replaced() -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(p))
        stale.close()  # leaves a stale socket file behind, as a killed server would
        mem = GuestMemory()
        server = VhostUserServer(BalloonDevice(mem), mem, p)
        modes: list[int] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.run)
                modes.append(p.lstat().st_mode)
                nursery.cancel_scope.cancel()

        trio.run(main)
        assert stat.S_ISSOCK(modes[0]) and stat.S_IMODE(modes[0]) == 0o600
        assert not p.exists()


def test_refuses_to_replace_a_regular_file_or_use_a_missing_folder() -> None:
    with tempfile.TemporaryDirectory() as d:
        mem = GuestMemory()
        p = Path(d) / "file"
        p.write_text("keep me")
        server = VhostUserServer(BalloonDevice(mem), mem, p)
        with pytest.raises(FileExistsError, match="not a socket"):
            trio.run(server.run)
        assert p.read_text() == "keep me"
        server = VhostUserServer(BalloonDevice(mem), mem, Path(d) / "missing" / "s")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            trio.run(server.run)


# -- end to end ----------------------------------------------------------------------------------
def test_inflate_kick_reaches_device_and_call_eventfd_fires() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        with live_frontend(server, token) as fe:
            vr = fe.vrings[0]
            buf = fe.area.alloc(8)
            fe.mem.write(buf, struct.pack("<2I", 0x300, 0x301))
            vr.add_buf(out=[(buf, 8)])
            fe.kick_ring(0)
            # The server's kick watcher drives the device, which uses the buffer and the server
            # signals the call eventfd.
            assert readable(fe.call[0])
            assert os.read(fe.call[0], 8) == struct.pack("=Q", 1)
            assert vr.get_buf() is not None

    server, effects, _ = run_with_server(client)
    assert Inflated((0x300, 0x301)) in effects
    assert server.counters["kicks"] >= 1 and server.counters["eventfd_writes"] >= 1


def test_replaced_kick_fd_is_watched_instead_of_the_old_one() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        with live_frontend(server, token) as fe:
            old = fe.kick[0]
            fe.kick[0] = os.eventfd(0, os.EFD_NONBLOCK)
            # NEED_REPLY: wait until the server has switched before the guest adds a buffer.
            r = fe.request(R.SET_VRING_KICK, vu.build_vring_file(0), fds=[fe.kick[0]],
                           need_reply=True)
            assert r is not None and r.u64 == 0
            vr = fe.vrings[0]
            fe.add_u32(vr, 0x444)
            os.write(old, struct.pack("=Q", 1))  # the old fd is no longer watched
            assert not readable(fe.call[0], 0.3)
            assert not vr.more_used()
            fe.kick_ring(0)  # the new one is
            assert readable(fe.call[0])
            assert vr.more_used()
            os.close(old)

    _server, effects, _ = run_with_server(client)
    assert Inflated((0x444,)) in effects


def test_host_call_sends_config_change_and_hints_arrive() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> int:
        with live_frontend(server, token) as fe:
            assert fe.channel is not None
            host(token, server, lambda d: d.free_page_start())
            # CONFIG_CHANGE_MSG on the back-end channel (protocol.md 8.4).
            assert readable(fe.channel)
            assert fe.channel.recv(64) == vu.build_request(
                vu.VhostUserBackendRequest.CONFIG_CHANGE_MSG)
            cmd_id = struct.unpack("<I", fe.get_config(8, 4))[0]
            fpq = fe.vrings[3]
            fe.add_u32(fpq, cmd_id)
            fpq.add_buf(in_=[(0x200000, 0x400000 - 0x200000)])
            fe.kick_ring(3)
            assert wait_until(token, lambda: fpq.more_used())
            return cmd_id

    _server, effects, cmd_id = run_with_server(client)
    hints = [e for e in effects if isinstance(e, PagesHinted)]
    assert hints == [PagesHinted.from_ranges(cmd_id, ((0x200000, 0x200000),))]


def test_second_frontend_refused_then_next_one_gets_a_reset_device() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        fe = Frontend(connect=str(server.path))
        fe.init()
        fe.start()
        assert wait_until(token, lambda: server.session.live)
        host(token, server, lambda d: d.set_target(77))
        # A second front-end while the first is served: closed at once.
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(server.path))
        assert readable(other) and other.recv(1) == b""
        other.close()
        fe.close()
        # The first leaves: device reset, fds and mappings released.
        assert wait_until(token, lambda: server.dev.status == 0 and not server.mem.regions
                          and not server.busy)
        assert server.dev.num_pages == 77  # host target survives a reset (device.py)
        fe2 = Frontend(connect=str(server.path))
        try:
            fe2.init()
            fe2.start()
            assert wait_until(token, lambda: server.session.live)
        finally:
            fe2.close()

    server, _effects, _ = run_with_server(client)
    assert server.connections == 2
    assert server.counters["connections_refused_busy"] == 1


def test_framing_error_closes_the_connection_and_server_survives() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        fe = Frontend(connect=str(server.path))
        fe.init()
        a = os.eventfd(0)
        # Version 3 in the flags: the stream cannot be trusted, the server hangs up.
        fe.send_raw(struct.pack("=III", R.SET_OWNER, 3, 0), [a])
        os.close(a)
        assert readable(fe.sock) and fe.sock.recv(1) == b""
        fe.close()
        assert wait_until(token, lambda: not server.busy)
        fe2 = Frontend(connect=str(server.path))
        try:
            r = fe2.request(R.GET_FEATURES)
            assert r is not None and r.u64 >> 32 & 1
        finally:
            fe2.close()

    server, _e, _ = run_with_server(client)
    assert server.counters["framing_errors"] == 1


def test_peer_closing_mid_message_is_survived() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        fe = Frontend(connect=str(server.path))
        fe.send_raw(struct.pack("=III", R.SET_FEATURES, 1, 8) + b"\x01\x02")
        fe.close()
        assert wait_until(token, lambda: not server.busy)

    server, _e, _ = run_with_server(client)
    assert server.connections == 1



def test_a_host_handler_raising_while_a_front_end_leaves_does_not_end_the_server() -> None:
    def client(server: VhostUserServer, token: trio.lowlevel.TrioToken) -> None:
        def broken_host(effects: list[Effect]) -> None:
            raise RuntimeError("injected: the host's effect handler failed")

        with live_frontend(server, token):
            host(token, server, lambda d: d.free_page_start())  # a round the reset will end
            server.on_effects = broken_host  # the reset's HintRoundStopped reaches it
        assert wait_until(token, lambda: not server.busy)
        fe2 = Frontend(connect=str(server.path))
        try:
            r = fe2.request(R.GET_FEATURES)
            assert r is not None and r.u64 >> 32 & 1
        finally:
            fe2.close()

    server, _e, _ = run_with_server(client)
    assert server.counters["internal_errors"] == 1
    assert server.connections == 2
