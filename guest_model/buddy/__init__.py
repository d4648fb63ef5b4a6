"""The page allocator of a simulated Linux x86-64 guest: a zoned buddy allocator in numpy arrays.

Theory of operation
-------------------
RAM is ``[0, ram_pages)`` in 4 KiB pages, split by physical address into zones as on x86-64:
ZONE_DMA below 16 MiB, ZONE_DMA32 below 4 GiB, ZONE_NORMAL above. Each zone has
``free_area[order].free_list[migratetype]`` for orders ``0 .. MAX_ORDER-1`` (MAX_ORDER = 11,
the name the 2017 seed used; newer kernels call the top order MAX_PAGE_ORDER = 10) and the five
migratetypes. A free block of order *k* starts at a pfn aligned to 2**k.

``BuddyAllocator`` is one object assembled from one class per job, each in its own module:

* ``defs``: Linux's constants, list ids and sentinels, ``Zone``, ``BuddyError``;
* ``meminit``: which of init_on_alloc, init_on_free and page poisoning is in force;
* ``freelists.FreeAreas``: the per-page arrays, list heads and counts, zones and watermarks,
  boot, the list primitives, read-only views and the consistency check;
* ``pagealloc.ZoneAllocator``: ``alloc_pages`` / ``free_pages`` one block at a time (per-cpu
  lists, migratetype fallback, reclaim through shrinkers, OOM notifiers, pageblock isolation);
* ``reporting.ReportingIsolation``: free page reporting's isolate and putback;
* ``bulk_alloc.BulkAlloc`` and ``bulk_free.BulkFree``: the numpy bulk calls, held to the
  one-at-a-time code by twin tests.

Each module's docstring explains its part.
"""
from __future__ import annotations

from guest_model.buddy.bulk_alloc import BulkAlloc
from guest_model.buddy.bulk_free import BulkFree, run_blocks
from guest_model.buddy.defs import (
    FALLBACKS,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_HIGHATOMIC,
    MIGRATE_ISOLATE,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_RECLAIMABLE,
    MIGRATE_TYPES,
    MIGRATE_UNMOVABLE,
    NR_LISTS,
    NR_ZONES,
    OOM_MAX_ROUNDS,
    OWNER_BALLOON,
    OWNER_GUEST,
    PG_ALLOC,
    PG_BALLOON,
    PG_BUDDY,
    PG_ISOLATED,
    PG_PCP,
    PG_RESERVED,
    WMARK_HIGH,
    WMARK_LOW,
    WMARK_MIN,
    ZONE_DMA,
    ZONE_DMA32,
    ZONE_NAMES,
    ZONE_NORMAL,
    BuddyError,
    Zone,
    blocks_of_range,
    list_id,
    list_sentinel,
    pageblock_nr_pages,
    pageblock_order,
)
from guest_model.buddy.meminit import MemInit
from guest_model.buddy.reporting import ReportingIsolation

__all__ = [
    "FALLBACKS", "MAX_ORDER", "MAX_ORDER_NR_PAGES", "MIGRATE_HIGHATOMIC", "MIGRATE_ISOLATE",
    "MIGRATE_MOVABLE", "MIGRATE_PCPTYPES", "MIGRATE_RECLAIMABLE", "MIGRATE_TYPES",
    "MIGRATE_UNMOVABLE", "NR_LISTS", "NR_ZONES", "OOM_MAX_ROUNDS",
    "OWNER_BALLOON", "OWNER_GUEST", "PG_ALLOC", "PG_BALLOON", "PG_BUDDY", "PG_ISOLATED", "PG_PCP",
    "PG_RESERVED", "WMARK_HIGH", "WMARK_LOW", "WMARK_MIN", "ZONE_DMA", "ZONE_DMA32", "ZONE_NAMES",
    "ZONE_NORMAL", "BuddyAllocator", "BuddyError", "MemInit", "Zone", "blocks_of_range", "list_id",
    "list_sentinel", "pageblock_nr_pages", "pageblock_order", "run_blocks",
]


class BuddyAllocator(BulkAlloc, BulkFree, ReportingIsolation):
    """A Linux-like zoned buddy allocator over ``ram_bytes`` of guest RAM (see the module
    docstring; the constructor is ``FreeAreas.__init__``)."""
