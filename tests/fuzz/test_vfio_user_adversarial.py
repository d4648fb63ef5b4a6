"""Adversarial vfio-user client against the real server (``VfioUserServer``) over a unix socket.

The server runs in its own trio loop in a thread; the test is a blocking client that speaks the
protocol through ``tests.balloon_dev.transport.vfio_user.client.Client`` (whose ``raw`` is
re-pointed at the socket), so the well-formed helpers (VERSION, DMA_MAP of RAM, the virtio-pci
driver init sequence) and the hostile messages go down the same connection.
tests/balloon_dev/transport/vfio_user/test_session_fuzz.py feeds the sans-I/O session directly; this
file adds what only the socket path exercises: SCM_RIGHTS fds of every kind (memfd too small, pipe,
eventfd, socket, read-only file, too many fds for the ancillary buffer), framing lost in every way
(size below the header, above the limit, EOF in the middle), replies where a command is due, and the
guest's RAM unmapped while the device runs.

Seeded-random sequences (a failing seed is printed and replays exactly). The properties:

* every well-framed command gets exactly one reply with its msg_id (none for NO_REPLY, none for
  a message typed as a reply); framing errors close the connection and nothing else does;
* after every sequence the same connection (or, after a framing error, the next one) still
  answers VERSION and DEVICE_GET_INFO correctly;
* nothing raises out of the server (its loop runs to the end), no internal error is logged;
* once every connection is closed, the process has no more open fds than before the first one;
* the ring memory unmapped under a running device makes it set DEVICE_NEEDS_RESET on the next
  notify (virtio 1.3 2.1.2; protocol.md 2.2) and a reset plus a fresh init brings it back.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import random
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.transport.vfio_user import SERVER_MAX_MSG_FDS
from balloon_dev.transport.vfio_user_server import VfioUserServer
from balloon_dev.transport.virtio_pci import VirtioPciFunction
from guestmem import GuestMemory
from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from protocol.virtio import VIRTIO_F_RING_PACKED, DeviceStatus
from tests.balloon_dev.transport.vfio_user.client import BAR4, CFG, RAM_SIZE, Client, memfd
from tests.fdutil import eventfd, eventfd_count, open_fds
from tests.serverthread import trio_server_in_thread, wait_until

RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
NEEDS_RESET = int(DeviceStatus.DEVICE_NEEDS_RESET)
PAGE = 4096


class FramingLost(Exception):
    """The server closed the connection."""


class SocketClient(Client):
    """``Client`` whose messages go over a real socket to a ``VfioUserServer``."""

    def __init__(self, path: str) -> None:  # noqa: D107 - no device of its own
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.msg_id = 0
        self.ram_fd: int | None = None

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send ``data`` with ``fds`` (ours are closed afterwards: ownership moves over)."""
        fds = fds or []
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        finally:
            for fd in fds:
                os.close(fd)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise FramingLost(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def raw(self, data: bytes, fds: list[int] | None = None) -> tuple[Any, bytes, list[Any]]:
        header = vu.decode_header(data[:vu.HEADER_SIZE])
        self.send(data, fds)
        if header.no_reply or header.is_reply:
            return None, b"", []
        rh = vu.decode_header(self.recv_exact(vu.HEADER_SIZE))
        assert rh.msg_id == header.msg_id and rh.command == header.command, (header, rh)
        assert rh.is_reply
        payload = self.recv_exact(rh.payload_size)
        if rh.flags & vu.VFIO_USER_F_ERROR:
            assert payload == b"" and rh.error != 0
        return rh, payload, []

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
        if self.ram_fd is not None:
            os.close(self.ram_fd)
            self.ram_fd = None

    def healthy(self) -> None:
        """A well-formed VERSION and DEVICE_GET_INFO are answered correctly."""
        caps = self.version()["capabilities"]
        assert caps["max_msg_fds"] == SERVER_MAX_MSG_FDS
        argsz, flags, nreg, nirq = struct.unpack("=IIII", self.ok(vu.Command.DEVICE_GET_INFO,
                                                                   struct.pack("=IIII", 16, 0,
                                                                               0, 0)))
        assert (nreg, nirq) == (vu.VFIO_PCI_NUM_REGIONS, vu.VFIO_PCI_NUM_IRQS)
        assert flags & vu.VFIO_DEVICE_FLAGS_PCI


@contextmanager
def served(features: int | None = None) -> Iterator[tuple[str, VfioUserServer]]:
    """A ``VfioUserServer`` running in a thread; yields (socket path, server)."""
    mem = GuestMemory()
    cfg = DeviceConfig() if features is None else DeviceConfig(offered_features=features)
    pci = VirtioPciFunction(BalloonDevice(mem, cfg), msix_vectors=2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vfio-user.sock")
        server = VfioUserServer(path, pci, mem, on_effects=lambda _e: None, busy_wait=5.0)
        with trio_server_in_thread(server.run):
            yield path, server


# -- hostile fds --------------------------------------------------------------------------------
def hostile_fd(rng: random.Random, kind: str, size: int) -> list[int]:
    """Fds for a DMA_MAP of ``size`` bytes, of a kind the server must survive."""
    if kind == "none":
        return []
    if kind == "memfd":
        return [memfd(size)]
    if kind == "memfd_small":
        return [memfd(max(0, size - PAGE * rng.randint(1, 4)))]
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if kind == "eventfd":
        return [eventfd()]
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return [a.detach()]
    if kind == "readonly":  # mapped with WRITE: the mmap must fail with EACCES, not crash
        f = tempfile.TemporaryFile()
        f.truncate(size)
        fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY)
        f.close()
        return [fd]
    if kind == "two":
        return [memfd(size), eventfd()]
    raise AssertionError(kind)


FD_KINDS = ["none", "memfd", "memfd_small", "pipe", "eventfd", "socket", "readonly", "two"]


def random_message(rng: random.Random, msg_id: int) -> tuple[bytes, list[int]]:
    """A well-framed message (valid header, hostile content) and the fds it carries."""
    k = rng.choice([0, 1, 1, 2, 3, 3, 3, 3, 3, 4, 4, 5, 6, 7, 8, 9])
    cmd = rng.choice([int(c) for c in vu.Command] + [0, 15, 99, 0xFFFF])
    flags = 0 if rng.random() < 0.75 else rng.choice([
        vu.VFIO_USER_F_NO_REPLY, vu.VFIO_USER_F_TYPE_REPLY, rng.randrange(2, 16),
        vu.VFIO_USER_F_ERROR, 0xFFFFFFFF])
    fds: list[int] = []
    if k == 0:  # random payload
        payload = rng.randbytes(rng.choice([0, 1, 4, 8, 16, 24, 32, 64, 200]))
    elif k == 1:  # DMA_MAP: any range, any fd
        cmd = vu.Command.DMA_MAP
        size = rng.choice([PAGE, PAGE, 4 * PAGE, 0x100000, 0, 1, PAGE + 1, 1 << 40,
                           (1 << 64) - PAGE])
        high = (1 << 32) + PAGE * rng.randrange(64)  # clear of RAM: these maps may succeed
        addr = rng.choice([high, high, 0, PAGE, 0x200000, 0x100000, (1 << 64) - PAGE, 123])
        offset = rng.choice([0, 0, PAGE, 1, 1 << 62])
        payload = vu.build_dma_map(rng.choice([RW, vu.VFIO_DMA_MAP_FLAG_READ, 0, 4, 0xFFFF]),
                                   offset, addr, size)
        fd_size = min(size, 1 << 22) + (offset if offset < (1 << 30) else 0)
        fds = hostile_fd(rng, rng.choice(FD_KINDS), max(fd_size, PAGE))
    elif k == 2:
        cmd = vu.Command.DMA_UNMAP
        payload = vu.build_dma_unmap(rng.choice([0, 0, 1, 2, 3, 0xFF]),
                                     rng.choice([0, PAGE, 0x100000, 1 << 32]),
                                     rng.choice([0, PAGE, 0x100000, 1 << 64 - 1, 1 << 40]))
    elif k == 3:  # region access at any offset / size, aligned or not, past the end
        cmd = rng.choice([vu.Command.REGION_READ, vu.Command.REGION_WRITE])
        region = rng.choice([CFG, CFG, BAR4, BAR4, BAR4, 1, 0, 2, 8, 9, 0xFFFFFFFF])
        offset = rng.choice([rng.randrange(0, 0x100), rng.randrange(0, 0x100),
                             rng.randrange(0, 0x4100), 0xFFC, 0x3FFF, 0x2000, (1 << 64) - 1,
                             (1 << 64) - 4])
        count = rng.choice([1, 2, 4, 1, 2, 4, 3, 5, 7, 8, 16, 0, 0x1001, 0xFFFFFFFF])
        data = rng.randbytes(min(count, 64)) if cmd == vu.Command.REGION_WRITE else b""
        payload = vu.build_region_access(offset, region, count, data)
    elif k == 4:  # SET_IRQS with bogus counts, indices and fd counts
        cmd = vu.Command.DEVICE_SET_IRQS
        count = rng.choice([0, 1, 2, 3, 0xFFFFFFFF, 1 << 31])
        payload = vu.build_irq_set(rng.choice([0x24, 0x21, 0x22, 0x11, 0x14, 0x3F, 0xFF, 0x44]),
                                   rng.choice([0, 2, 1, 4, 5, 0xFFFFFFFF]),
                                   rng.choice([0, 1, 2, 0xFFFFFFFF]), count)
        if rng.random() < 0.3:
            payload += rng.randbytes(rng.choice([1, 4, 8]))  # DATA_BOOL bytes, or garbage
        fds = [eventfd() for _ in range(rng.choice([0, 1, 2, 3]))]
    elif k == 5:  # huge or wrong argsz on any fixed-layout command
        cmd = rng.choice([vu.Command.DEVICE_GET_INFO, vu.Command.DEVICE_GET_REGION_INFO,
                          vu.Command.DEVICE_GET_IRQ_INFO, vu.Command.DMA_UNMAP,
                          vu.Command.DEVICE_SET_IRQS, vu.Command.DMA_MAP])
        payload = struct.pack("=I", rng.choice([0, 1, 15, 0xFFFFFFFF, 1 << 31])) + \
            rng.randbytes(rng.choice([0, 4, 12, 28, 60]))
    elif k == 6:  # VERSION with strange capabilities
        cmd = vu.Command.VERSION
        caps = rng.choice([b"", b"{", b"[]", b"null", b'{"max_msg_fds": -1}',
                           b'{"max_msg_fds": "x", "max_data_xfer_size": 1e400}',
                           b'{"migration": {"pgsize": 0}}', b"\xff\xfe", b"[" * 5000])
        payload = struct.pack("=HH", rng.choice([0, 0, 1, 0xFFFF]), rng.randrange(3)) + caps + \
            rng.choice([b"\0", b""])
    elif k == 7:  # eventfds on commands that take none
        payload = rng.randbytes(rng.choice([0, 8, 16, 32]))
        fds = [eventfd() for _ in range(rng.randint(1, 3))]
    elif k == 8:  # more fds than max_msg_fds: the kernel truncates the ancillary data
        payload = rng.randbytes(16)
        fds = [eventfd() for _ in range(SERVER_MAX_MSG_FDS + rng.randint(1, 8))]
    else:
        cmd = rng.choice([vu.Command.DEVICE_GET_REGION_IO_FDS, vu.Command.DMA_READ,
                          vu.Command.DMA_WRITE, vu.Command.DIRTY_PAGES, vu.Command.DEVICE_RESET])
        payload = rng.randbytes(rng.choice([0, 16, 24]))
    return vu.encode_request(msg_id, cmd, payload, flags=flags), fds


def framing_breaker(rng: random.Random, c: SocketClient) -> None:
    """Lose framing in one of the ways a broken peer does; the server must close."""
    k = rng.randrange(4)
    if k == 0:  # size smaller than the header
        c.send(struct.pack("=HHIII", 1, 1, rng.randrange(0, 16), 0, 0))
    elif k == 1:  # size over the limit (huge payload announced)
        c.send(struct.pack("=HHIII", 1, rng.choice([1, 9, 10]),
                           rng.choice([vu.MAX_MESSAGE_SIZE + 1, 0xFFFFFFFF]), 0, 0),
               [eventfd()] if rng.random() < 0.5 else None)
    elif k == 2:  # EOF in the middle of the payload (with fds in flight)
        data = vu.encode_request(1, vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0, 0x100000))
        c.send(data[:rng.randrange(1, len(data))], [memfd(0x100000)])
        c.sock.shutdown(socket.SHUT_WR)
    else:  # EOF in the middle of the header
        c.send(b"\x01\x00\x01"[:rng.randint(1, 3)])
        c.sock.shutdown(socket.SHUT_WR)
    assert c.at_eof(), "the server kept a connection whose framing is lost"


@pytest.mark.parametrize("seed", range(1, 9))
def test_server_survives_random_messages(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(seed)
    caplog.set_level(logging.WARNING)
    # Even seeds offer RING_PACKED (the driver takes every offered feature): the scribbled
    # rings are then read as packed rings.
    features = DEFAULT_OFFERED_FEATURES | (1 << VIRTIO_F_RING_PACKED if seed % 2 == 0 else 0)
    with served(features) as (path, server):
        baseline = open_fds()
        for _conn in range(5):
            c = SocketClient(path)
            try:
                c.healthy()
                irq: list[int] = []
                if rng.random() < 0.7:
                    c.map_ram()
                    if rng.random() < 0.7:  # a running device whose rings the guest scribbles on
                        irq = c.driver_init(msix=rng.random() < 0.5)
                for step in range(60):
                    if irq and c.ram_fd is not None and rng.random() < 0.2:
                        # Guest garbage in the rings (driver_init puts them at 1 MiB + 64 KiB
                        # per queue), then a kick: the device must survive any ring content.
                        q = rng.randrange(4)
                        # Mostly the first descriptor slots (where the device looks next, split
                        # or packed), sometimes anywhere in the ring areas.
                        off = rng.choice([16 * rng.randrange(16), 16 * rng.randrange(16),
                                          rng.randrange(0, 0x9000)])
                        os.pwrite(c.ram_fd, rng.randbytes(rng.choice([2, 16, 64, 512])),
                                  0x100000 + 0x10000 * q + off)
                        c.wr(BAR4, 0x3000 + 4 * q, q, 2)
                        continue
                    data, fds = random_message(rng, step + 1)
                    h, _p, _ = c.raw(data, fds)
                    header = vu.decode_header(data[:16])
                    assert (h is None) == (header.no_reply or header.is_reply), (seed, header)
                    if step % 10 == 9:
                        c.healthy()
                for fd in irq:
                    os.close(fd)
                c.healthy()
                if rng.random() < 0.5:
                    framing_breaker(rng, c)
            finally:
                c.close()
        c = SocketClient(path)
        c.healthy()
        c.close()
        assert wait_until(lambda: open_fds() <= baseline), f"seed {seed}: fds leaked"
        counters = server.stats()["server_counters"]
    internal = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not internal, [r.getMessage() for r in internal]
    assert counters.get("connections_refused_busy", 0) == 0


def test_ring_memory_unmapped_while_running_sets_needs_reset() -> None:
    """DMA_UNMAP of the RAM holding the rings under DRIVER_OK: the next notify finds the ring
    outside guest memory; the device sets DEVICE_NEEDS_RESET and signals a config change
    (protocol.md 2.2), the server survives, and reset + fresh RAM + init bring it back."""
    with served() as (path, _server):
        baseline = open_fds()
        c = SocketClient(path)
        c.healthy()
        c.map_ram()
        irq = c.driver_init(msix=True)
        nq = c.rd(BAR4, vp.COMMON_NUMQ, 2)
        c.ok(vu.Command.DMA_UNMAP, vu.build_dma_unmap(0, 0, RAM_SIZE))
        for q in range(nq):
            c.wr(BAR4, 0x3000 + 4 * q, q, 2)  # notify: the core looks at a ring that is gone
        status = c.rd(BAR4, vp.COMMON_STATUS, 1)
        assert status & NEEDS_RESET, hex(status)
        assert eventfd_count(irq[0]) >= 1  # the config vector: NEEDS_RESET is a config change
        # A second unmap of the same range names no mapping: an error reply, nothing else.
        assert c.error(vu.Command.DMA_UNMAP, vu.build_dma_unmap(0, 0, RAM_SIZE)) == errno.EINVAL
        c.healthy()
        # Recovery: the driver resets the device, maps fresh RAM and starts again.
        c.wr(BAR4, vp.COMMON_STATUS, 0, 1)
        assert c.rd(BAR4, vp.COMMON_STATUS, 1) == 0
        os.close(c.ram_fd)  # type: ignore[arg-type]
        c.map_ram()
        irq2 = c.driver_init(msix=True)
        assert c.rd(BAR4, vp.COMMON_STATUS, 1) == 1 | 2 | 4 | 8
        for fd in irq + irq2:
            os.close(fd)
        c.close()
        assert wait_until(lambda: open_fds() <= baseline)


def test_unmap_every_ring_byte_range_while_running() -> None:
    """The rings of queue 0 live in their own 64 KiB mapping; unmapping just that piece (the rest
    of RAM stays) under a running device must not crash or touch freed memory either."""
    with served() as (path, _server):
        baseline = open_fds()
        c = SocketClient(path)
        c.healthy()
        # RAM in three maps: [0, 1 MiB), queue 0's rings [1 MiB, +64 KiB), the rest.
        fds = [memfd(0x100000), memfd(0x10000), memfd(RAM_SIZE - 0x110000)]
        for gpa, size, fd in ((0, 0x100000, fds[0]), (0x100000, 0x10000, fds[1]),
                              (0x110000, RAM_SIZE - 0x110000, fds[2])):
            c.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, gpa, size), [fd])
        irq = c.driver_init(msix=True)
        c.ok(vu.Command.DMA_UNMAP, vu.build_dma_unmap(0, 0x100000, 0x10000))
        c.wr(BAR4, 0x3000, 0, 2)
        assert c.rd(BAR4, vp.COMMON_STATUS, 1) & NEEDS_RESET
        c.healthy()
        # Overlapping maps are refused, a map into the hole is fine.
        assert c.error(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0xF0000, 0x20000),
                       [memfd(0x20000)]) == errno.EEXIST
        c.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0x100000, 0x10000), [memfd(0x10000)])
        for fd in irq:
            os.close(fd)
        c.close()
        assert wait_until(lambda: open_fds() <= baseline)


def test_second_client_after_framing_loss_gets_a_reset_device() -> None:
    """Framing lost in the middle of a DMA_MAP (fd in flight): the next client is served and
    finds the device reset with no mapping left over."""
    with served() as (path, server):
        baseline = open_fds()
        c = SocketClient(path)
        c.healthy()
        c.map_ram()
        c.driver_init(msix=False)
        data = vu.encode_request(9, vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 1 << 32, PAGE))
        c.send(data[:20], [memfd(PAGE)])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.at_eof()
        c.close()
        c2 = SocketClient(path)
        c2.healthy()
        assert c2.rd(BAR4, vp.COMMON_STATUS, 1) == 0
        assert server.stats()["dma_regions"] == []
        c2.close()
        assert wait_until(lambda: open_fds() <= baseline)


def test_version_json_bomb_is_refused() -> None:
    """A VERSION whose JSON is nested past Python's recursion limit is a peer error."""
    with served() as (path, _server):
        c = SocketClient(path)
        payload = struct.pack("=HH", 0, 0) + b"[" * 30000 + b"\0"
        h, _p, _ = c.request(vu.Command.VERSION, payload)
        assert h is not None and h.flags & vu.VFIO_USER_F_ERROR
        assert h.error == errno.EINVAL  # a peer error, not an internal one (EIO)
        c.healthy()
        c.close()


def test_region_access_every_offset_and_size() -> None:
    """Every (offset, size) in the config space and over the BAR4 edges: answered, never
    crashing; in-range accesses succeed and out-of-range ones are EINVAL."""
    with served() as (path, _server):
        c = SocketClient(path)
        c.healthy()
        sizes = {CFG: 256, BAR4: None}
        h, p, _ = c.request(vu.Command.DEVICE_GET_REGION_INFO,
                            vu.build_region_info(vu.REGION_INFO_SIZE, 0, BAR4, 0))
        assert h is not None and not h.flags & vu.VFIO_USER_F_ERROR
        bar4 = struct.unpack_from("=IIIIQQ", p)[4]
        sizes[BAR4] = bar4
        cfg_size = struct.unpack_from("=IIIIQQ", c.ok(vu.Command.DEVICE_GET_REGION_INFO,
                                                       vu.build_region_info(
                                                           vu.REGION_INFO_SIZE, 0, CFG, 0)))[4]
        sizes[CFG] = cfg_size
        offsets = {CFG: range(0, cfg_size + 9),
                   BAR4: [*range(0, 0x40), *range(0x1FF0, 0x2010), *range(0x2FF8, 0x3010),
                          *range(bar4 - 9, bar4 + 9)]}
        for region, offs in offsets.items():
            for off in offs:
                for n in (1, 2, 3, 4, 8):
                    inside = off + n <= sizes[region]
                    h, _p, _ = c.request(vu.Command.REGION_READ,
                                         vu.build_region_access(off, region, n))
                    assert h is not None and bool(h.flags & vu.VFIO_USER_F_ERROR) != inside
                    if region == BAR4 and 0x14 <= off < 0x16:
                        continue  # device_status: a write would reset/advance the device
                    h, _p, _ = c.request(vu.Command.REGION_WRITE,
                                         vu.build_region_access(off, region, n, b"\xff" * n))
                    assert h is not None and bool(h.flags & vu.VFIO_USER_F_ERROR) != inside
        c.healthy()
        c.close()


def test_many_dma_maps_are_bounded() -> None:
    """max_dma_maps (4096) is enforced: the next map is refused with ENOSPC and its fd closed."""
    with served() as (path, _server):
        baseline = open_fds()
        c = SocketClient(path)
        limit = c.version()["capabilities"]["max_dma_maps"]
        for i in range(limit):  # no fd: cheap
            c.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, i * PAGE, PAGE))
        assert c.error(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, limit * PAGE, PAGE),
                       [memfd(PAGE)]) == errno.ENOSPC
        c.ok(vu.Command.DMA_UNMAP, vu.build_dma_unmap(vu.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0))
        c.healthy()
        c.close()
        assert wait_until(lambda: open_fds() <= baseline)





def test_client_that_leaves_without_reading_its_replies() -> None:
    """A client pipelines many requests and closes at once: the replies cannot be sent (EPIPE);
    that ends this connection only, and the next client is served."""
    with served() as (path, server):
        baseline = open_fds()
        for _ in range(3):
            c = SocketClient(path)
            c.healthy()
            burst = b"".join(vu.encode_request(100 + i, vu.Command.DEVICE_GET_INFO,
                                               struct.pack("=IIII", 16, 0, 0, 0))
                             for i in range(200))
            c.sock.sendall(burst)
            c.close()
        c = SocketClient(path)
        c.healthy()
        c.close()
        assert wait_until(lambda: open_fds() <= baseline)
        assert server.connections == 4
