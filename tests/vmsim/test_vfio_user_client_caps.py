"""vmsim.vfio_user_client against replies and config space a device made up: every layout
problem is a ``DeviceFault`` naming it, never a struct or index error."""
from __future__ import annotations

import struct

import pytest

from protocol import virtio_pci as vp
from vmsim.client_base import DeviceFault
from vmsim.vfio_user_client import VfioUserClient


def _walk(cfg: bytearray) -> None:
    c = VfioUserClient("unused")  # never connected: config reads come from ``cfg``
    c.config_read = lambda offset, count: bytes(cfg[offset:offset + count])  # type: ignore[method-assign]
    c._walk_capabilities()


def _config_with_cap_at(pos: int, cap: bytes) -> bytearray:
    cfg = bytearray(vp.PCI_CONFIG_SPACE_SIZE)
    struct.pack_into("<H", cfg, vp.PCI_STATUS, vp.PCI_STATUS_CAP_LIST)
    cfg[vp.PCI_CAPABILITY_LIST] = pos
    cfg[pos:pos + len(cap)] = cap
    return cfg


def test_notify_capability_running_past_config_space() -> None:
    # A 20-byte notify capability at 0xf0: its notify_off_multiplier would sit at 0x100.
    cap = struct.pack("<BBBBBBHII", vp.PCI_CAP_ID_VNDR, 0, vp.VIRTIO_PCI_NOTIFY_CAP_LEN,
                      vp.VIRTIO_PCI_CAP_NOTIFY_CFG, 0, 0, 0, 0, 0x100)
    with pytest.raises(DeviceFault, match="notify capability of 20 bytes at 0xf0"):
        _walk(_config_with_cap_at(0xF0, cap))


def test_capability_loop_is_a_clear_error() -> None:
    cap = bytes([vp.PCI_CAP_ID_MSIX, 0x40, 0, 0])  # points at itself
    with pytest.raises(DeviceFault, match="capability list broken at 0x40"):
        _walk(_config_with_cap_at(0x40, cap))


def test_short_device_info_reply_is_a_clear_error() -> None:
    c = VfioUserClient("unused")
    c.request = lambda *a, **k: b"\x00" * 4  # type: ignore[method-assign]
    with pytest.raises(DeviceFault, match="device_info reply of 4 bytes unusable"):
        c._device_info()
