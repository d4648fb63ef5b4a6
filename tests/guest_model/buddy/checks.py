"""Checks shared by the allocator tests. The brute-force recount reads only the per-page arrays
(``buddy_order``, ``state``, ``pageblock_mt``) and rebuilds the per-list counts from scratch,
so it does not share the allocator's bookkeeping; ``BuddyAllocator.check()`` additionally
walks every linked list.
"""
from __future__ import annotations

import numpy as np

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    NR_ZONES,
    PG_BUDDY,
    ZONE_DMA,
    ZONE_DMA32,
    ZONE_NORMAL,
    BuddyAllocator,
    pageblock_order,
)

MiB = 1 << 20


GiB = 1 << 30


def recount(a: BuddyAllocator) -> np.ndarray:
    """Free blocks per [zone, order, migratetype] from the per-page arrays alone."""
    heads = np.flatnonzero(a.buddy_order >= 0)
    orders = a.buddy_order[heads].astype(np.int64)
    zones = np.where(heads < (16 * MiB >> 12), ZONE_DMA,
                     np.where(heads < (4 * GiB >> 12), ZONE_DMA32, ZONE_NORMAL))
    mts = a.pageblock_mt[heads >> pageblock_order].astype(np.int64)
    out = np.zeros((NR_ZONES, MAX_ORDER, MIGRATE_TYPES), dtype=np.int64)
    np.add.at(out, (zones, orders, mts), 1)
    # The blocks cover exactly the pages in state PG_BUDDY, without overlap.
    cover = np.zeros(a.ram_pages, dtype=np.int64)
    for h, o in zip(heads.tolist(), orders.tolist(), strict=True):
        cover[h:h + (1 << o)] += 1
    assert cover.max(initial=0) <= 1, "free blocks overlap"
    assert np.array_equal(cover == 1, a.state == PG_BUDDY), "free blocks != PG_BUDDY pages"
    return out


def assert_maximal(a: BuddyAllocator) -> None:
    """No two free buddies of equal order are left unmerged (Linux merges on every free)."""
    heads = np.flatnonzero(a.buddy_order >= 0)
    for h in heads.tolist():
        o = int(a.buddy_order[h])
        if o == MAX_ORDER - 1:
            continue
        b = h ^ (1 << o)
        if b < a.ram_pages and a.buddy_order[b] == o and a.zone_of(b) == a.zone_of(h):
            mts = {int(a.pageblock_mt[h >> pageblock_order]),
                   int(a.pageblock_mt[b >> pageblock_order])}
            assert len(mts) > 1 and max(mts) >= MIGRATE_PCPTYPES, f"unmerged buddies {h:#x}/{b:#x}"
