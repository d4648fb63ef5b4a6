"""VfioUserServer over a real unix socket: SCM_RIGHTS fds (memfd, eventfd), malformed messages,
lost framing, one client after another with the device reset in between, socket permissions."""
from __future__ import annotations

import array
import errno
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from balloon_dev.device import BalloonDevice
from balloon_dev.transport.vfio_user_server import VfioUserServer
from balloon_dev.transport.virtio_pci import VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.balloon_dev.transport.vfio_user.client import memfd
from tests.fdutil import eventfd, eventfd_count, open_fds

RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE


class Peer:
    """The client end (QEMU's part), on a trio socket."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.msg_id = 0

    async def send(self, data: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        await self.sock.sendmsg([data], anc)

    async def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    async def call(self, cmd: int, payload: bytes = b"", fds: list[int] = (),  # type: ignore
                   ) -> tuple[vu.Header, bytes]:
        self.msg_id += 1
        await self.send(vu.encode_request(self.msg_id, cmd, payload), list(fds))
        h = vu.decode_header(await self.recv_exact(vu.HEADER_SIZE))
        assert h.msg_id == self.msg_id and h.is_reply
        return h, await self.recv_exact(h.payload_size)

    async def ok(self, cmd: int, payload: bytes = b"",
                 fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
        h, p = await self.call(cmd, payload, fds)
        assert not h.flags & vu.VFIO_USER_F_ERROR, h
        return p

    async def at_eof(self) -> bool:
        """The server closed the connection (a reset counts: we had sent bytes it never read)."""
        with trio.move_on_after(5):
            try:
                return await self.sock.recv(1) == b""
            except ConnectionResetError:
                return True
        return False


def make_server(path: str) -> tuple[VfioUserServer, BalloonDevice, GuestMemory, list[Any]]:
    mem = GuestMemory()
    dev = BalloonDevice(mem)
    effects: list[Any] = []
    server = VfioUserServer(path, VirtioPciFunction(dev), mem, on_effects=effects.extend,
                            busy_wait=0.5)
    return server, dev, mem, effects


def run_with_server(body: Callable[[VfioUserServer, str, BalloonDevice, GuestMemory],
                                   Awaitable[None]]) -> None:
    d = tempfile.mkdtemp(prefix="bh-vu-")
    path = os.path.join(d, "dev.sock")
    server, dev, mem, _ = make_server(path)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(server.run)
            await body(server, path, dev, mem)
            n.cancel_scope.cancel()

    trio.run(main)
    assert not os.path.exists(path)  # removed when the server stops
    os.rmdir(d)


async def connect(path: str) -> Peer:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await s.connect(path)
    return Peer(s)


def test_socket_is_private_and_a_full_exchange_works() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        p = await connect(path)
        await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {"max_msg_fds": 8}))
        fd = memfd(1 << 20)
        mine = os.dup(fd)
        await p.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, 1 << 20), [fd])
        os.close(fd)  # our copy; the server got its own through SCM_RIGHTS
        os.pwrite(mine, b"via memfd", 64)
        assert mem.read(64, 9) == b"via memfd"
        os.close(mine)
        rep = await p.ok(vu.Command.REGION_READ,
                         vu.build_region_access(0, vu.VFIO_PCI_CONFIG_REGION_INDEX, 4))
        assert struct.unpack_from("<HH", rep, 16) == (0x1AF4, 0x1045)
        p.sock.close()

    run_with_server(body)


def test_malformed_message_gets_an_error_and_its_fds_are_closed() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        p = await connect(path)
        await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        before = open_fds()
        efd = eventfd()
        h, _ = await p.call(vu.Command.DEVICE_GET_IRQ_INFO, vu.build_irq_info(16, 0, 99, 0),
                            [efd])
        assert h.flags & vu.VFIO_USER_F_ERROR and h.error == errno.EINVAL
        os.close(efd)
        assert open_fds() == before  # the server's received copy was closed too
        # The connection survives the peer error.
        await p.ok(vu.Command.DEVICE_GET_INFO, vu.build_device_info(16, 0, 0, 0))
        assert server.session is not None
        assert server.session.counters["peer_errors"] == 1
        p.sock.close()

    run_with_server(body)


def test_lost_framing_closes_and_the_next_client_finds_a_reset_device() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        p = await connect(path)
        await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        await p.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, 1 << 20), [memfd(1 << 20)])
        await p.ok(vu.Command.REGION_WRITE,
                   vu.build_region_access(vp.COMMON_STATUS, vp.MODERN_BAR, 1, b"\x03"))
        assert dev.status == 3 and mem.regions
        await p.send(vu.encode_header(7, vu.Command.DEVICE_GET_INFO, 8, 0))  # size < 16
        assert await p.at_eof()
        p.sock.close()
        q = await connect(path)
        await q.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        assert dev.status == 0 and mem.regions == ()
        assert server.counters["framing_errors"] == 1 and server.connections == 2
        q.sock.close()

    run_with_server(body)


def test_oversized_and_truncated_messages() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        p = await connect(path)
        await p.send(vu.encode_header(1, vu.Command.REGION_WRITE, 1 << 30, 0))
        assert await p.at_eof()
        p.sock.close()
        # A client that dies in the middle of a message: the server goes on.
        q = await connect(path)
        await q.send(vu.encode_header(1, vu.Command.VERSION, 64, 0) + b"\0\0")
        q.sock.close()
        r = await connect(path)
        await r.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        assert server.connections == 3
        r.sock.close()

    run_with_server(body)


def test_host_call_signals_the_clients_eventfd() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        p = await connect(path)
        await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        trig = eventfd()
        await p.ok(vu.Command.DEVICE_SET_IRQS,
                   vu.build_irq_set(vu.VFIO_IRQ_SET_DATA_EVENTFD | vu.VFIO_IRQ_SET_ACTION_TRIGGER,
                                    vu.VFIO_PCI_INTX_IRQ_INDEX, 0, 1), [trig])
        dev.state.status = 0xF  # as if a driver were live (DRIVER_OK): config irqs are sent
        server.host_call(lambda d: d.set_target(64))
        assert eventfd_count(trig) == 1
        assert server.counters["eventfd_writes"] == 1
        os.close(trig)
        p.sock.close()

    run_with_server(body)


def test_refuses_to_replace_a_regular_file() -> None:
    d = tempfile.mkdtemp(prefix="bh-vu-")
    path = os.path.join(d, "not-a-socket")
    with open(path, "w") as f:
        f.write("keep me")
    server, *_ = make_server(path)
    with pytest.raises(FileExistsError, match="not a socket"):
        trio.run(server.run)
    with open(path) as f:
        assert f.read() == "keep me"
    os.unlink(path)
    os.rmdir(d)


def test_reader_over_a_socketpair_with_fds() -> None:
    # The connection handler alone, on a real socketpair: fds cross with SCM_RIGHTS, a peer error
    # is answered, EOF ends the handler and the device is reset behind it.
    server, dev, mem, effects = make_server("/nonexistent/unused.sock")

    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        async with trio.open_nursery() as n:
            n.start_soon(server._serve, a)
            p = Peer(b)
            await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
            fd = memfd(2 << 20)
            await p.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0x100000, 0, 1 << 20), [fd])
            os.close(fd)
            assert mem.contains(0, 1 << 20)
            bad = eventfd()
            h, _ = await p.call(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, 1 << 20), [bad])
            assert h.error == errno.EEXIST
            os.close(bad)
            b.close()
        assert server.session is None and mem.regions == () and dev.status == 0
        a.close()

    trio.run(main)


def test_a_second_client_is_turned_away_while_one_is_served() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        a = await connect(path)
        await a.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        b = await connect(path)
        assert await b.at_eof()
        b.sock.close()
        await a.ok(vu.Command.DEVICE_GET_INFO, vu.build_device_info(16, 0, 0, 0))
        a.sock.close()
        with trio.fail_after(5):
            while server.session is not None:
                await trio.sleep(0.01)
        c = await connect(path)
        await c.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        assert server.counters["connections_refused_busy"] == 1 and server.connections == 2
        c.sock.close()

    run_with_server(body)


def test_an_internal_error_ends_only_that_connection() -> None:
    async def body(server: VfioUserServer, path: str, dev: BalloonDevice,
                   mem: GuestMemory) -> None:
        real_reset = server.pci.reset
        calls = []

        def reset_that_fails_once() -> list[Any]:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected: a bug while resetting after a client left")
            return real_reset()

        server.pci.reset = reset_that_fails_once  # type: ignore[method-assign]
        p = await connect(path)
        await p.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        fd = memfd(1 << 20)
        await p.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, 1 << 20), [fd])
        os.close(fd)
        p.sock.close()
        # The next client is served: the error ended one connection, not the server, and the
        # failed clean-up still released the first client's mapping.
        q = await connect(path)
        await q.ok(vu.Command.VERSION, vu.build_version(0, 0, {}))
        assert server.counters["internal_errors"] == 1
        assert calls and not mem.regions
        q.sock.close()

    run_with_server(body)
