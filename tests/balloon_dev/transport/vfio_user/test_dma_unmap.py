"""VFIO_USER_DMA_UNMAP (protocol.md 7.4)."""
from __future__ import annotations

import errno
import struct

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client, memfd

C = vu.Command.DMA_UNMAP
RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
MIB = 1 << 20


def mapped(client: Client, *ranges: tuple[int, int]) -> None:
    for gpa, size in ranges:
        client.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, gpa, size), [memfd(size)])


def test_exact_unmap_removes_the_region_and_echoes(client: Client) -> None:
    mapped(client, (0, MIB), (4 * MIB, MIB))
    p = client.ok(C, vu.build_dma_unmap(0, 0, MIB))
    assert struct.unpack("=IIQQ", p) == (24, 0, 0, MIB)
    assert not client.mem.contains(0, 1)
    assert client.mem.contains(4 * MIB, MIB)
    # Mapping the same range again works (the old one is really gone).
    mapped(client, (0, MIB))


def test_unmap_covering_whole_mappings(client: Client) -> None:
    mapped(client, (0, MIB), (MIB, MIB))
    client.ok(C, vu.build_dma_unmap(0, 0, 2 * MIB))
    assert client.session.dma == {} and client.mem.regions == ()


def test_unmap_all(client: Client) -> None:
    mapped(client, (0, MIB), (8 * MIB, MIB))
    client.ok(vu.Command.DMA_MAP, vu.build_dma_map(RW, 0, 0x10000000, MIB))  # no fd
    client.ok(C, vu.build_dma_unmap(vu.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0))
    assert client.session.dma == {} and client.mem.regions == ()


def test_partial_or_unknown_ranges_are_einval(client: Client) -> None:
    mapped(client, (0, 2 * MIB))
    assert client.error(C, vu.build_dma_unmap(0, 0, MIB)) == errno.EINVAL
    assert client.error(C, vu.build_dma_unmap(0, 16 * MIB, MIB)) == errno.EINVAL
    assert client.mem.contains(0, 2 * MIB)


def test_dirty_bitmap_is_not_supported(client: Client) -> None:
    mapped(client, (0, MIB))
    flag = vu.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    assert client.error(C, vu.build_dma_unmap(flag, 0, MIB)) == errno.ENOTSUP
    assert client.error(C, vu.build_dma_unmap(0x10, 0, MIB)) == errno.EINVAL
    assert client.error(C, vu.build_dma_unmap(0, 0, MIB)[:16]) == errno.EINVAL
    assert client.error(C, vu.build_dma_unmap(0, 0, MIB, argsz=8)) == errno.EINVAL
    assert client.mem.contains(0, MIB)


def test_unmap_with_an_fd_closes_it(client: Client) -> None:
    from tests.fdutil import fd_is_open
    mapped(client, (0, MIB))
    fd = memfd(MIB)
    assert client.error(C, vu.build_dma_unmap(0, 0, MIB), [fd]) == errno.EINVAL
    assert not fd_is_open(fd)
