"""Wire layouts of virtqueues: the split ring (descriptor table, available ring, used ring with
their event words) and the packed-ring descriptor (protocol.md 1.2 and 1.8).

Split ring, all little-endian, N = queue size::

    descriptor (16 B)   | addr le64 | len le32 | flags le16 | next le16 |
    available ring      | flags le16 | idx le16 | ring[N] le16 ... | used_event le16 |
    used ring           | flags le16 | idx le16 | {id le32, len le32}[N] ... | avail_event le16 |

    packed descriptor   | addr le64 | len le32 | id le16 | flags le16 |
    packed event suppr. | off_wrap le16 = {desc_event_off:15, desc_event_wrap:1} | flags le16 |

The ``construct`` structs serve golden tests and slow paths; hot paths use the numpy dtypes below
over memoryviews of guest memory (same layout, checked by a test).
"""
from __future__ import annotations

import numpy as np
from construct import Array, Int16ul, Int32ul, Int64ul, Struct

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_PACKED_DESC_F_AVAIL = 1 << 7
VIRTQ_PACKED_DESC_F_USED = 1 << 15

# Packed-ring event suppression flags (protocol.md 1.8), the low two bits of its ``flags`` word.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2  # notify at the descriptor named by off_wrap (needs EVENT_IDX)

#: Largest split (and packed) queue size the spec allows.
VIRTQ_MAX_SIZE = 32768

DESC_SIZE = 16
USED_ELEM_SIZE = 8

VirtqDesc = Struct("addr" / Int64ul, "len" / Int32ul, "flags" / Int16ul, "next" / Int16ul)
VirtqUsedElem = Struct("id" / Int32ul, "len" / Int32ul)
VirtqPackedDesc = Struct("addr" / Int64ul, "len" / Int32ul, "id" / Int16ul, "flags" / Int16ul)
#: Packed-ring driver/device event suppression area (4 bytes at queue_driver / queue_device).
#: ``off_wrap`` packs the descriptor offset (bits 0-14) and the wrap counter (bit 15); see
#: ``pack_off_wrap``.
VirtqPackedEventSuppress = Struct("off_wrap" / Int16ul, "flags" / Int16ul)


def VirtqAvail(n: int) -> Struct:  # noqa: N802 - spec name
    """The available ring of a queue of size ``n``, with the trailing used_event word."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(n, Int16ul),
                  "used_event" / Int16ul)


def VirtqUsed(n: int) -> Struct:  # noqa: N802 - spec name
    """The used ring of a queue of size ``n``, with the trailing avail_event word."""
    return Struct("flags" / Int16ul, "idx" / Int16ul, "ring" / Array(n, VirtqUsedElem),
                  "avail_event" / Int16ul)


# numpy views with the same layouts, for batched ring access.
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])
PACKED_EVENT_SUPPRESS_SIZE = 4


def pack_off_wrap(off: int, wrap: int) -> int:
    """The packed-ring ``off_wrap`` word: descriptor offset in bits 0-14, wrap counter in bit 15."""
    if not 0 <= off < VIRTQ_MAX_SIZE or wrap not in (0, 1):
        raise ValueError(f"off_wrap: offset {off} must be < 32768 and wrap {wrap} 0 or 1")
    return off | wrap << 15


def unpack_off_wrap(word: int) -> tuple[int, int]:
    """(offset, wrap counter) of an ``off_wrap`` word."""
    return word & 0x7FFF, word >> 15 & 1


def desc_table_size(n: int) -> int:
    return DESC_SIZE * n


def avail_ring_size(n: int) -> int:
    """Bytes of the available ring including used_event."""
    return 6 + 2 * n


def used_ring_size(n: int) -> int:
    """Bytes of the used ring including avail_event."""
    return 6 + USED_ELEM_SIZE * n


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from old to new passes ``event_idx`` (protocol.md 1.4)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def legacy_vring_size(n: int, align: int = 4096) -> int:
    """Size of a legacy single-block ring (protocol.md 1.7), with a real round-up."""
    def up(x: int) -> int:
        return (x + align - 1) & ~(align - 1)
    return up(16 * n + 2 * (3 + n)) + up(6 + 8 * n)
