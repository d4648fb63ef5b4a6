"""VFIO_USER_DMA_MAP (protocol.md 7.4): an fd-backed map becomes a guestmem region."""
from __future__ import annotations

import errno
import os
import struct

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client, memfd
from tests.fdutil import fd_is_open

C = vu.Command.DMA_MAP
RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
MIB = 1 << 20


def test_memfd_map_is_shared_with_the_client(client: Client) -> None:
    fd = memfd(4 * MIB)
    mine = os.dup(fd)
    client.ok(C, vu.build_dma_map(RW, 0, 0x100000, 4 * MIB), [fd])
    assert not fd_is_open(fd) or fd == mine  # the session closed its copy after mmap
    assert client.mem.contains(0x100000, 4 * MIB)
    assert not client.mem.contains(0x100000 + 4 * MIB, 1)
    # Writes by the "client" (QEMU / the guest) are seen through guestmem, and back.
    os.pwrite(mine, b"hello", 0x1234)
    assert client.mem.read(0x101234, 5) == b"hello"
    client.mem.write(0x100010, b"back")
    assert os.pread(mine, 4, 0x10) == b"back"
    os.close(mine)


def test_fd_offset_is_honoured(client: Client) -> None:
    fd = memfd(8 * MIB)
    mine = os.dup(fd)
    os.pwrite(mine, b"at 3MiB", 3 * MIB)
    client.ok(C, vu.build_dma_map(RW, 3 * MIB, 0x40000000, MIB), [fd])
    assert client.mem.read(0x40000000, 7) == b"at 3MiB"
    os.close(mine)


def test_read_only_map_is_a_read_only_region(client: Client) -> None:
    client.ok(C, vu.build_dma_map(vu.VFIO_DMA_MAP_FLAG_READ, 0, 0, MIB), [memfd(MIB)])
    region = client.mem.regions[0]
    assert region.readonly


def test_map_without_fd_is_recorded_but_not_accessible(client: Client) -> None:
    # QEMU sends ROM / non-fd RAM this way (its BIOS): legal, reachable only by DMA_READ/WRITE.
    client.ok(C, vu.build_dma_map(vu.VFIO_DMA_MAP_FLAG_READ, 0, 0xFFFC0000, 0x40000))
    assert 0xFFFC0000 in client.session.dma
    assert not client.mem.contains(0xFFFC0000, 1)


def test_overlap_is_eexist_and_the_fd_closed(client: Client) -> None:
    client.ok(C, vu.build_dma_map(RW, 0, 0, 2 * MIB), [memfd(2 * MIB)])
    fd = memfd(2 * MIB)
    assert client.error(C, vu.build_dma_map(RW, 0, MIB, 2 * MIB), [fd]) == errno.EEXIST
    assert not fd_is_open(fd)
    assert len(client.mem.regions) == 1


def test_two_fds_are_einval_and_both_closed(client: Client) -> None:
    a, b = memfd(MIB), memfd(MIB)
    assert client.error(C, vu.build_dma_map(RW, 0, 0, MIB), [a, b]) == errno.EINVAL
    assert not fd_is_open(a) and not fd_is_open(b)
    assert client.mem.regions == ()


def test_bad_ranges_and_flags_are_einval(client: Client) -> None:
    for payload in (
        vu.build_dma_map(RW, 0, 0, 0),                     # empty
        vu.build_dma_map(RW, 0, 0x123, MIB),               # unaligned address
        vu.build_dma_map(RW, 0, 0, MIB + 1),               # unaligned size
        vu.build_dma_map(RW, 0, (1 << 64) - 4096, 8192),   # wraps past 2^64
        vu.build_dma_map(RW | 0x80, 0, 0, MIB),            # unknown flag
        vu.build_dma_map(RW, 0, 0, MIB)[:24],              # short payload
        struct.pack("=IIQQQ", 16, RW, 0, 0, MIB),          # argsz too small
    ):
        fd = memfd(MIB)
        assert client.error(C, payload, [fd]) == errno.EINVAL, payload
        assert not fd_is_open(fd)
    assert client.mem.regions == () and client.session.dma == {}


def test_fd_too_small_for_the_map_fails_cleanly(client: Client) -> None:
    # mmap beyond a memfd's end succeeds on Linux but touching those pages raises SIGBUS in the
    # server: refused up front.
    fd = memfd(MIB)
    assert client.error(C, vu.build_dma_map(RW, 0, 0, 2 * MIB), [fd]) == errno.EINVAL
    assert not fd_is_open(fd)
    fd = memfd(MIB)
    assert client.error(C, vu.build_dma_map(RW, MIB, 0, MIB), [fd]) == errno.EINVAL
    # An fd that is not mappable at all (a pipe) gives an error reply, not an exception.
    r, w = os.pipe()
    err = client.error(C, vu.build_dma_map(RW, 0, 0, MIB), [r])
    assert err in (errno.ENODEV, errno.EACCES, errno.EINVAL)
    assert not fd_is_open(r)
    os.close(w)
