"""VFIO_USER_DEVICE_RESET: the device goes back to its power-on state, mappings stay."""
from __future__ import annotations

import errno

from protocol import vfio_user as vu
from protocol import virtio_pci as vp
from tests.balloon_dev.transport.vfio_user.client import BAR4, CFG, Client
from tests.fdutil import eventfd, fd_is_open


def test_reset_returns_device_and_registers_to_power_on(ram: Client) -> None:
    ram.driver_init(msix=True)
    assert ram.dev.status & 4
    ram.ok(vu.Command.DEVICE_RESET)
    assert ram.dev.status == 0
    assert ram.rd(BAR4, vp.COMMON_STATUS, 1) == 0
    assert ram.rd(BAR4, vp.COMMON_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
    assert not ram.pci.msix_enabled
    assert ram.rd(CFG, vp.PCI_COMMAND, 2) == 0
    # DMA mappings and eventfds are the client's business and survive a device reset.
    assert ram.mem.contains(0, 1)
    assert ram.session.irqs[vu.VFIO_PCI_MSIX_IRQ_INDEX].enabled
    # The driver can initialise again.
    ram.driver_init(msix=False)
    assert ram.dev.status & 4


def test_reset_with_payload_or_fds_is_refused(client: Client) -> None:
    fd = eventfd()
    assert client.error(vu.Command.DEVICE_RESET, b"", [fd]) == errno.EINVAL
    assert not fd_is_open(fd)
