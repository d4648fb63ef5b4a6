"""VFIO_USER_DEVICE_GET_INFO (protocol.md 7.4, 7.5)."""
from __future__ import annotations

import errno
import struct

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client

C = vu.Command.DEVICE_GET_INFO


def test_pci_device_with_9_regions_and_5_irq_indices(client: Client) -> None:
    p = client.ok(C, vu.build_device_info(vu.DEVICE_INFO_SIZE, 0, 0, 0))
    argsz, flags, nreg, nirq = struct.unpack("=IIII", p)
    # QEMU: "this isn't a PCI device" without the PCI flag; needs >= 8 regions, >= 3 irqs.
    assert flags & vu.VFIO_DEVICE_FLAGS_PCI
    assert flags & vu.VFIO_DEVICE_FLAGS_RESET
    assert (argsz, nreg, nirq) == (16, 9, 5)


def test_larger_argsz_gets_the_16_byte_reply(client: Client) -> None:
    # Linux's vfio_device_info is 24 bytes (cap_offset, pad): the reply says 16 suffice.
    p = client.ok(C, struct.pack("=IIIIII", 24, 0, 0, 0, 0, 0))
    assert len(p) == 16 and struct.unpack_from("=I", p)[0] == 16


def test_argsz_too_small_is_einval(client: Client) -> None:
    assert client.error(C, struct.pack("=IIII", 8, 0, 0, 0)) == errno.EINVAL
    assert client.error(C, b"\1\0") == errno.EINVAL
