"""virtio-balloon (device ID 5) layouts and constants (protocol.md sections 3 and 4).

Config space, little-endian even for legacy drivers::

    0x0 num_pages le32 | 0x4 actual le32 | 0x8 free_page_hint_cmd_id le32 | 0xC poison_val le32

Statistics entry, packed 10 bytes: ``| tag le16 | val le64 |``.
"""
from __future__ import annotations

import enum

from construct import Int16ul, Int32ul, Int64ul, Struct

# Feature bits (protocol.md 3.1).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5  # spec name: VIRTIO_BALLOON_F_PAGE_REPORTING
VIRTIO_BALLOON_F_PAGE_REPORTING = VIRTIO_BALLOON_F_REPORTING
#: An RFC's "wait for the host's ack" bit. Not in the spec and with no rule in protocol.md:
#: the device does not implement it, ``DeviceConfig`` refuses to offer it, and it has no name
#: in ``BALLOON_FEATURE_NAMES`` (so ``serve --features`` does not accept it).
VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL = 6

BALLOON_FEATURE_NAMES = {
    VIRTIO_BALLOON_F_MUST_TELL_HOST: "MUST_TELL_HOST",
    VIRTIO_BALLOON_F_STATS_VQ: "STATS_VQ",
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM",
    VIRTIO_BALLOON_F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
    VIRTIO_BALLOON_F_PAGE_POISON: "PAGE_POISON",
    VIRTIO_BALLOON_F_REPORTING: "REPORTING",
}

# free_page_hint_cmd_id values (protocol.md 4.1).
VIRTIO_BALLOON_CMD_ID_STOP = 0
VIRTIO_BALLOON_CMD_ID_DONE = 1
#: QEMU's first command id: the counter starts at 0x80000000 and is pre-incremented.
QEMU_FIRST_CMD_ID = 0x80000001
QEMU_CMD_ID_MIN = 0x80000000

#: Inflate/deflate PFNs are in 4 KiB units whatever the guest page size.
VIRTIO_BALLOON_PFN_SHIFT = 12
#: Linux hints order-10 blocks on x86-64 (4 MiB).
VIRTIO_BALLOON_HINT_BLOCK_ORDER = 10
HINT_BLOCK_BYTES = 1 << (VIRTIO_BALLOON_HINT_BLOCK_ORDER + 12)
#: Linux: at most 256 PFNs per inflate/deflate buffer.
VIRTIO_BALLOON_ARRAY_PFNS_MAX = 256

# Config-space field offsets (protocol.md 3.2).
CFG_NUM_PAGES = 0x0
CFG_ACTUAL = 0x4
CFG_FREE_PAGE_HINT_CMD_ID = 0x8
CFG_POISON_VAL = 0xC

VirtioBalloonConfig = Struct(
    "num_pages" / Int32ul,
    "actual" / Int32ul,
    "free_page_hint_cmd_id" / Int32ul,
    "poison_val" / Int32ul,
)

#: A hint-session command buffer (start or stop): exactly one le32.
FreePageHintCmd = Struct("cmd_id" / Int32ul)


class StatTag(enum.IntEnum):
    """Statistics tags (protocol.md 3.5). 10-15 exist in Linux >= 6.12 only."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


VirtioBalloonStat = Struct("tag" / Int16ul, "val" / Int64ul)
STAT_ENTRY_SIZE = 10

# Queue sizes QEMU uses (protocol.md 3.3).
QEMU_QUEUE_SIZE = 128
QEMU_FREE_PAGE_QUEUE_SIZE = 1024
QEMU_REPORTING_QUEUE_SIZE = 32


class BalloonQueue(enum.IntEnum):
    """Logical balloon queues in the spec's fixed order (protocol.md 3.3)."""

    INFLATE = 0
    DEFLATE = 1
    STATS = 2
    FREE_PAGE = 3
    REPORTING = 4


def config_size(offered_features: int) -> int:
    """Config window size as QEMU sizes it from *offered* features (protocol.md 3.2)."""
    if offered_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1:
        return 16
    if offered_features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        return 12
    return 8


def queue_layout(features: int, *, fixed: bool = False) -> dict[BalloonQueue, int]:
    """Map logical queues to transport indices (protocol.md 3.3).

    Compacted (default, what Linux and QEMU do): 0 inflate, 1 deflate, then stats, free_page,
    reporting, each only if its feature bit is set in ``features``. ``fixed=True`` gives the
    spec's literal numbering 0..4 (queues still exist only with their feature).
    """
    layout = {BalloonQueue.INFLATE: 0, BalloonQueue.DEFLATE: 1}
    optional = (
        (BalloonQueue.STATS, VIRTIO_BALLOON_F_STATS_VQ),
        (BalloonQueue.FREE_PAGE, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        (BalloonQueue.REPORTING, VIRTIO_BALLOON_F_REPORTING),
    )
    nxt = 2
    for q, bit in optional:
        if features >> bit & 1:
            layout[q] = int(q) if fixed else nxt
            nxt += 1
    return layout
