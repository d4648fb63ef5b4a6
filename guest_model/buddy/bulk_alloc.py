"""Bulk allocation: many allocations at numpy speed, with the one-at-a-time result.

Each call does what many single calls would do, with the same resulting free lists (block order
along each list included: the walker and every later allocation see it, so it is part of the
simulation's determinism), but the per-block work is numpy:

* ``alloc_pages_bulk`` consumes blocks smallest-first as repeated ``__rmqueue_smallest`` does
  (the blocks an order gives up wholly are a prefix of its list, unlinked at once; at most one
  block is split). Taken pages are collected as runs: (first pfns, pages per run).
* ``alloc_blocks_bulk`` is ``alloc_pages`` of one order called many times, served in segments.

tests/guest_model/buddy/test_bulk_equivalence.py and test_alloc_blocks_bulk.py hold them to a
plain one-block-at-a-time reference, link for link.
"""
from __future__ import annotations

import numpy as np

from guest_model.buddy.defs import (
    FALLBACKS,
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_TYPES,
    OOM_MAX_ROUNDS,
    OWNER_BALLOON,
    OWNER_GUEST,
    WMARK_LOW,
    WMARK_MIN,
    ZONE_NORMAL,
    BuddyError,
    blocks_of_range,
    list_id,
    list_sentinel,
    pageblock_order,
)
from guest_model.buddy.links import ROW_MASK, ROW_SHIFT
from guest_model.buddy.pagealloc import FIRST_WRITE_COUNT_ORDER, ZoneAllocator


class BulkAlloc(ZoneAllocator):
    """The bulk allocation calls (see the module docstring)."""

    def _unlink_prefix(self, lid: int, order: int, k: int) -> np.ndarray:
        """Take the first ``k`` blocks off list ``lid`` (``k`` times ``_list_del`` of its first
        block, batched); their first pfns in list order.

        The walk follows the links (``ListChains.walk``: numpy where the links confirm a run
        spliced there earlier, one link at a time elsewhere). The links left behind are those
        the one-at-a-time unlinking leaves: ``next`` untouched, ``prev`` of every block but the
        first pointing at the list head (each was first in turn).
        """
        heads, p = self._chains.walk(lid, self._first[lid], k, self._nx)
        s = list_sentinel(lid)
        self._first[lid] = p
        if p < 0:
            self._last[lid] = s
        else:
            self._pv[p if p & ROW_MASK else self._top + (p >> ROW_SHIFT)] = s
        if k > 1:
            self.prev[heads[1:]] = s
        self.buddy_order[heads] = -1
        self._count[lid] -= k
        self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] -= k << order
        if order >= pageblock_order:
            # del_page_from_free_list: blocks leaving their list are no longer "reported".
            pbs = heads >> pageblock_order
            rep = self.reported[pbs]
            nrep = int(np.count_nonzero(rep))
            if nrep:
                self.reported[pbs[rep]] = False
                self._nr_reported[lid] -= nrep
        return heads

    def _take_bulk(self, z: int, want: int, mt: int, out: list[tuple[np.ndarray, int]],
                   order: int = 0) -> int:
        """Take up to ``want`` pages (a multiple of ``2**order``) as blocks of ``order`` from
        ``mt``'s lists smallest-first; pages taken.

        Repeated ``__rmqueue_smallest`` of one order eats whole blocks of that order first,
        then larger ones: splitting a block hands out its pieces in address order and, when it
        stops inside one, ends with the low pages allocated and the rest free in maximal
        blocks at the heads of their lists (of orders >= ``order``, all emptied before). So do
        that directly. Per order: the blocks wholly consumed are a prefix of the list
        (unlinked at once); at most one block, the last one touched, is split.
        """
        got = 0
        first, count = self._first, self._count
        for o in range(order, MAX_ORDER):
            if got >= want:
                break
            lid = list_id(z, o, mt)
            c = count[lid]
            if c == 0:
                continue
            size = 1 << o
            nfull = min(c, (want - got) >> o)
            if nfull:
                out.append((self._unlink_prefix(lid, o, nfull), size))
                got += nfull << o
            if got < want and nfull < c:
                # The next block is split (want - got < size): its low pages are taken, the
                # rest goes back in maximal blocks, at the heads of the (lower) lists.
                pfn = first[lid]
                self._list_del(pfn, o, lid)
                take = want - got
                out.append((np.array([pfn], dtype=np.int64), take))
                got += take
                for bp, bo in blocks_of_range(pfn + take, pfn + size):
                    self._list_add(bp, bo, self._lid_of_block(bp, bo))
        return got

    @staticmethod
    def _run_pfns(runs: list[tuple[np.ndarray, int]]) -> np.ndarray:
        """Every pfn of ``runs`` in run order, ascending within a run."""
        parts = [heads if k == 1 else (heads[:, None] + np.arange(k, dtype=np.int64)).ravel()
                 for heads, k in runs]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def alloc_blocks_bulk(self, count: int, order: int, migratetype: int = MIGRATE_MOVABLE, *,
                          cpu: int = 0, owner: int = OWNER_GUEST) -> np.ndarray:
        """``count`` calls of ``alloc_pages(order, migratetype, cpu=cpu, owner=owner)``, stopping
        at the first that fails: the first pfns of the blocks, in allocation order, with
        exactly the lists, counters and writes those calls leave.

        Each allocation goes to the first zone of the zonelist that passes the low watermark
        and is served there by ``__rmqueue_smallest`` while the migratetype has a block of that
        order or larger. So the batch is cut into segments: in a segment every allocation meets
        the same zone (the zones before it fail the watermark, and allocating from this one
        does not change them), passes the watermark (free pages only go down by ``2**order``
        each time, so a count says how many), and finds a block (the lists hold so many
        blocks' worth); a segment is taken at once with ``_take_bulk``. Anything else (order 0,
        which goes through the per-cpu lists; a migratetype out of blocks, which falls back;
        every zone below the low watermark, where the min watermark, reclaim and OOM come in)
        is one ordinary ``alloc_pages`` call, then the segments go on.
        """
        self._check_args(order, cpu)
        if migratetype not in FALLBACKS:
            raise BuddyError(f"migratetype={migratetype}: only unmovable/movable/reclaimable")
        if owner not in (OWNER_GUEST, OWNER_BALLOON):
            raise BuddyError(f"owner={owner}: OWNER_GUEST or OWNER_BALLOON")
        remaining = max(0, int(count))
        parts: list[np.ndarray] = []
        single: list[int] = []
        while remaining > 0:
            m, z = (0, -1) if order == 0 else self._segment(order, migratetype, remaining)
            if m:
                if single:
                    parts.append(np.array(single, dtype=np.int64))
                    single = []
                runs: list[tuple[np.ndarray, int]] = []
                self._take_bulk(z, m << order, migratetype, runs, order)
                firsts = np.concatenate([
                    (heads[:, None] + (np.arange(k >> order, dtype=np.int64) << order)).ravel()
                    for heads, k in runs])
                self._link_split_pieces(z, order, runs)
                pages = self._run_pfns(runs)
                self.state[pages] = owner
                self.counters["alloc"] += m
                if self.init_on_alloc and self.pages is not None:
                    if order >= FIRST_WRITE_COUNT_ORDER:
                        self._count_first_writes(self.pages.version[pages])
                    self.pages.write_pfns(pages, "zero")
                parts.append(firsts)
                remaining -= m
                continue
            p = self.alloc_pages(order, migratetype, cpu=cpu, owner=owner)
            if p is None:
                break
            single.append(p)
            remaining -= 1
        if single:
            parts.append(np.array(single, dtype=np.int64))
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _link_split_pieces(self, z: int, order: int,
                           runs: list[tuple[np.ndarray, int]]) -> None:
        """Leave on the blocks handed out of larger ones the links one-by-one allocation leaves.

        Allocating piece by piece, ``expand`` puts the piece at offset ``j * 2**order`` (j >= 1)
        of a split block on the then empty list of order ``order + tz(j)`` (tz: trailing zero
        bits) before it is taken: both its links name that list's head. Only the head of each
        consumed block keeps the links it had.
        """
        for heads, k in runs:
            n = k >> order
            if n <= 1:
                continue
            j = np.arange(1, n, dtype=np.int64)
            tz = np.log2(j & -j).astype(np.int64)
            pieces = (heads[:, None] + (j << order)).ravel()
            mts = self.pageblock_mt[pieces >> pageblock_order].astype(np.int64)
            lids = (z * MAX_ORDER + order + np.tile(tz, heads.size)) * MIGRATE_TYPES + mts
            self.next[pieces] = -1 - lids
            self.prev[pieces] = -1 - lids

    def _segment(self, order: int, mt: int, want: int) -> tuple[int, int]:
        """How many of the next ``want`` allocations of ``order`` take the fast path of
        ``alloc_blocks_bulk``, and from which zone: (0, -1) when the next one does not."""
        for z in self._zonelist():
            if not self.zone_watermark_ok(z, order, WMARK_LOW):
                continue
            zone = self.zones[z]
            # Allocation i passes while free - i * 2**order - (2**order - 1) > mark + reserve.
            room = (self._zone_free[z] - ((1 << order) - 1) - zone.watermark[WMARK_LOW]
                    - zone.lowmem_reserve[ZONE_NORMAL])
            by_mark = (room + (1 << order) - 1) >> order if room > 0 else 0
            blocks = sum(self._count[list_id(z, o, mt)] << (o - order)
                         for o in range(order, MAX_ORDER))
            return min(want, by_mark, blocks), z
        return 0, -1

    def alloc_pages_bulk(self, nr_pages: int, migratetype: int = MIGRATE_MOVABLE, *,
                         owner: int = OWNER_GUEST, noretry: bool = False) -> np.ndarray:
        """Allocate up to ``nr_pages`` order-0 pages at once (fewer when memory runs out).

        Same zones, watermark (min) and fallback as ``alloc_pages``; the per-cpu lists are not
        used. ``noretry`` (the balloon's inflate, ``__GFP_NORETRY``): no shrinkers, no OOM
        notifiers. Returns the pfns (int64, ascending within each block taken).
        """
        if migratetype not in FALLBACKS:
            raise BuddyError(f"migratetype={migratetype}: only unmovable/movable/reclaimable")
        if owner not in (OWNER_GUEST, OWNER_BALLOON):
            raise BuddyError(f"owner={owner}: OWNER_GUEST or OWNER_BALLOON")
        taken: list[np.ndarray] = []
        remaining = max(0, int(nr_pages))
        remaining = self._bulk_pass(remaining, migratetype, taken, owner)
        if remaining > 0 and not noretry and self.shrinkers and self._reclaim(0, remaining):
            remaining = self._bulk_pass(remaining, migratetype, taken, owner)
        if remaining > 0 and self.nr_pcp_pages():
            self.drain_pcp()
            remaining = self._bulk_pass(remaining, migratetype, taken, owner)
        if remaining > 0 and not noretry and self.oom_notifiers:
            # As many order-0 allocations would: OOM notifiers, retry while they free pages.
            for _ in range(OOM_MAX_ROUNDS):
                if remaining <= 0 or not self._out_of_memory():
                    break
                remaining = self._bulk_pass(remaining, migratetype, taken, owner)
        if remaining > 0:
            self.counters["alloc_fail"] += 1
        taken = [t for t in taken if t.size]
        if not taken:
            return np.empty(0, dtype=np.int64)
        pfns = taken[0] if len(taken) == 1 else np.concatenate(taken)
        self.counters["bulk_alloc_pages"] += int(pfns.size)
        if self.init_on_alloc and self.pages is not None:
            self.pages.write_pfns(pfns, "zero")
        return pfns

    def _bulk_pass(self, remaining: int, migratetype: int, taken: list[np.ndarray],
                   owner: int) -> int:
        """Take pages (their pfns appended to ``taken``); their state is set at once, because
        reclaim and OOM notifiers run between passes and may free pages (a bulk free re-lays
        out free blocks from ``state``, so taken pages must not look free)."""
        runs: list[tuple[np.ndarray, int]] = []
        remaining = self._bulk_pass_take(remaining, migratetype, runs)
        pfns = self._run_pfns(runs)
        self.state[pfns] = owner
        taken.append(pfns)
        return remaining

    def _bulk_pass_take(self, remaining: int, migratetype: int,
                        runs: list[tuple[np.ndarray, int]]) -> int:
        for z in self._zonelist():
            zone = self.zones[z]
            while remaining > 0:
                budget = (self._zone_free[z] - zone.watermark[WMARK_MIN]
                          - zone.lowmem_reserve[ZONE_NORMAL] - 1)
                if budget <= 0:
                    break
                got = self._take_bulk(z, min(remaining, budget), migratetype, runs)
                remaining -= got
                if remaining > 0 and got < min(remaining + got, budget):
                    # Own lists ran dry: steal (claim a pageblock or take one block) and go on.
                    p = self._rmqueue_fallback(z, 0, migratetype)
                    if p is None:
                        break
                    runs.append((np.array([p], dtype=np.int64), 1))
                    remaining -= 1
        return remaining
