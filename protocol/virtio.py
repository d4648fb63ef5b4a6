"""Device-independent virtio constants: feature bits and device status bits.

Values from the virtio 1.x spec (shared/docs/protocol.md sections 2.1 and 2.2). Feature bits are
bit *numbers*; use ``1 << VIRTIO_F_VERSION_1`` for masks.
"""
from __future__ import annotations

import enum

# Device-independent feature bits (protocol.md 2.1).
VIRTIO_F_NOTIFY_ON_EMPTY = 24  # legacy
VIRTIO_F_ANY_LAYOUT = 27  # legacy
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_UNUSED_30 = 30  # vhost-user PROTOCOL_FEATURES; never offered to a guest
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41
VIRTIO_F_SUSPEND = 43

#: Bits 0-23 and 50-127 belong to the device type.
DEVICE_TYPE_FEATURE_MASK = ((1 << 24) - 1) | (((1 << 64) - 1) & ~((1 << 50) - 1))


class DeviceStatus(enum.IntFlag):
    """The device status byte (protocol.md 2.2)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    SUSPEND = 16
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


VIRTIO_ID_BALLOON = 5


def feature_mask(*bits: int) -> int:
    """OR of ``1 << bit`` for each bit number."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def feature_names(mask: int, names: dict[int, str] | None = None) -> list[str]:
    """Names of the set bits of ``mask`` (device-type names first if given), for logs."""
    known = dict(_GENERIC_NAMES)
    if names:
        known.update(names)
    out = []
    for bit in range(128):
        if mask >> bit & 1:
            out.append(known.get(bit, f"bit{bit}"))
    return out


_GENERIC_NAMES = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC",
    VIRTIO_F_RING_EVENT_IDX: "RING_EVENT_IDX",
    VIRTIO_F_UNUSED_30: "UNUSED_30",
    VIRTIO_F_VERSION_1: "VERSION_1",
    VIRTIO_F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    VIRTIO_F_RING_PACKED: "RING_PACKED",
    VIRTIO_F_IN_ORDER: "IN_ORDER",
    VIRTIO_F_ORDER_PLATFORM: "ORDER_PLATFORM",
    VIRTIO_F_SR_IOV: "SR_IOV",
    VIRTIO_F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    VIRTIO_F_NOTIF_CONFIG_DATA: "NOTIF_CONFIG_DATA",
    VIRTIO_F_RING_RESET: "RING_RESET",
    VIRTIO_F_ADMIN_VQ: "ADMIN_VQ",
    VIRTIO_F_SUSPEND: "SUSPEND",
}
