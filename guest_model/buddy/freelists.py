"""The allocator's state and its free lists: per-page numpy arrays, list heads, zones, boot.

Nothing here is a Python object per page (a 1 TiB guest has 268 M pages). Per-page state is a
handful of small numpy arrays indexed by pfn:

* ``next`` / ``prev`` (int32): the links of the doubly linked free lists, the ``lru`` field of
  Linux's ``struct page``. Only the first page of a free block carries meaningful links. The
  end of a list is not -1 but ``-(1 + list_id)``: a sentinel that names the list head, just as a
  kernel list ends at the ``list_head`` embedded in ``struct zone``. Links of a block taken off a
  list are left as they were (stale), so the seed walker's hazard of following a stale link can
  be modelled faithfully (``guest_model.walk``).
* ``buddy_order`` (int8): the order of a free block at its first page, -1 elsewhere
  (``PageBuddy`` + ``page_order`` in Linux).
* ``state`` (uint8): what each page is now: ``PG_RESERVED`` (never free: firmware, the driver
  area), ``PG_BUDDY`` (free, on a buddy free list), ``PG_PCP`` (free, on a per-cpu list: the
  buddy lists and the walk do not see it), ``PG_ALLOC`` (allocated by the guest: kernel,
  workloads), ``PG_BALLOON`` (allocated by the balloon driver, ``owner=OWNER_BALLOON``),
  ``PG_ISOLATED`` (free, but taken off the free lists by ``isolate_free_block`` while free page
  reporting tells the host about it; nothing was written to it).
  ``in_use_mask()`` (state == PG_ALLOC) is what the migration verifier needs.
* ``pageblock_mt`` (uint8, one per 2 MiB pageblock of order 9): the pageblock's migratetype.
* ``reported`` (bool, one per pageblock): Linux's ``PageReported`` of a free block of order
  >= ``pageblock_order`` (the only blocks page reporting handles on x86-64), kept at the
  pageblock of the block's first page. Taking a block off a free list for any reason
  (allocation, split, merge, isolation) clears it, as Linux's ``del_page_from_free_list`` does;
  moving a block to another migratetype's list keeps it. A per-list count of reported blocks
  lets the reporting scan skip lists that hold nothing new.

List heads, tails and counts are Python lists indexed by ``list_id`` (scalar access to them
and, through memoryviews, to the arrays is several times faster than numpy item access).

Watermarks (min/low/high) come from ``min_free_kbytes`` (``sqrt(16 * lowmem_kbytes)``), spread
over zones by size, plus ``lowmem_reserve`` (ratio 256) protecting DMA/DMA32 from allocations
that could use a higher zone. The zonelist of an allocation is Normal, DMA32, DMA.

Boot frees every non-reserved range in maximal aligned blocks (``__free_pages_memory``) with
numpy in bulk, appended in address order (``__free_pages_core`` frees to the tail), all
pageblocks movable; under page poisoning the freed pages carry the poison.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from guest_model.buddy.chains import ListChains
from guest_model.buddy.defs import (
    LOWMEM_RESERVE_RATIO,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    NR_LISTS,
    NR_ZONES,
    PG_ALLOC,
    PG_BUDDY,
    PG_PCP,
    PG_RESERVED,
    WATERMARK_SCALE_FACTOR,
    ZONE_DMA,
    ZONE_DMA32,
    ZONE_END_PFN,
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
from guest_model.buddy.links import ROW_MASK, ROW_SHIFT, PfnLinks
from guest_model.buddy.meminit import MemInit
from guestmem.pages import PageVersions
from guestmem.units import PAGE_SIZE, bytes_to_pages, gpa_to_pfn

log = logging.getLogger(__name__)


class FreeAreas:
    """The allocator's state: per-page arrays, free lists, zones, per-cpu lists, callbacks.

    ``BuddyAllocator`` (``guest_model.buddy``) adds allocation, freeing, reporting isolation
    and the bulk paths on top; this class only keeps the books and the list primitives.
    """

    def __init__(
        self,
        ram_bytes: int,
        *,
        pages: PageVersions | None = None,
        reserved: Sequence[tuple[int, int]] = (),
        seed: int = 0,
        init_on_alloc: bool = True,
        init_on_free: bool = False,
        page_poisoning: bool = False,
        nr_cpus: int = 2,
        shuffle: bool = False,
    ) -> None:
        """``reserved``: (gpa, length) byte ranges never handed out (rounded out to whole pages).
        ``pages``: page contents to write on init/poison (None: contents are not modelled)."""
        if ram_bytes < PAGE_SIZE:
            raise BuddyError(f"ram_bytes={ram_bytes}: need at least one page")
        if nr_cpus < 1:
            raise BuddyError(f"nr_cpus={nr_cpus}: need at least one cpu")
        n = bytes_to_pages(ram_bytes)
        if pages is not None and pages.ram_pages < n:
            raise BuddyError(f"pages covers {pages.ram_pages} pages, RAM has {n}")
        self.ram_pages = n
        self.pages = pages
        self.nr_cpus = nr_cpus
        self.rng = np.random.default_rng(seed)
        self.shuffle = shuffle
        # Page poisoning takes precedence over init_on_alloc / init_on_free (meminit).
        self.meminit = MemInit.resolve(init_on_alloc=init_on_alloc, init_on_free=init_on_free,
                                       page_poisoning=page_poisoning)
        self.page_poisoning = self.meminit.page_poisoning
        self.init_on_alloc = self.meminit.init_on_alloc
        self.init_on_free = self.meminit.init_on_free
        for line in self.meminit.boot_log:
            log.info("%s", line)

        idx_t = np.int32 if n < (1 << 31) - NR_LISTS - 2 else np.int64
        # Links are only meaningful at the head of a free block; stored in the row layout of
        # guest_model.buddy.links, only the blocks fragmentation reaches become resident.
        self.next = PfnLinks(n, idx_t)
        self.prev = PfnLinks(n, idx_t)
        self._top = self.next.top
        self.buddy_order = np.full(n, -1, dtype=np.int8)
        self.state = np.full(n, PG_BUDDY, dtype=np.uint8)
        self.pageblock_mt = np.full((n + pageblock_nr_pages - 1) >> pageblock_order,
                                    MIGRATE_MOVABLE, dtype=np.uint8)
        self.reported = np.zeros(self.pageblock_mt.size, dtype=np.bool_)
        # Scalar access through memoryviews is several times faster than numpy item access.
        # (Link memoryviews are indexed by slot: pfn, or top + pfn // 1024 for an aligned pfn.)
        self._nx = self.next.view
        # Runs recently spliced at list heads: bulk allocations walk them with numpy.
        self._chains = ListChains(self.next.store, self._top)
        self._pv = self.prev.view
        self._bo = self.buddy_order.data
        self._st = self.state.data
        self._pb = self.pageblock_mt.data
        self._rp = self.reported.data

        self._first = [list_sentinel(i) for i in range(NR_LISTS)]
        self._last = [list_sentinel(i) for i in range(NR_LISTS)]
        self._count = [0] * NR_LISTS
        self._nr_reported = [0] * NR_LISTS  # reported blocks per list
        self._zone_free = [0] * NR_ZONES

        self.zones: list[Zone] = []
        start = 0
        for z in range(NR_ZONES):
            end = ZONE_END_PFN[z]
            end = n if end is None else min(end, n)
            self.zones.append(Zone(z, ZONE_NAMES[z], start, max(start, end), allocator=self))
            start = max(start, end)
        self._zone_bounds = [(zz.start_pfn, zz.end_pfn) for zz in self.zones]
        self._zonelist_cache: tuple[int, ...] | None = None

        # pcp[cpu][zone][mt]: deque, left = hot end (allocate and free there), right = cold.
        self.pcp: list[list[list[deque[int]]]] = [
            [[deque() for _ in range(MIGRATE_PCPTYPES)] for _ in range(NR_ZONES)]
            for _ in range(nr_cpus)]
        self._pcp_count = [[0] * NR_ZONES for _ in range(nr_cpus)]

        self.counters: dict[str, int] = {
            "alloc": 0, "alloc_fail": 0, "free": 0, "fallback_steal": 0, "pageblock_claim": 0,
            "pcp_refill": 0, "pcp_flush": 0, "bulk_alloc_pages": 0, "bulk_free_pages": 0,
            "reclaim_runs": 0, "reclaimed_pages": 0, "isolated_blocks": 0, "putback_blocks": 0,
            "oom_runs": 0, "oom_freed_pages": 0,
        }

        # (count, scan) pairs, Linux's struct shrinker: count() -> freeable pages,
        # scan(nr_to_scan) -> pages freed. Run by "direct reclaim" (see alloc_pages).
        self.shrinkers: list[tuple[Callable[[], int], Callable[[int], int]]] = []
        # Linux's oom_notify_list: each returns the pages it freed.
        self.oom_notifiers: list[Callable[[], int]] = []
        # page_reporting_notify_free: told the order of a block >= pageblock_order that a free
        # (not a putback) left on the lists.
        self.free_notifiers: list[Callable[[int], None]] = []

        self._boot(reserved)

    # ---- boot -------------------------------------------------------------------------------
    def _boot(self, reserved: Sequence[tuple[int, int]]) -> None:
        n = self.ram_pages
        res: list[tuple[int, int]] = []
        for gpa, length in reserved:
            if length <= 0:
                continue
            first = max(0, gpa_to_pfn(gpa))
            last = min(n, gpa_to_pfn(gpa + length + PAGE_SIZE - 1))
            if first < last:
                self.state[first:last] = PG_RESERVED
                res.append((first, last))
        # Free ranges = RAM minus the (merged) reserved ranges; no per-page temporaries.
        starts_l, ends_l = [], []
        cur = 0
        for first, last in sorted(res):
            if first > cur:
                starts_l.append(cur)
                ends_l.append(first)
            cur = max(cur, last)
        if cur < n:
            starts_l.append(cur)
            ends_l.append(n)
        starts, ends = np.array(starts_l, dtype=np.int64), np.array(ends_l, dtype=np.int64)
        heads_by_list: dict[int, list[np.ndarray]] = {}
        for zone in self.zones:
            if zone.end_pfn <= zone.start_pfn:
                continue
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                s, e = max(s, zone.start_pfn), min(e, zone.end_pfn)
                if s >= e:
                    continue
                zone.managed_pages += e - s
                # Bulk middle of max-order blocks, edge blocks by hand.
                a = -(-s // MAX_ORDER_NR_PAGES) * MAX_ORDER_NR_PAGES
                b = e // MAX_ORDER_NR_PAGES * MAX_ORDER_NR_PAGES
                parts: list[tuple[int, int]] = []
                if a < b:
                    parts += blocks_of_range(s, a)
                    mid = np.arange(a, b, MAX_ORDER_NR_PAGES, dtype=np.int64)
                    parts_after = blocks_of_range(b, e)
                else:
                    mid = np.empty(0, dtype=np.int64)
                    parts += blocks_of_range(s, e)
                    parts_after = []
                for pfn, order in parts:
                    heads_by_list.setdefault(list_id(zone.idx, order, MIGRATE_MOVABLE), []).append(
                        np.array([pfn], dtype=np.int64))
                if mid.size:
                    heads_by_list.setdefault(
                        list_id(zone.idx, MAX_ORDER - 1, MIGRATE_MOVABLE), []).append(mid)
                for pfn, order in parts_after:
                    heads_by_list.setdefault(list_id(zone.idx, order, MIGRATE_MOVABLE), []).append(
                        np.array([pfn], dtype=np.int64))
        for lid, chunks in heads_by_list.items():
            heads = np.concatenate(chunks)
            heads.sort()
            self._splice_heads(lid, heads, at_tail=True)
        self._setup_watermarks()
        if self.page_poisoning and self.pages is not None:
            # Boot memory goes through free_pages_prepare too: freed pages carry the poison.
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                self.pages.write_range(s, e - s, "poison")
        # init_on_free at boot writes zeros; the simulated RAM already starts zeroed.

    def _setup_watermarks(self) -> None:
        """min_free_kbytes, per-zone min/low/high, lowmem_reserve, pcp batch/high as Linux does."""
        lowmem_kb = sum(z.managed_pages for z in self.zones) * 4
        min_free_kb = math.isqrt(lowmem_kb * 16)
        min_free_kb = max(128, min(min_free_kb, 262144))
        pages_min = min_free_kb >> 2
        total = sum(z.managed_pages for z in self.zones) or 1
        for z in self.zones:
            zmin = pages_min * z.managed_pages // total
            gap = max(zmin >> 2, z.managed_pages * WATERMARK_SCALE_FACTOR // 10000)
            z.watermark = [zmin, zmin + gap, zmin + 2 * gap]
            # zone_batchsize(): about a thousandth of the zone, at most 1 MiB, then /4 and
            # rounded to 2^n - 1 to avoid cache aliasing; high = 6 * batch.
            batch = min(z.managed_pages // 1024, bytes_to_pages(1 << 20)) // 4
            batch = max(batch, 1)
            batch = (1 << math.floor(math.log2(batch + batch // 2))) - 1 if batch > 1 else 1
            z.pcp_batch = max(batch, 1)
            z.pcp_high = 6 * z.pcp_batch
        for z in self.zones:
            for hi in range(NR_ZONES):
                above = sum(self.zones[k].managed_pages for k in range(z.idx + 1, hi + 1))
                z.lowmem_reserve[hi] = above // LOWMEM_RESERVE_RATIO[z.idx] if hi > z.idx else 0

    # ---- list primitives --------------------------------------------------------------------
    def zone_of(self, pfn: int) -> int:
        if pfn < self._zone_bounds[0][1]:
            return ZONE_DMA
        if pfn < self._zone_bounds[1][1]:
            return ZONE_DMA32
        return ZONE_NORMAL

    def _lid_of_block(self, pfn: int, order: int) -> int:
        return list_id(self.zone_of(pfn), order, self._pb[pfn >> pageblock_order])

    def _list_add(self, pfn: int, order: int, lid: int, tail: bool = False) -> None:
        nx, pv, top = self._nx, self._pv, self._top
        s = list_sentinel(lid)
        i = pfn if pfn & ROW_MASK else top + (pfn >> ROW_SHIFT)
        if tail:
            last = self._last[lid]
            pv[i] = last
            nx[i] = s
            if last < 0:
                self._first[lid] = pfn
            else:
                nx[last if last & ROW_MASK else top + (last >> ROW_SHIFT)] = pfn
            self._last[lid] = pfn
        else:
            first = self._first[lid]
            nx[i] = first
            pv[i] = s
            if first < 0:
                self._last[lid] = pfn
            else:
                pv[first if first & ROW_MASK else top + (first >> ROW_SHIFT)] = pfn
            self._first[lid] = pfn
        self._bo[pfn] = order
        self._count[lid] += 1
        self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] += 1 << order

    def _list_del(self, pfn: int, order: int, lid: int) -> None:
        """Unlink a free block. Its own links stay as they were (stale), see module docstring."""
        nx, pv, top = self._nx, self._pv, self._top
        i = pfn if pfn & ROW_MASK else top + (pfn >> ROW_SHIFT)
        n, p = nx[i], pv[i]
        if p < 0:
            self._first[lid] = n
        else:
            nx[p if p & ROW_MASK else top + (p >> ROW_SHIFT)] = n
        if n < 0:
            self._last[lid] = p
        else:
            pv[n if n & ROW_MASK else top + (n >> ROW_SHIFT)] = p
        self._bo[pfn] = -1
        self._count[lid] -= 1
        self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] -= 1 << order
        # del_page_from_free_list: a block leaving its list is no longer "reported".
        if order >= pageblock_order and self._rp[pfn >> pageblock_order]:
            self._rp[pfn >> pageblock_order] = False
            self._nr_reported[lid] -= 1

    def _splice_heads(self, lid: int, heads: np.ndarray, at_tail: bool) -> None:
        """Link many blocks of one list's order (``heads``, in list order) into list ``lid`` at
        once."""
        k = int(heads.size)
        if k == 0:
            return
        order = (lid // MIGRATE_TYPES) % MAX_ORDER
        s = list_sentinel(lid)
        self.next[heads[:-1]] = heads[1:]
        self.prev[heads[1:]] = heads[:-1]
        self.buddy_order[heads] = order
        h0, h1 = int(heads[0]), int(heads[-1])
        nx, pv = self.next, self.prev
        if at_tail:
            last = self._last[lid]
            pv[h0] = last
            nx[h1] = s
            if last < 0:
                self._first[lid] = h0
            else:
                nx[last] = h0
            self._last[lid] = h1
        else:
            first = self._first[lid]
            nx[h1] = first
            pv[h0] = s
            if first < 0:
                self._last[lid] = h1
            else:
                pv[first] = h1
            self._first[lid] = h0
        self._count[lid] += k
        self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] += k << order

    # ---- read-only views for the walker, tests and verifiers ---------------------------------
    def list_first(self, lid: int) -> int:
        """First block of list ``lid``, or its (negative) sentinel when empty."""
        return self._first[lid]

    def list_count(self, lid: int) -> int:
        return self._count[lid]

    def link_next(self, pfn: int) -> int:
        """The raw ``lru.next`` of ``pfn``: a pfn, a list sentinel, or a stale value."""
        return self._nx[pfn if pfn & ROW_MASK else self._top + (pfn >> ROW_SHIFT)]

    def page_order(self, pfn: int) -> int:
        """Order of the free block starting at ``pfn``; -1 when ``pfn`` is no free-block head."""
        return self._bo[pfn]

    def block_list_id(self, pfn: int) -> int:
        """The list a free block at ``pfn`` is on, -1 if ``pfn`` heads no free block."""
        o = self._bo[pfn]
        return -1 if o < 0 else self._lid_of_block(pfn, o)

    def free_counts(self) -> np.ndarray:
        """Free blocks per [zone, order, migratetype] (``free_area[o].nr_free`` split by type)."""
        return np.array(self._count, dtype=np.int64).reshape(NR_ZONES, MAX_ORDER, MIGRATE_TYPES)

    def nr_free_pages(self, zone: int | None = None) -> int:
        """Pages on the buddy free lists (Linux NR_FREE_PAGES: per-cpu pages not included)."""
        return sum(self._zone_free) if zone is None else self._zone_free[zone]

    def nr_pcp_pages(self) -> int:
        return sum(sum(c) for c in self._pcp_count)

    def is_free(self, pfn: int) -> bool:
        """Free in the guest's sense: on a buddy list or a per-cpu list."""
        if not 0 <= pfn < self.ram_pages:  # a negative pfn would index from the end
            raise BuddyError(f"is_free(pfn={pfn:#x}): outside RAM")
        st = self._st[pfn]
        return st == PG_BUDDY or st == PG_PCP

    def in_use_mask(self) -> np.ndarray:
        """Pages the guest uses (allocated by anyone but the balloon driver)."""
        return self.state == PG_ALLOC

    def free_mask(self) -> np.ndarray:
        return (self.state == PG_BUDDY) | (self.state == PG_PCP)

    def free_blocks(self, lid: int) -> list[int]:
        """The blocks on list ``lid`` in list order (bounded by its count: a debug/test aid)."""
        out = []
        p = self._first[lid]
        for _ in range(self._count[lid]):
            if p < 0:
                break
            out.append(p)
            p = self.link_next(p)
        return out

    # ---- watermarks -------------------------------------------------------------------------
    def zone_watermark_ok(self, z: int, order: int, mark: int,
                          highest_zone: int = ZONE_NORMAL) -> bool:
        zone = self.zones[z]
        free = self._zone_free[z] - ((1 << order) - 1)
        if free <= zone.watermark[mark] + zone.lowmem_reserve[highest_zone]:
            return False
        if order == 0:
            return True
        base = z * MAX_ORDER
        cnt = self._count
        for o in range(order, MAX_ORDER):
            b = (base + o) * MIGRATE_TYPES
            if cnt[b] or cnt[b + 1] or cnt[b + 2]:
                return True
        return False

    def _zonelist(self) -> tuple[int, ...]:
        # Populated zones, highest first; fixed once boot has counted the managed pages (an
        # allocation asks for it every time, so it is computed once).
        zl = self._zonelist_cache
        if zl is None:
            zl = self._zonelist_cache = tuple(z.idx for z in reversed(self.zones) if z.populated)
        return zl

    # ---- free page reporting ------------------------------------------------------------------
    def _mark_reported(self, pfn: int, lid: int) -> None:
        if not self._rp[pfn >> pageblock_order]:
            self._rp[pfn >> pageblock_order] = True
            self._nr_reported[lid] += 1


    def _notify_free(self, order: int) -> None:
        for fn in list(self.free_notifiers):
            fn(order)

    # ---- consistency (tests, debugging) -----------------------------------------------------
    def check(self) -> None:
        """Walk every list and cross-check counts, orders, states; raises AssertionError."""
        seen = np.zeros(self.ram_pages, dtype=np.bool_)
        zone_free = [0] * NR_ZONES
        for lid in range(NR_LISTS):
            z, rest = divmod(lid, MAX_ORDER * MIGRATE_TYPES)
            o, mt = divmod(rest, MIGRATE_TYPES)
            p = self._first[lid]
            prev = list_sentinel(lid)
            k = 0
            while p >= 0:
                assert k < self._count[lid], f"list {lid} longer than its count"
                assert self.prev[p] == prev, f"bad prev link at {p:#x}"
                assert self._bo[p] == o, f"block {p:#x} on order-{o} list has order {self._bo[p]}"
                assert self.zone_of(p) == z and p & ((1 << o) - 1) == 0
                assert self._pb[p >> pageblock_order] == mt, f"block {p:#x} on wrong type list"
                assert not seen[p:p + (1 << o)].any(), f"block {p:#x} overlaps another"
                assert np.all(self.state[p:p + (1 << o)] == PG_BUDDY)
                seen[p:p + (1 << o)] = True
                zone_free[z] += 1 << o
                prev, p = p, self.link_next(p)
                k += 1
            assert p == list_sentinel(lid), f"list {lid} ends at {p}"
            assert self._last[lid] == prev or (k == 0 and self._last[lid] == list_sentinel(lid))
            assert k == self._count[lid], f"list {lid}: {k} blocks, count {self._count[lid]}"
        assert np.array_equal(seen, self.state == PG_BUDDY), "free page not on any list"
        # Reported marks sit only on heads of free blocks of order >= pageblock_order.
        for pb in np.flatnonzero(self.reported).tolist():
            h = pb << pageblock_order
            assert self._bo[h] >= pageblock_order, f"reported mark on {h:#x}: no free block"
        nrep = [0] * NR_LISTS
        for pb in np.flatnonzero(self.reported).tolist():
            h = pb << pageblock_order
            nrep[self._lid_of_block(h, self._bo[h])] += 1
        assert nrep == self._nr_reported, "reported counts per list are wrong"
        assert zone_free == self._zone_free
        pcp = np.zeros(self.ram_pages, dtype=np.bool_)
        for c in range(self.nr_cpus):
            for z in range(NR_ZONES):
                tot = 0
                for lst in self.pcp[c][z]:
                    for p in lst:
                        assert not pcp[p] and self.zone_of(p) == z
                        pcp[p] = True
                    tot += len(lst)
                assert tot == self._pcp_count[c][z]
        assert np.array_equal(pcp, self.state == PG_PCP)
