"""Free page reporting's side of the allocator: isolating free blocks and putting them back.

Free page reporting (Linux ``mm/page_reporting.c``; the driver side is
``guest_model.reporting``) is told of frees that leave a block of order >= ``pageblock_order``
(``register_free_notifier``) and uses ``isolate_free_block`` / ``putback_block``: the first
unreported free block of an order is unlinked without touching its pages
(``__isolate_free_page``: no init_on_alloc zeroing, no poison check, only the min watermark plus
the block must stay free), and later returned to the *tail* of its list
(``__putback_isolated_page``), merging as any free would; if it did not merge, it is marked
reported, so the next pass skips it until it is allocated again.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from guest_model.buddy.defs import (
    MAX_ORDER,
    MIGRATE_ISOLATE,
    MIGRATE_TYPES,
    PG_BUDDY,
    PG_ISOLATED,
    WMARK_MIN,
    BuddyError,
    list_id,
    pageblock_order,
)
from guest_model.buddy.pagealloc import ZoneAllocator
from guestmem.units import Pfn


class ReportingIsolation(ZoneAllocator):
    """``isolate_free_block`` / ``putback_block`` and the reported marks' queries."""

    def register_free_notifier(self, notify: Callable[[int], None]) -> None:
        """Call ``notify(order)`` whenever a free (``free_pages``, a per-cpu flush, a bulk
        free) leaves a free block of order >= ``pageblock_order`` after merging: Linux's
        ``page_reporting_notify_free`` hook. Boot, splits and ``putback_block`` do not notify
        (FPI_SKIP_REPORT_NOTIFY). ``notify`` must not call back into the allocator."""
        self.free_notifiers.append(notify)

    def nr_unreported_blocks(self, zone: int, order: int, migratetype: int) -> int:
        """Free blocks on one list not marked reported."""
        lid = list_id(zone, order, migratetype)
        return self._count[lid] - self._nr_reported[lid]

    def is_reported(self, pfn: int) -> bool:
        """Whether ``pfn`` heads a free block marked reported (Linux ``PageReported``)."""
        return self._bo[pfn] >= pageblock_order and bool(self._rp[pfn >> pageblock_order])

    def nr_reported_pages(self) -> int:
        """Pages in free blocks marked reported (Linux's ``zone->reported_pages``, summed)."""
        total = 0
        for lid, k in enumerate(self._nr_reported):
            if k:
                total += k << ((lid // MIGRATE_TYPES) % MAX_ORDER)
        return total

    def isolate_free_block(self, order: int, *, zone: int | None = None,
                           migratetype: int | None = None,
                           skip_reported: bool = True) -> Pfn | None:
        """Take one free block of exactly ``order`` off its free list without touching its
        pages (Linux ``__isolate_free_page`` as page reporting uses it); its first pfn, or None.

        Zones low to high (or only ``zone``), migratetypes in order (or only ``migratetype``),
        the isolate type skipped; within a list the first block not yet reported (with
        ``skip_reported``), in list order. The zone must keep more than its min watermark plus
        the block free. The pages become ``PG_ISOLATED`` (not free, not in use, never written)
        until ``putback_block``.
        """
        if not pageblock_order <= order < MAX_ORDER:
            raise BuddyError(f"isolate_free_block(order={order}): only orders "
                             f"{pageblock_order}..{MAX_ORDER - 1} (page reporting's)")
        zones = self._zone_bounds if zone is None else [self._zone_bounds[zone]]
        for zs, ze in zones:
            if ze <= zs:
                continue
            z = self.zone_of(zs)
            if self._zone_free[z] <= self.zones[z].watermark[WMARK_MIN] + (1 << order):
                continue
            for mt in range(MIGRATE_TYPES) if migratetype is None else (migratetype,):
                if mt == MIGRATE_ISOLATE:
                    continue
                lid = list_id(z, order, mt)
                k = self._count[lid]
                if k == 0 or (skip_reported and self._nr_reported[lid] >= k):
                    continue
                p = self._first[lid]
                for _ in range(k):  # bounded by the list's length
                    if p < 0:
                        break
                    if not (skip_reported and self._rp[p >> pageblock_order]):
                        self._list_del(p, order, lid)
                        self.state[p:p + (1 << order)] = PG_ISOLATED
                        self.counters["isolated_blocks"] += 1
                        return Pfn(p)
                    p = self.link_next(p)
        return None

    def putback_block(self, pfn: int, order: int, *, reported: bool = False) -> None:
        """Return a block taken with ``isolate_free_block`` (``__putback_isolated_page``): to
        the tail of its list, merging with free buddies; nothing is written to its pages. With
        ``reported``, a block that did not merge is marked reported (page_reporting_drain)."""
        n = 1 << order
        if not pageblock_order <= order < MAX_ORDER or pfn < 0 or pfn + n > self.ram_pages \
                or pfn & (n - 1):
            raise BuddyError(f"putback_block(pfn={pfn:#x}, order={order}): not an isolated "
                             "block's place")
        st = self.state[pfn:pfn + n]
        if not bool(np.all(st == PG_ISOLATED)):
            raise BuddyError(f"putback_block(pfn={pfn:#x}, order={order}): pages not isolated "
                             f"(states {sorted(set(st.tolist()))})")
        st[:] = PG_BUDDY
        self.counters["putback_blocks"] += 1
        self._free_one(pfn, order, to_tail=True)
        if reported and self._bo[pfn] == order:
            self._mark_reported(pfn, self._lid_of_block(pfn, order))

