"""Allocating and freeing one block at a time: zones, per-cpu lists, fallback, reclaim, OOM.

Free-list discipline follows Linux 6.9+ ("freelist migratetype hygiene"): a free block always
sits on the list of the migratetype of the pageblock holding its first page. Allocation
(``__rmqueue_smallest``) takes the first block of the smallest order that fits and splits it
(``expand``: upper halves go back on the lists, at the head). When a migratetype's lists are
empty, ``__rmqueue_fallback`` steals from the fallback types (unmovable -> reclaimable, movable;
movable -> reclaimable, unmovable; reclaimable -> unmovable, movable), from the largest order
down; it claims a whole pageblock (re-types it and moves its free blocks) when the block is
large enough or the request is unmovable/reclaimable and at least half of the pageblock is free,
else it takes a single block. Freeing merges with the buddy while the buddy is a free block of
the same order in the same zone (never merging a pageblock of a type without fallbacks,
highatomic or isolate, with one of another type), then puts the block at the list's tail when
the next-higher buddy is free too (Linux's ``buddy_merge_likely``) and at the head otherwise.

The highatomic lists exist (the walk visits every type) but nothing reserves highatomic
pageblocks: the model has no atomic high-order allocations. The balloon's own allocations
(``__GFP_NORETRY | __GFP_NOWARN | __GFP_NOMEMALLOC``, no direct reclaim) map to
``noretry=True``: min watermark, no reclaim, no drain, no dipping below min.
``set_migratetype_isolate`` isolates a pageblock as memory offlining does.

Order-0 allocations and frees go through per-cpu lists (``pcp``) per (cpu, zone, migratetype)
with Linux's ``batch``/``high``: an empty list is refilled with ``batch`` pages from the buddy,
a list reaching ``high`` gives ``batch`` of its coldest pages back. Pages there are free but not
on the buddy lists (so ``nr_free_pages()``, Linux's NR_FREE_PAGES, does not count them).

The fast path needs the low watermark; then the min watermark (reclaim and compaction are not
modelled; ``noretry`` only skips the final pcp drain-and-retry).

Out of memory: when an allocation that may retry (not ``noretry``, order <= 3 as Linux's
``__alloc_pages_may_oom`` requires) still fails after reclaim and the per-cpu drain, the OOM
notifiers (``register_oom_notifier``; the balloon's deflate-on-OOM) are called; while they free
something, the allocation is retried. Nobody is killed when they free nothing: it just fails.

Memory initialisation as Linux does it, written to ``PageVersions`` (so the dirty log sees it):
``init_on_alloc`` zeroes pages on allocation, ``init_on_free`` zeroes them on free,
``page_poisoning`` writes the poison pattern on free; ``guest_model.buddy.meminit`` decides
which of them are in force (poisoning takes precedence over both).

Randomness: only the optional ``shuffle`` (page_alloc.shuffle) uses the seeded generator; with
the same seed and calls every run is identical.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from guest_model.buddy.defs import (
    FALLBACKS,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_ISOLATE,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_RECLAIMABLE,
    MIGRATE_UNMOVABLE,
    NR_ZONES,
    OOM_MAX_ROUNDS,
    OWNER_BALLOON,
    OWNER_GUEST,
    PAGE_ALLOC_COSTLY_ORDER,
    PG_ALLOC,
    PG_BALLOON,
    PG_BUDDY,
    PG_PCP,
    WMARK_HIGH,
    WMARK_LOW,
    WMARK_MIN,
    BuddyError,
    list_id,
    pageblock_nr_pages,
    pageblock_order,
)
from guest_model.buddy.freelists import FreeAreas
from guestmem.pages import ZERO
from guestmem.units import Pfn

log = logging.getLogger(__name__)
#: init_on_alloc counts the never-written pages it clears in blocks of this order or more.
FIRST_WRITE_COUNT_ORDER = pageblock_order


class ZoneAllocator(FreeAreas):
    """``alloc_pages`` / ``free_pages`` and what they lean on (see the module docstring)."""

    # ---- reclaim ----------------------------------------------------------------------------
    def register_shrinker(self, count: Callable[[], int], scan: Callable[[int], int]) -> None:
        """Add a shrinker; it runs when an allocation is about to fail (see ``alloc_pages``)."""
        self.shrinkers.append((count, scan))

    def _reclaim(self, order: int, nr_pages: int = 0) -> int:
        """Direct reclaim, reduced to what the model has: ask the shrinkers for enough pages
        to lift the zones back to their high watermark (what kswapd aims for)."""
        want = max(1 << order, nr_pages)
        for z in self._zonelist():
            zone = self.zones[z]
            want += max(0, zone.watermark[WMARK_HIGH] - self._zone_free[z])
        freed = 0
        for count, scan in list(self.shrinkers):
            if freed >= want:
                break
            avail = count()
            if avail > 0:
                freed += max(0, scan(min(avail, want - freed)))
        self.counters["reclaim_runs"] += 1
        self.counters["reclaimed_pages"] += freed
        return freed

    def register_oom_notifier(self, notify: Callable[[], int]) -> None:
        """Add an OOM notifier (Linux ``register_oom_notifier``): called when an allocation is
        about to fail after reclaim; returns the pages it freed."""
        self.oom_notifiers.append(notify)

    def _out_of_memory(self) -> int:
        """out_of_memory() reduced to its notifier chain; pages the notifiers freed."""
        freed = 0
        for notify in list(self.oom_notifiers):
            freed += max(0, int(notify()))
        self.counters["oom_runs"] += 1
        self.counters["oom_freed_pages"] += freed
        return freed

    # ---- allocation -------------------------------------------------------------------------
    def _expand(self, pfn: int, low: int, high: int) -> None:
        """Give back the upper halves of a block of order ``high`` split down to ``low``."""
        while high > low:
            high -= 1
            half = pfn + (1 << high)
            self._list_add(half, high, self._lid_of_block(half, high))

    def _rmqueue_smallest(self, z: int, order: int, mt: int) -> int | None:
        first = self._first
        for co in range(order, MAX_ORDER):
            lid = list_id(z, co, mt)
            pfn = first[lid]
            if pfn >= 0:
                self._list_del(pfn, co, lid)
                self._expand(pfn, order, co)
                return pfn
        return None

    def _can_steal(self, order: int, start_mt: int) -> bool:
        if order >= pageblock_order:
            return True
        return (order >= pageblock_order // 2 or start_mt == MIGRATE_RECLAIMABLE
                or start_mt == MIGRATE_UNMOVABLE)

    def _find_fallback(self, z: int, order: int, start_mt: int) -> int:
        for fmt in FALLBACKS[start_mt]:
            if self._count[list_id(z, order, fmt)]:
                return fmt
        return -1

    def _set_pageblocks(self, pfn: int, order: int, mt: int) -> None:
        first_pb = pfn >> pageblock_order
        n_pb = max(1, (1 << order) >> pageblock_order)
        self.pageblock_mt[first_pb:first_pb + n_pb] = mt

    def _move_freepages_block(self, pb: int, mt: int) -> int:
        """Re-type pageblock ``pb`` to ``mt`` and move its free blocks there; pages moved."""
        start = pb << pageblock_order
        end = min(start + pageblock_nr_pages, self.ram_pages)
        heads = np.flatnonzero(self.buddy_order[start:end] >= 0) + start
        moved = []
        for h in heads.tolist():
            o = self._bo[h]
            # move_to_free_list keeps PageReported: remember it across the unlink.
            rep = o >= pageblock_order and self._rp[h >> pageblock_order]
            self._list_del(h, o, self._lid_of_block(h, o))
            moved.append((h, o, rep))
        self._pb[pb] = mt
        z = self.zone_of(start)
        nr = 0
        for h, o, rep in moved:
            lid = list_id(z, o, mt)
            self._list_add(h, o, lid)
            if rep:
                self._mark_reported(h, lid)
            nr += 1 << o
        return nr

    def _rmqueue_fallback(self, z: int, order: int, start_mt: int) -> int | None:
        """Steal for ``start_mt`` from another type; returns an allocated block or None."""
        found = -1
        co = MAX_ORDER - 1
        # Prefer the largest fallback block: stealing big keeps types apart (Linux's reasoning).
        while co >= order:
            fmt = self._find_fallback(z, co, start_mt)
            if fmt != -1:
                if self._can_steal(co, start_mt):
                    found = fmt
                break
            co -= 1
        if found == -1:
            # No block worth claiming: take the smallest suitable one instead.
            for co in range(order, MAX_ORDER):
                fmt = self._find_fallback(z, co, start_mt)
                if fmt != -1:
                    found = fmt
                    break
            if found == -1:
                return None
            pfn = self._first[list_id(z, co, found)]
            self.counters["fallback_steal"] += 1
            self._list_del(pfn, co, list_id(z, co, found))
            self._expand(pfn, order, co)
            return pfn
        pfn = self._first[list_id(z, co, found)]
        self.counters["fallback_steal"] += 1
        if co >= pageblock_order:
            # The whole block changes type, with every pageblock it covers.
            self._list_del(pfn, co, list_id(z, co, found))
            self._set_pageblocks(pfn, co, start_mt)
            self._list_add(pfn, co, list_id(z, co, start_mt))
            self.counters["pageblock_claim"] += 1
        else:
            pb = pfn >> pageblock_order
            start = pb << pageblock_order
            end = min(start + pageblock_nr_pages, self.ram_pages)
            free_in_block = int(np.count_nonzero(self.state[start:end] == PG_BUDDY))
            if free_in_block >= pageblock_nr_pages // 2:
                self._move_freepages_block(pb, start_mt)
                self.counters["pageblock_claim"] += 1
            else:
                self._list_del(pfn, co, list_id(z, co, found))
                self._expand(pfn, order, co)
                return pfn
        return self._rmqueue_smallest(z, order, start_mt)

    def _rmqueue(self, z: int, order: int, mt: int) -> int | None:
        pfn = self._rmqueue_smallest(z, order, mt)
        if pfn is None:
            pfn = self._rmqueue_fallback(z, order, mt)
        return pfn

    def _rmqueue_pcp(self, cpu: int, z: int, mt: int) -> int | None:
        lst = self.pcp[cpu][z][mt]
        if not lst:
            batch = self.zones[z].pcp_batch
            self.counters["pcp_refill"] += 1
            got = 0
            for _ in range(batch):
                p = self._rmqueue(z, 0, mt)
                if p is None:
                    break
                self._st[p] = PG_PCP
                lst.append(p)
                got += 1
            self._pcp_count[cpu][z] += got
            if not lst:
                return None
        self._pcp_count[cpu][z] -= 1
        return lst.popleft()

    def _try_zones(self, order: int, mt: int, cpu: int, mark: int) -> int | None:
        for z in self._zonelist():
            if not self.zone_watermark_ok(z, order, mark):
                continue
            pfn = self._rmqueue_pcp(cpu, z, mt) if order == 0 else self._rmqueue(z, order, mt)
            if pfn is not None:
                return pfn
        return None

    def _check_args(self, order: int, cpu: int) -> None:
        if not 0 <= order < MAX_ORDER:
            raise BuddyError(f"order={order}: must be 0..{MAX_ORDER - 1}")
        if not 0 <= cpu < self.nr_cpus:
            raise BuddyError(f"cpu={cpu}: guest has {self.nr_cpus} cpus")

    def alloc_pages(self, order: int, migratetype: int = MIGRATE_MOVABLE, *, cpu: int = 0,
                    noretry: bool = False, owner: int = OWNER_GUEST) -> Pfn | None:
        """Allocate 2**order pages; the first pfn, or None when no zone can satisfy it."""
        self._check_args(order, cpu)
        if migratetype not in FALLBACKS:
            raise BuddyError(f"migratetype={migratetype}: only unmovable/movable/reclaimable")
        if owner not in (OWNER_GUEST, OWNER_BALLOON):
            raise BuddyError(f"owner={owner}: OWNER_GUEST or OWNER_BALLOON")
        pfn = self._try_zones(order, migratetype, cpu, WMARK_LOW)
        if pfn is None:
            pfn = self._try_zones(order, migratetype, cpu, WMARK_MIN)
        if pfn is None and not noretry:
            # Slow path. Direct reclaim: in this model only shrinkers (e.g. the balloon's hint
            # blocks) give memory back. __GFP_NORETRY callers (the balloon itself) skip it, so
            # a balloon allocation never feeds on the balloon's own blocks.
            if self.shrinkers and self._reclaim(order):
                pfn = self._try_zones(order, migratetype, cpu, WMARK_MIN)
            if pfn is None and self.nr_pcp_pages():
                # The last resort before OOM: drain per-cpu lists and retry.
                self.drain_pcp()
                pfn = self._try_zones(order, migratetype, cpu, WMARK_MIN)
            if pfn is None and order <= PAGE_ALLOC_COSTLY_ORDER and self.oom_notifiers:
                # __alloc_pages_may_oom (never for costly orders): the notifiers give pages
                # back (deflate on OOM); each time they do, the allocation is tried again.
                for _ in range(OOM_MAX_ROUNDS):
                    if not self._out_of_memory():
                        break
                    pfn = self._try_zones(order, migratetype, cpu, WMARK_MIN)
                    if pfn is not None:
                        break
        if pfn is None:
            self.counters["alloc_fail"] += 1
            log.debug("alloc_pages(order=%d, mt=%d) failed: %d pages free", order, migratetype,
                      self.nr_free_pages())
            return None
        n = 1 << order
        self.state[pfn:pfn + n] = owner
        self.counters["alloc"] += 1
        if self.init_on_alloc and self.pages is not None:
            if order >= FIRST_WRITE_COUNT_ORDER:
                self._count_first_writes(self.pages.version[pfn:pfn + n])
            self.pages.write_range(pfn, n, "zero")
        return Pfn(pfn)

    def _count_first_writes(self, versions: np.ndarray) -> None:
        """init_on_alloc is about to clear pages with these versions: count those still zero
        since boot, never written. Under TCG with file-backed RAM the host backs each on that
        first write (a host page fault), which costs far more than clearing a resident page
        (the balloon's capture pays it, docs/cost-model.md). Large blocks only (the hint
        blocks), off the small allocations' hot path."""
        k = int(np.count_nonzero(versions == ZERO))
        if k:
            c = self.counters
            c["zeroed_first_write_pages"] = c.get("zeroed_first_write_pages", 0) + k

    # ---- freeing ----------------------------------------------------------------------------
    def _buddy_merge_likely(self, pfn: int, order: int, zend: int) -> bool:
        """Whether the block just freed will probably merge soon: its parent's buddy is free."""
        if order >= MAX_ORDER - 2:
            return False
        parent = pfn & ~((1 << (order + 1)) - 1)
        higher_buddy = parent ^ (1 << (order + 1))
        return higher_buddy < zend and self._bo[higher_buddy] == order + 1

    def _free_one(self, pfn: int, order: int, to_tail: bool = False,
                  notify: bool = False) -> None:
        """Merge a freed block (pages already marked PG_BUDDY) and put it on its list;
        ``to_tail`` is Linux's FPI_TO_TAIL (used when putting back an isolated block);
        ``notify``: a real free (not a putback), which tells the free notifiers."""
        zs, ze = self._zone_bounds[self.zone_of(pfn)]
        bo, pb = self._bo, self._pb
        while order < MAX_ORDER - 1:
            b = pfn ^ (1 << order)
            if b < zs or b + (1 << order) > ze or bo[b] != order:
                break
            if order >= pageblock_order:
                mt, bmt = pb[pfn >> pageblock_order], pb[b >> pageblock_order]
                if mt != bmt and (mt >= MIGRATE_PCPTYPES or bmt >= MIGRATE_PCPTYPES):
                    break  # never mix highatomic/isolate pageblocks with others
            self._list_del(b, order, self._lid_of_block(b, order))
            if order >= pageblock_order and b > pfn:
                # The merged block's pageblocks all take the type of its first one, so that
                # a later split puts each half on a list matching its pageblock.
                self._set_pageblocks(b, order, pb[pfn >> pageblock_order])
            elif order >= pageblock_order:
                self._set_pageblocks(pfn, order, pb[b >> pageblock_order])
            pfn &= b
            order += 1
        lid = self._lid_of_block(pfn, order)
        if to_tail:
            tail = True
        elif self.shuffle and order >= MAX_ORDER - 1:
            tail = bool(self.rng.integers(2))  # shuffle_pick_tail()
        else:
            tail = self._buddy_merge_likely(pfn, order, ze)
        self._list_add(pfn, order, lid, tail)
        if notify and order >= pageblock_order and self.free_notifiers:
            self._notify_free(order)

    def _check_free(self, pfn: int, order: int) -> None:
        n = 1 << order
        if pfn < 0 or pfn + n > self.ram_pages:
            raise BuddyError(f"free_pages(pfn={pfn:#x}, order={order}): outside RAM")
        if pfn & (n - 1):
            raise BuddyError(f"free_pages(pfn={pfn:#x}, order={order}): not aligned to the order")
        st = self.state[pfn:pfn + n]
        if n == 1:
            ok = st[0] == PG_ALLOC or st[0] == PG_BALLOON
        else:
            ok = bool(np.all((st == PG_ALLOC) | (st == PG_BALLOON)))
        if not ok:
            raise BuddyError(f"free_pages(pfn={pfn:#x}, order={order}): pages not allocated "
                             f"(states {sorted(set(st.tolist()))}): double free or reserved")

    def _free_prepare(self, pfn: int, n: int) -> None:
        if self.pages is None:
            return
        if self.page_poisoning:
            self.pages.write_range(pfn, n, "poison")
        elif self.init_on_free:
            self.pages.write_range(pfn, n, "zero")

    def free_pages(self, pfn: int, order: int, *, cpu: int = 0) -> None:
        """Free 2**order allocated pages starting at ``pfn`` (raises BuddyError on misuse)."""
        self._check_args(order, cpu)
        self._check_free(pfn, order)
        n = 1 << order
        self._free_prepare(pfn, n)
        self.counters["free"] += 1
        mt = self._pb[pfn >> pageblock_order]
        if order == 0 and mt != MIGRATE_ISOLATE:
            if mt >= MIGRATE_PCPTYPES:
                mt = MIGRATE_MOVABLE  # highatomic pages ride the movable pcp list
            z = self.zone_of(pfn)
            self._st[pfn] = PG_PCP
            self.pcp[cpu][z][mt].appendleft(pfn)
            self._pcp_count[cpu][z] += 1
            if self._pcp_count[cpu][z] >= self.zones[z].pcp_high:
                self._free_pcppages_bulk(cpu, z, self.zones[z].pcp_batch)
            return
        self.state[pfn:pfn + n] = PG_BUDDY
        self._free_one(pfn, order, notify=True)

    def _free_pcppages_bulk(self, cpu: int, z: int, count: int) -> None:
        """Give ``count`` cold pages of one cpu's zone lists back to the buddy, round-robin."""
        self.counters["pcp_flush"] += 1
        lists = self.pcp[cpu][z]
        while count > 0 and self._pcp_count[cpu][z] > 0:
            for lst in lists:
                if lst and count > 0:
                    p = lst.pop()
                    self._pcp_count[cpu][z] -= 1
                    count -= 1
                    self._st[p] = PG_BUDDY
                    self._free_one(p, 0, notify=True)

    def drain_pcp(self, cpu: int | None = None) -> None:
        """Return every per-cpu page (of one cpu, or all) to the buddy lists (drain_all_pages)."""
        cpus = range(self.nr_cpus) if cpu is None else (cpu,)
        for c in cpus:
            for z in range(NR_ZONES):
                if self._pcp_count[c][z]:
                    self._free_pcppages_bulk(c, z, self._pcp_count[c][z])

    # ---- pageblock isolation -------------------------------------------------------------
    def set_migratetype_isolate(self, pfn: int) -> int:
        """Isolate the pageblock holding ``pfn`` (``start_isolate_page_range`` for one block):
        its free blocks move to the isolate lists, nothing is allocated from it, pages freed
        into it stay there. Returns the previous migratetype (for ``unset``). A max-order free
        block spanning two pageblocks is split first so the other half keeps its type."""
        pb = pfn >> pageblock_order
        old = self._pb[pb]
        if old == MIGRATE_ISOLATE:
            return old
        start = pb << pageblock_order
        mb = start & ~(MAX_ORDER_NR_PAGES - 1)
        if self._bo[mb] == MAX_ORDER - 1:
            self._list_del(mb, MAX_ORDER - 1, self._lid_of_block(mb, MAX_ORDER - 1))
            for h in (mb, mb + pageblock_nr_pages):
                self._list_add(h, pageblock_order, self._lid_of_block(h, pageblock_order))
        self._move_freepages_block(pb, MIGRATE_ISOLATE)
        # As Linux does after isolating: per-cpu pages of the block must not be handed out
        # again from a pcp list, so they go back to the buddy (onto the isolate lists).
        self.drain_pcp()
        return old

    def unset_migratetype_isolate(self, pfn: int, migratetype: int = MIGRATE_MOVABLE) -> None:
        """Undo ``set_migratetype_isolate``: the pageblock and its free blocks get
        ``migratetype`` back, and free blocks merge with their buddies again."""
        if migratetype not in FALLBACKS:
            raise BuddyError(f"migratetype={migratetype}: only unmovable/movable/reclaimable")
        pb = pfn >> pageblock_order
        if self._pb[pb] != MIGRATE_ISOLATE:
            return
        self._move_freepages_block(pb, migratetype)
        start = pb << pageblock_order
        mb = start & ~(MAX_ORDER_NR_PAGES - 1)
        # Re-merge: take the block's free pageblock-sized pieces off and free them again.
        for h in (mb, mb + pageblock_nr_pages):
            if h < self.ram_pages and self._bo[h] == pageblock_order:
                self._list_del(h, pageblock_order, self._lid_of_block(h, pageblock_order))
                self._free_one(h, pageblock_order)

