"""The buddy allocator's vocabulary: Linux's constants, list ids and sentinels, zones.

Names follow Linux (``MAX_ORDER``, ``pageblock_order``, ``MIGRATE_*``, ``ZONE_*``,
``free_area[order].free_list[migratetype]``). Every free list of every zone has one integer id
(``list_id``); a list's end is marked by a negative sentinel naming its head (``list_sentinel``),
as a kernel list ends at the ``list_head`` embedded in ``struct zone``. Page states (``PG_*``)
are the values of the allocator's per-page ``state`` array.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guestmem.units import bytes_to_pages
from protocol.errors import UsageError

if TYPE_CHECKING:
    from guest_model.buddy.freelists import FreeAreas

# ---- constants (Linux names) -------------------------------------------------------------
MAX_ORDER = 11  # orders 0..10; a max-order block is 4 MiB
pageblock_order = 9
pageblock_nr_pages = 1 << pageblock_order
MAX_ORDER_NR_PAGES = 1 << (MAX_ORDER - 1)

MIGRATE_UNMOVABLE = 0
MIGRATE_MOVABLE = 1
MIGRATE_RECLAIMABLE = 2
MIGRATE_PCPTYPES = 3  # the types with per-cpu lists
MIGRATE_HIGHATOMIC = 3
MIGRATE_ISOLATE = 4
MIGRATE_TYPES = 5

# Linux's fallbacks[] table: where each allocatable type may steal from, in order.
FALLBACKS: dict[int, tuple[int, int]] = {
    MIGRATE_UNMOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_MOVABLE),
    MIGRATE_MOVABLE: (MIGRATE_RECLAIMABLE, MIGRATE_UNMOVABLE),
    MIGRATE_RECLAIMABLE: (MIGRATE_UNMOVABLE, MIGRATE_MOVABLE),
}

ZONE_DMA = 0
ZONE_DMA32 = 1
ZONE_NORMAL = 2
NR_ZONES = 3
ZONE_NAMES = ("DMA", "DMA32", "Normal")
# x86-64 zone limits: 16 MiB and 4 GiB, in pfns. Both are multiples of a max-order block, so a
# buddy block never straddles two zones.
ZONE_END_PFN = (bytes_to_pages(16 << 20), bytes_to_pages(4 << 30), None)

# Page states (the ``state`` array).
PG_RESERVED = 0
PG_BUDDY = 1
PG_PCP = 2
PG_ALLOC = 3
PG_BALLOON = 4
PG_ISOLATED = 5
OWNER_GUEST = PG_ALLOC
OWNER_BALLOON = PG_BALLOON

WMARK_MIN, WMARK_LOW, WMARK_HIGH = 0, 1, 2
LOWMEM_RESERVE_RATIO = (256, 256, 32)  # sysctl_lowmem_reserve_ratio
WATERMARK_SCALE_FACTOR = 10  # sysctl default, in 1/10000 of a zone
PAGE_ALLOC_COSTLY_ORDER = 3
# Bound on OOM-notifier-and-retry rounds of one allocation. Each round that continues freed at
# least one page, so this only guards against a notifier that lies.
OOM_MAX_ROUNDS = 4096



class BuddyError(UsageError):
    """A caller misused the allocator (double free, bad order, freeing reserved memory)."""


def list_id(zone: int, order: int, migratetype: int) -> int:
    """Index of ``zone.free_area[order].free_list[migratetype]`` among all lists."""
    return (zone * MAX_ORDER + order) * MIGRATE_TYPES + migratetype


NR_LISTS = NR_ZONES * MAX_ORDER * MIGRATE_TYPES


def list_sentinel(lid: int) -> int:
    """The link value that means "the head of list ``lid``" (always negative)."""
    return -1 - lid


@dataclass
class Zone:
    """One zone's fixed facts and watermarks (free counts live in the allocator's arrays)."""

    idx: int
    name: str
    start_pfn: int
    end_pfn: int  # exclusive; spanned = end - start
    managed_pages: int = 0
    watermark: list[int] = field(default_factory=lambda: [0, 0, 0])  # min, low, high
    lowmem_reserve: list[int] = field(default_factory=lambda: [0, 0, 0])
    pcp_batch: int = 1
    pcp_high: int = 6
    # The allocator owning the zone, so that Linux-shaped calls taking only a zone
    # (``report_free_page_block(zone, ...)``) can reach the free lists.
    allocator: FreeAreas | None = field(default=None, repr=False, compare=False)

    @property
    def populated(self) -> bool:
        return self.managed_pages > 0


def blocks_of_range(start: int, end: int) -> list[tuple[int, int]]:
    """Maximal aligned power-of-two blocks covering [start, end), low to high
    (``__free_pages_memory``)."""
    out: list[tuple[int, int]] = []
    while start < end:
        order = min(MAX_ORDER - 1, (start & -start).bit_length() - 1 if start else MAX_ORDER - 1)
        while start + (1 << order) > end:
            order -= 1
        out.append((start, order))
        start += 1 << order
    return out


