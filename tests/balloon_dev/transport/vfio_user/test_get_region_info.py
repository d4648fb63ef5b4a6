"""VFIO_USER_DEVICE_GET_REGION_INFO (protocol.md 7.4, 7.6)."""
from __future__ import annotations

import errno
import struct

import pytest

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client

C = vu.Command.DEVICE_GET_REGION_INFO
RW = vu.VFIO_REGION_INFO_FLAG_READ | vu.VFIO_REGION_INFO_FLAG_WRITE


def region(client: Client, index: int) -> tuple[int, int, int, int, int, int]:
    p = client.ok(C, vu.build_region_info(vu.REGION_INFO_SIZE, 0, index, 0))
    return struct.unpack("=IIIIQQ", p)


@pytest.mark.parametrize(("index", "size", "flags"), [
    (0, 0, 0), (1, 0x1000, RW), (2, 0, 0), (3, 0, 0), (4, 0x4000, RW), (5, 0, 0),
    (6, 0, 0), (7, 256, RW), (8, 0, 0),
])
def test_regions_follow_qemus_virtio_pci_template(client: Client, index: int, size: int,
                                                   flags: int) -> None:
    argsz, fl, idx, cap_offset, sz, _ = region(client, index)
    assert (argsz, fl, idx, cap_offset, sz) == (32, flags, index, 0, size)
    # No MMAP flag: QEMU then keeps posted writes, and every access reaches us.
    assert not fl & vu.VFIO_REGION_INFO_FLAG_MMAP


def test_bar_sizes_are_powers_of_two(client: Client) -> None:
    for i in range(6):
        size = region(client, i)[4]
        assert size & (size - 1) == 0


def test_bad_index_is_einval(client: Client) -> None:
    assert client.error(C, vu.build_region_info(32, 0, 9, 0)) == errno.EINVAL
    assert client.error(C, vu.build_region_info(32, 0, 0xFFFFFFFF, 0)) == errno.EINVAL


def test_argsz_below_32_is_einval(client: Client) -> None:
    assert client.error(C, vu.build_region_info(16, 0, 1, 0)) == errno.EINVAL
    assert client.error(C, b"\0" * 8) == errno.EINVAL
