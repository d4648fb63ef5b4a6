"""How a balloon device is built (``DeviceConfig``) and the state it keeps.

Theory of operation
-------------------
``DeviceConfig`` holds the host's choices, fixed for the device's life, and refuses a
combination the device cannot serve with ``DeviceUsageError`` (a ``UsageError``, and a
``ValueError`` for callers that catch that). ``DeviceState`` is the device's mutable,
guest-visible state apart from its queues, its hint session and its two helpers (driver checker,
legacy interface). ``QueueSlot`` is one transport queue as the driver set it up; ``Ballooned`` is
which pfns are in the balloon.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from balloon_dev.virtqueue import DeviceVirtqueue
from protocol.balloon import (
    QEMU_FREE_PAGE_QUEUE_SIZE,
    QEMU_QUEUE_SIZE,
    QEMU_REPORTING_QUEUE_SIZE,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.errors import UsageError
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_UNUSED_30,
    VIRTIO_F_VERSION_1,
    feature_mask,
)
from protocol.virtqueue import VIRTQ_MAX_SIZE


class DeviceUsageError(UsageError, ValueError):
    """The device's own caller asked for something invalid (a bad ``DeviceConfig``, a host
    request the device does not offer, a value out of its field's range)."""


#: Either ring layout; the device uses both through the same methods.
Vq = DeviceVirtqueue | PackedDeviceVirtqueue

U32_MAX = 0xFFFFFFFF
U64_MASK = (1 << 64) - 1

#: RING_PACKED is not in the default set: QEMU's virtio devices default to packed=off, so a
#: guest of a default QEMU balloon never sees packed rings; offer it explicitly to test them.
DEFAULT_OFFERED_FEATURES = feature_mask(
    VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC)



def has(features: int, bit: int) -> bool:
    """Is feature ``bit`` set in ``features``?"""
    return bool(features >> bit & 1)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How the device is built (host choices, fixed for its life)."""

    offered_features: int = DEFAULT_OFFERED_FEATURES
    #: Per logical queue (inflate, deflate, stats, free_page, reporting): QEMU's sizes.
    queue_sizes: tuple[int, int, int, int, int] = (
        QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, QEMU_FREE_PAGE_QUEUE_SIZE,
        QEMU_REPORTING_QUEUE_SIZE)
    fixed_queue_numbering: bool = False
    #: QEMU reads free_page_hint_cmd_id as 0 while START (protocol.md 5.2); default: the id.
    qemu_cmd_id_read: bool = False
    #: D-1: refuse FEATURES_OK when MUST_TELL_HOST is offered and not accepted.
    refuse_without_must_tell_host: bool = False
    #: Guest RAM size in 4 KiB pages (RAM is [0, ram_pages * 4 KiB)), if known: pfns and hint /
    #: report ranges beyond it are not RAM and are skipped and counted (QEMU skips non-RAM
    #: pfns), and descriptors may point into RAM that is not byte-backed (a simulated guest's
    #: RAM is modelled by PageVersions; V-8 is checked against RAM plus the byte-backed
    #: regions). None: buffers must lie in byte-backed regions; pfns are not bound-checked.
    ram_pages: int | None = None
    #: The legacy (virtio 0.9.5) interface instead of the modern one (``balloon_dev.legacy``):
    #: the driver sees only bits 0-31 of ``offered_features`` (so no VERSION_1;
    #: offering it is allowed, as a transitional device does on its modern interface), features
    #: are taken when written and never refused (D-2), ``actual`` is acted on once its most
    #: significant byte is written (D-5), the first stats buffer's values are ignored (D-7), and
    #: ``set_queue_legacy(q, pfn)`` places a ring from one address (protocol.md 1.7).
    #: ``refuse_without_must_tell_host`` does not apply to the legacy interface (D-2).
    legacy: bool = False

    def __post_init__(self) -> None:
        f = self.offered_features
        if not self.legacy and not has(f, VIRTIO_F_VERSION_1):
            raise DeviceUsageError("DeviceConfig.offered_features: a virtio 1.x device must offer "
                                   "VERSION_1 (bit 32); a legacy device needs legacy=True")
        if has(f, VIRTIO_F_UNUSED_30):
            raise DeviceUsageError("DeviceConfig.offered_features: bit 30 must never be offered")
        if has(f, VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL):
            # An RFC's bit with no specification (protocol.md has no rule for it): not offered.
            raise DeviceUsageError("DeviceConfig.offered_features: bit 6 (HINT_WAIT_ON_ACK, "
                                   "experimental, unspecified) is not implemented")
        if f < 0 or f > U64_MASK:
            raise DeviceUsageError(f"DeviceConfig.offered_features {f:#x} is not a 64-bit value")
        if len(self.queue_sizes) != 5:
            raise DeviceUsageError("DeviceConfig.queue_sizes needs 5 sizes (inflate, deflate, "
                                   "stats, free_page, reporting)")
        for q, n in zip(BalloonQueue, self.queue_sizes, strict=True):
            if n <= 0 or n > VIRTQ_MAX_SIZE or n & (n - 1):
                raise DeviceUsageError(f"DeviceConfig.queue_sizes[{q.name}] = {n} is not a "
                                       "power of two <= 32768")
        if self.ram_pages is not None and self.ram_pages <= 0:
            raise DeviceUsageError(f"DeviceConfig.ram_pages = {self.ram_pages} must be positive")


@dataclass(slots=True)
class QueueSlot:
    """One transport queue: its set-up as the driver wrote it and, once enabled, its ring."""

    logical: BalloonQueue
    max_size: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    configured: bool = False
    vq: Vq | None = None


@dataclass(slots=True)
class DeviceState:
    """The device's mutable, guest-visible state apart from queues and the hint session."""

    status: int = 0
    driver_features: int = 0
    num_pages: int = 0
    actual: int = 0
    poison_val: int = 0
    poison_written: bool = False
    config_generation: int = 0
    stats_head: int | None = None
    deferred_kicks: set[int] = field(default_factory=set)
