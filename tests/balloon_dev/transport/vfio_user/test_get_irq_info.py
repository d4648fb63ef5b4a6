"""VFIO_USER_DEVICE_GET_IRQ_INFO (protocol.md 7.4, 7.5)."""
from __future__ import annotations

import errno
import struct

import pytest

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client

C = vu.Command.DEVICE_GET_IRQ_INFO


@pytest.mark.parametrize(("index", "count", "flags"), [
    (0, 1, vu.VFIO_IRQ_INFO_EVENTFD | vu.VFIO_IRQ_INFO_MASKABLE | vu.VFIO_IRQ_INFO_AUTOMASKED),
    (1, 0, vu.VFIO_IRQ_INFO_EVENTFD),
    (2, 2, vu.VFIO_IRQ_INFO_EVENTFD),
    (3, 0, vu.VFIO_IRQ_INFO_EVENTFD),
    (4, 0, vu.VFIO_IRQ_INFO_EVENTFD),
])
def test_irq_indices(client: Client, index: int, count: int, flags: int) -> None:
    p = client.ok(C, vu.build_irq_info(vu.IRQ_INFO_SIZE, 0, index, 0))
    assert struct.unpack("=IIII", p) == (16, flags, index, count)


def test_msix_count_is_the_table_size() -> None:
    c = Client(msix_vectors=5)
    c.version()
    p = c.ok(C, vu.build_irq_info(16, 0, vu.VFIO_PCI_MSIX_IRQ_INDEX, 0))
    assert struct.unpack("=IIII", p)[3] == 5
    c.close()


def test_bad_index_and_size(client: Client) -> None:
    assert client.error(C, vu.build_irq_info(16, 0, 5, 0)) == errno.EINVAL
    assert client.error(C, vu.build_irq_info(8, 0, 0, 0)) == errno.EINVAL
    assert client.error(C, vu.build_irq_info(16, 0, 0, 0) + b"xx") == errno.EINVAL
