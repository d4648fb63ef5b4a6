"""Bulk paths: many allocations or frees at numpy speed, with the one-at-a-time result.

Each bulk call does what many one-block calls would do, with the same resulting free lists
(block order along each list included: the walker and every later allocation see it, so it is
part of the simulation's determinism), but the per-block work is numpy:

* ``alloc_pages_bulk`` consumes blocks smallest-first as repeated ``__rmqueue_smallest`` does
  (the blocks an order gives up wholly are a prefix of its list, unlinked at once; at most one
  block is split). Taken pages are collected as runs: (first pfns, pages per run).
* ``free_pages_bulk`` recomputes the (unique) maximal-merge layout of each touched max-order
  block (its runs of free pages cut into maximal aligned blocks) and puts the new blocks at the
  heads of their lists, in address order.
* ``free_blocks_bulk`` frees many blocks of one order (the balloon's held hint blocks) with
  exactly the result of ``free_pages`` per block.

tests/guest_model/buddy/test_bulk_equivalence.py and test_free_blocks_bulk.py hold them to a
plain one-block-at-a-time reference, link for link.
"""
from __future__ import annotations

import numpy as np

from guest_model.buddy.defs import (
    FALLBACKS,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_TYPES,
    NR_LISTS,
    OOM_MAX_ROUNDS,
    OWNER_BALLOON,
    OWNER_GUEST,
    PG_ALLOC,
    PG_BALLOON,
    PG_BUDDY,
    PG_RESERVED,
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
from guest_model.buddy.pagealloc import ZoneAllocator

# Tables for ``_run_blocks``, indexed by an offset or a length within a max-order block:
# the order an offset is aligned to (0 counts as aligned to the top order), and floor(log2(n)).
_ALIGN_ORDER = np.array([MAX_ORDER - 1 if p == 0 else min(MAX_ORDER - 1, (p & -p).bit_length() - 1)
                         for p in range(MAX_ORDER_NR_PAGES + 1)], dtype=np.int32)
_FLOOR_LOG2 = np.array([0] + [n.bit_length() - 1 for n in range(1, MAX_ORDER_NR_PAGES + 1)],
                       dtype=np.int32)


def run_blocks(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut runs ``[s, e)`` (offsets in a max-order block, ``0 <= s < e <= 1024``) into their
    maximal aligned power-of-two blocks, as ``blocks_of_range`` does for one run; returns
    (run index, first offset, order) of every block, in no particular order.

    All runs step together: each step takes, at every unfinished run's next offset, the
    largest block both aligned there and fitting in what is left (two table lookups). A run
    needs at most 2 * MAX_ORDER steps, and most runs of a fragmented block end after one.
    Offsets and orders are int32 (a free of millions of scattered pages has as many runs).
    """
    runs, firsts, orders = [], [], []
    idx = np.arange(s.size, dtype=np.int32)
    p, end = s, e
    while idx.size:
        o = np.minimum(_ALIGN_ORDER[p], _FLOOR_LOG2[end - p])
        runs.append(idx)
        firsts.append(p)
        orders.append(o)
        p = p + (1 << o)
        more = p < end
        if not more.all():
            idx, p, end = idx[more], p[more], end[more]
    if not runs:
        return (np.empty(0, dtype=np.int64),) * 3
    return np.concatenate(runs), np.concatenate(firsts), np.concatenate(orders)



class BulkPaths(ZoneAllocator):
    """The bulk calls (see the module docstring)."""

    def free_blocks_bulk(self, pfns: np.ndarray, order: int, *, cpu: int = 0) -> None:
        """Free many allocated blocks of one ``order``, exactly as ``free_pages(p, order,
        cpu=cpu)`` for each ``p`` in the given order would (BuddyError on misuse).

        Used for the balloon's held hint blocks at DONE and by its shrinker (tens of thousands
        of order-10 blocks on a big guest). Every block is checked before anything changes, so a
        bad batch (outside RAM, misaligned, a block given twice, pages not allocated) frees
        nothing, where the one-by-one loop would have freed the blocks before the bad one.

        The fast path covers batches in which no block can merge: order ``MAX_ORDER - 1``, or a
        lower order where no block's buddy is free now or freed in the same batch. Then each
        block goes on its own list, at the head, or at the tail when ``buddy_merge_likely``
        (its parent's buddy is a free block of order + 1; no free in the batch creates or
        removes such a block, so it is decided for all blocks at once). Head insertions in
        order b1..bk leave the list bk..b1 followed by the old list, tail insertions append in
        order, and no link is left stale, so one splice per list and side gives the same links
        as k ``_list_add`` calls. Anything else (order 0, whose frees go through the per-cpu
        lists; possible merges; ``shuffle`` picking head or tail at random for max-order blocks)
        frees block by block after the checks.
        """
        self._check_args(order, cpu)
        pfns = np.asarray(pfns, dtype=np.int64).ravel()
        k = int(pfns.size)
        if k == 0:
            return
        n = 1 << order
        bad = (pfns < 0) | (pfns + n > self.ram_pages)
        if bad.any():
            p = int(pfns[bad][0])
            raise BuddyError(f"free_blocks_bulk(pfn={p:#x}, order={order}): outside RAM")
        bad = (pfns & (n - 1)) != 0
        if bad.any():
            p = int(pfns[bad][0])
            raise BuddyError(f"free_blocks_bulk(pfn={p:#x}, order={order}): "
                             "not aligned to the order")
        rows = pfns >> order  # block numbers; blocks are aligned and inside RAM
        srows = np.sort(rows)
        if k > 1 and bool(np.any(srows[1:] == srows[:-1])):
            p = int(srows[1:][srows[1:] == srows[:-1]][0]) << order
            raise BuddyError(f"free_blocks_bulk(pfn={p:#x}, order={order}): given twice "
                             "(double free)")
        # Runs of adjacent blocks (the balloon's held blocks mostly are): few runs are checked
        # and set as slices of ``state``, many through a gather of one row per block.
        cut = np.flatnonzero(srows[1:] != srows[:-1] + 1) + 1
        run_a = (srows[np.r_[0, cut]] << order).tolist()
        run_b = ((srows[np.r_[cut - 1, k - 1]] + 1) << order).tolist()
        # PG_ALLOC and PG_BALLOON are adjacent values: one unsigned compare tests both.
        allocated = np.uint8(PG_ALLOC)
        # (In pieces of 1 Mi pages: small temporaries, no fresh memory to fault in.)
        by_runs = len(run_a) <= 64 and all(
            bool(((self.state[i:min(i + (1 << 20), y)] - allocated) <= 1).all())
            for x, y in zip(run_a, run_b, strict=True) for i in range(x, y, 1 << 20))
        # The state of every page, one row per block of the order (a view of ``state``),
        # checked a bounded number of blocks at a time to keep the gathered copy small.
        blocks = self.state[:(self.ram_pages >> order) << order].reshape(-1, n)
        chunk = max(1, (4 << 20) >> order)
        for i in range(0, 0 if by_runs else k, chunk):
            g = blocks[rows[i:i + chunk]]
            ok = ((g - allocated) <= 1).all(axis=1)
            if not ok.all():
                j = int(np.flatnonzero(~ok)[0])
                p = int(pfns[i + j])
                raise BuddyError(
                    f"free_blocks_bulk(pfn={p:#x}, order={order}): pages not allocated (states "
                    f"{sorted(set(g[j].tolist()))}): double free or reserved")

        zend = np.array([self._zone_bounds[0][1], self._zone_bounds[1][1]], dtype=np.int64)
        fast = order > 0 and not (self.shuffle and order >= MAX_ORDER - 1)
        if fast and order < MAX_ORDER - 1:
            buddies = pfns ^ n
            inside = buddies < self.ram_pages
            free_buddy = self.buddy_order[np.where(inside, buddies, 0)] == order
            in_batch = np.isin(buddies >> order, srows, assume_unique=False)
            fast = not bool(np.any((free_buddy & inside) | in_batch))
        if not fast:
            for p in pfns.tolist():
                self.free_pages(p, order, cpu=cpu)
            return

        # Writes (init_on_free / poisoning): zero and poison are the same whatever the order,
        # so write each run of adjacent blocks once.
        if self.pages is not None and (self.page_poisoning or self.init_on_free):
            kind = "poison" if self.page_poisoning else "zero"
            for x, y in zip(run_a, run_b, strict=True):
                self.pages.write_range(x, y - x, kind)
        if by_runs:
            for x, y in zip(run_a, run_b, strict=True):
                self.state[x:y] = PG_BUDDY
        else:
            for i in range(0, k, chunk):
                blocks[rows[i:i + chunk]] = PG_BUDDY
        self.counters["free"] += k

        zone = np.searchsorted(zend, pfns, side="right")
        mt = self.pageblock_mt[pfns >> pageblock_order].astype(np.int64)
        lids = (zone * MAX_ORDER + order) * MIGRATE_TYPES + mt
        if order < MAX_ORDER - 2:
            # _buddy_merge_likely for every block: the parent's buddy is free at order + 1.
            hb = (pfns & ~np.int64(2 * n - 1)) ^ (2 * n)
            zone_end = np.array([zb[1] for zb in self._zone_bounds], dtype=np.int64)[zone]
            ok = hb < zone_end
            tail = ok & (self.buddy_order[np.where(ok, hb, 0)] == order + 1)
        else:
            tail = np.zeros(k, dtype=np.bool_)
        by_list = np.argsort(lids, kind="stable")  # keeps the freeing order within a list
        sl = lids[by_list]
        bounds = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1], True])
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            idx = by_list[a:b]
            lid = int(sl[a])
            t = tail[idx]
            self._splice_heads(lid, pfns[idx[~t]][::-1], at_tail=False)
            self._splice_heads(lid, pfns[idx[t]], at_tail=True)
        if order >= pageblock_order and self.free_notifiers:
            # One notification per block, as each free_pages gives; they come after the whole
            # batch (the driver's notifier only schedules a reporting pass).
            for _ in range(k):
                self._notify_free(order)

    # ---- bulk operations (workloads) --------------------------------------------------------
    # Bulk calls do what many one-block calls would do, with the same resulting free lists
    # (block order along each list included: the walker and determinism depend on it), but the
    # per-block work is numpy. Taken pages are collected as runs: (first pfns, pages per run).

    def _unlink_prefix(self, lid: int, order: int, k: int) -> np.ndarray:
        """Take the first ``k`` blocks off list ``lid`` (``k`` times ``_list_del`` of its first
        block, batched); their first pfns in list order.

        Only the walk along the list is a Python loop (one link read per block). The links
        left behind are those the one-at-a-time unlinking leaves: ``next`` untouched, ``prev``
        of every block but the first pointing at the list head (each was first in turn).
        """
        nx, top, mask, shift = self._nx, self._top, ROW_MASK, ROW_SHIFT
        p = self._first[lid]
        heads = np.empty(k, dtype=np.int64)
        # In chunks, so that a long walk never holds millions of Python ints at once.
        for lo in range(0, k, 1 << 16):
            got: list[int] = []
            app = got.append
            for _ in range(min(k - lo, 1 << 16)):
                app(p)
                p = nx[p if p & mask else top + (p >> shift)]
            heads[lo:lo + len(got)] = got
        s = list_sentinel(lid)
        self._first[lid] = p
        if p < 0:
            self._last[lid] = s
        else:
            self.prev[p] = s
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

    def free_pages_bulk(self, pfns: np.ndarray) -> None:
        """Free many allocated order-0 pages at once, straight to the buddy lists.

        The merged layout of free memory is unique (every pair of free buddies of equal order
        is merged), so each touched max-order block is re-laid out from its free-page mask.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        if pfns.size == 0:
            return
        if pfns.size > 1 and not bool(np.all(pfns[1:] > pfns[:-1])):
            pfns = np.sort(pfns)
            if bool(np.any(pfns[1:] == pfns[:-1])):
                dup = int(pfns[1:][pfns[1:] == pfns[:-1]][0])
                raise BuddyError(f"free_pages_bulk: pfn {dup:#x} given twice (double free)")
        if pfns[0] < 0 or pfns[-1] >= self.ram_pages:
            raise BuddyError(f"free_pages_bulk: pfn outside RAM ({int(pfns[0])}..{int(pfns[-1])})")
        st = self.state[pfns]
        bad = (st != PG_ALLOC) & (st != PG_BALLOON)
        if bad.any():
            raise BuddyError(f"free_pages_bulk: pfn {int(pfns[bad][0]):#x} not allocated "
                             f"(state {int(st[bad][0])}): double free or reserved")
        if self.pages is not None:
            if self.page_poisoning:
                self.pages.write_pfns(pfns, "poison")
            elif self.init_on_free:
                self.pages.write_pfns(pfns, "zero")
        self.state[pfns] = PG_BUDDY
        self.counters["bulk_free_pages"] += int(pfns.size)
        self.counters["free"] += int(pfns.size)
        # pfns are sorted: the touched max-order blocks are where the block number changes.
        mb = pfns >> (MAX_ORDER - 1)
        self._relayout(mb[np.r_[True, mb[1:] != mb[:-1]]])

    def _mblock_rows(self, arr: np.ndarray, mblocks: np.ndarray, fill: int) -> np.ndarray:
        """``arr`` (one value per page) for each max-order block in ``mblocks`` (ascending,
        unique) as rows of MAX_ORDER_NR_PAGES; pages past the end of RAM read ``fill``."""
        M = MAX_ORDER_NR_PAGES
        whole = self.ram_pages // M
        grid = arr[:whole * M].reshape(whole, M)
        if int(mblocks[-1]) < whole:
            return grid[mblocks]
        # Only the last block can be partial (RAM not a multiple of 4 MiB).
        out = np.full((mblocks.size, M), fill, dtype=arr.dtype)
        out[:-1] = grid[mblocks[:-1]]
        tail = arr[whole * M:]
        out[-1, :tail.size] = tail
        return out

    def _relayout(self, mblocks: np.ndarray) -> None:
        """Rebuild the free blocks inside the given max-order blocks (ascending, unique) from
        ``state``: every old free block there leaves its list, every new one goes to the head
        of its list, each list's new blocks in ascending order.

        The new layout comes from the runs of free pages in each max-order block: merging
        buddies as far as they go leaves each run cut into its maximal aligned blocks (a block
        whose parent were wholly free would have merged; its parent reaches outside the run).
        """
        M = MAX_ORDER_NR_PAGES
        shift = MAX_ORDER - 1
        nb = int(mblocks.size)
        base = mblocks * M
        # Take the old blocks off their lists.
        bo = self._mblock_rows(self.buddy_order, mblocks, -1).ravel()
        old = np.flatnonzero(bo >= 0)
        old_heads = base[old >> shift] + (old & (M - 1))
        old_orders = bo[old].astype(np.int64)
        # Blocks that were reported and come out of the re-layout unchanged (nothing merged
        # with them) keep the mark, as they would under Linux's one-page-at-a-time frees.
        big = old_orders >= pageblock_order
        big_heads, big_orders = old_heads[big], old_orders[big]
        was_rep = self.reported[big_heads >> pageblock_order]
        rep_heads, rep_orders = big_heads[was_rep], big_orders[was_rep]
        old_big = set(zip(big_heads.tolist(), big_orders.tolist(), strict=True))
        self._list_del_many(old_heads)
        # Runs of free pages; a non-free column after each block keeps runs inside it.
        free = np.zeros((nb, M + 1), dtype=np.bool_)
        free[:, :M] = self._mblock_rows(self.state, mblocks, PG_RESERVED) == PG_BUDDY
        flat = free.ravel()
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        if flat[0]:
            edges = np.concatenate(([0], edges))
        row = edges[0::2] // (M + 1)
        s = (edges[0::2] - row * (M + 1)).astype(np.int32)
        e = (edges[1::2] - row * (M + 1)).astype(np.int32)
        del edges
        # Two pageblocks merge into a max-order block only if their types may mix.
        pb0i = base >> pageblock_order
        pb1i = np.minimum(pb0i + 1, self.pageblock_mt.size - 1)
        pb0 = self.pageblock_mt[pb0i]
        pb1 = self.pageblock_mt[pb1i]
        mix_ok = (pb0 == pb1) | ((pb0 < MIGRATE_PCPTYPES) & (pb1 < MIGRATE_PCPTYPES))
        whole = (s == 0) & (e == M)
        if whole.any():
            mix = mix_ok[row[whole]]
            # A merged max-order block's second pageblock takes the first one's type.
            merged = row[whole][mix]
            if merged.size:
                self.pageblock_mt[pb1i[merged]] = pb0[merged]
            # A wholly free block whose halves may not mix stays two pageblock-sized blocks:
            # split its run in two.
            split = np.flatnonzero(whole)[~mix]
            if split.size:
                row = np.concatenate((row, row[split]))
                s = np.concatenate((s, s[split] + M // 2))
                e = np.concatenate((e, e[split]))
                e[split] = M // 2
        run, heads, orders = run_blocks(s, e)
        if heads.size:
            rr = row[run]
            heads = base[rr] + heads
            zone_of_block = np.searchsorted(
                np.array([self._zone_bounds[0][1], self._zone_bounds[1][1]], dtype=np.int64),
                base, side="right")
            mts = self.pageblock_mt[heads >> pageblock_order].astype(np.int64)
            lids = (zone_of_block[rr] * MAX_ORDER + orders) * MIGRATE_TYPES + mts
            # Each list's blocks in ascending order: sort by list, then by pfn.
            idx = np.lexsort((heads, lids))
            heads, orders, lids = heads[idx], orders[idx], lids[idx]
            self._splice_many_at_head(heads, orders, lids)
        for h, o in zip(rep_heads.tolist(), rep_orders.tolist(), strict=True):
            if self._bo[h] == o:
                self._mark_reported(h, self._lid_of_block(h, o))
        if self.free_notifiers and nb:
            # One free that left a new large block (a merge result), as page by page frees
            # would have notified: the biggest such order.
            bigs = orders >= pageblock_order
            new_big = [o for h, o in zip(heads[bigs].tolist(), orders[bigs].tolist(),
                                         strict=True) if (h, o) not in old_big]
            if new_big:
                self._notify_free(max(new_big))

    def _splice_many_at_head(self, heads: np.ndarray, orders: np.ndarray,
                             lids: np.ndarray) -> None:
        """Put blocks on the heads of their lists (``lids`` grouped: equal ids adjacent): each
        list's blocks, in the order given, become its first ones (``_splice_heads(lid, ...,
        at_tail=False)`` for every list at once: links inside each group by numpy, each
        group's two ends and the list's bookkeeping per list)."""
        self.buddy_order[heads] = orders
        same = lids[1:] == lids[:-1]
        a, b = heads[:-1][same], heads[1:][same]
        self.next[a] = b
        self.prev[b] = a
        cut = np.flatnonzero(~same) + 1
        g_first = np.concatenate(([0], cut))
        g_end = np.concatenate((cut, [heads.size]))
        nx, pv, top = self._nx, self._pv, self._top
        for i0, i1, lid in zip(g_first.tolist(), g_end.tolist(), lids[g_first].tolist(),
                               strict=True):
            h0, h1 = int(heads[i0]), int(heads[i1 - 1])
            first = self._first[lid]
            nx[h1 if h1 & ROW_MASK else top + (h1 >> ROW_SHIFT)] = first
            pv[h0 if h0 & ROW_MASK else top + (h0 >> ROW_SHIFT)] = list_sentinel(lid)
            if first < 0:
                self._last[lid] = h1
            else:
                pv[first if first & ROW_MASK else top + (first >> ROW_SHIFT)] = h1
            self._first[lid] = h0
            k = i1 - i0
            self._count[lid] += k
            self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] += k << (
                (lid // MIGRATE_TYPES) % MAX_ORDER)

    def _lids_of_blocks(self, heads: np.ndarray) -> np.ndarray:
        orders = self.buddy_order[heads].astype(np.int64)
        zones = np.searchsorted(
            np.array([self._zone_bounds[0][1], self._zone_bounds[1][1]], dtype=np.int64),
            heads, side="right")
        mts = self.pageblock_mt[heads >> pageblock_order].astype(np.int64)
        return (zones * MAX_ORDER + orders) * MIGRATE_TYPES + mts

    def _list_del_many(self, heads: np.ndarray) -> None:
        """Unlink many free blocks at once (``_list_del`` for each, bookkeeping by numpy).

        The relinking is one inline pass over the removed blocks (each one's neighbours linked
        to each other, no call per block); afterwards the removed blocks get their own links
        back as they were (stale, see ``guest_model.buddy.freelists``), so the result does not
        depend on the order of the pass. Pointer jumping with numpy over the removed set (the
        twin tests' reference) is 2.5x slower for a bulk free's ~330 blocks in compile-128g and
        2x for a million.
        """
        R = np.asarray(heads, dtype=np.int64)
        if R.size > 1 and not bool(np.all(R[1:] > R[:-1])):
            R = np.unique(R)
        k = int(R.size)
        if k == 0:
            return
        if k <= 32:
            # Few blocks: one at a time, leaving the removed blocks' links as _list_del does
            # (unlike the path below: the cut at 32 is part of the model's determinism).
            for h in R.tolist():
                o = self._bo[h]
                self._list_del(h, o, self._lid_of_block(h, o))
            return
        lids = self._lids_of_blocks(R)
        orders = self.buddy_order[R].astype(np.int64)
        saved_next = self.next[R]
        saved_prev = self.prev[R]
        nx, pv, first, last, top = self._nx, self._pv, self._first, self._last, self._top
        for lo in range(0, k, 1 << 16):  # chunks: never millions of Python ints at once
            for h in R[lo:lo + (1 << 16)].tolist():
                i = h if h & ROW_MASK else top + (h >> ROW_SHIFT)
                n, p = nx[i], pv[i]
                if p < 0:
                    first[-1 - p] = n
                else:
                    nx[p if p & ROW_MASK else top + (p >> ROW_SHIFT)] = n
                if n < 0:
                    last[-1 - n] = p
                else:
                    pv[n if n & ROW_MASK else top + (n >> ROW_SHIFT)] = p
        self.next[R] = saved_next
        self.prev[R] = saved_prev
        self.buddy_order[R] = -1
        big = orders >= pageblock_order
        if big.any():
            pbs = R[big] >> pageblock_order
            rep = self.reported[pbs]
            if rep.any():
                self.reported[pbs[rep]] = False
                for lid, c in zip(*np.unique(lids[big][rep], return_counts=True), strict=True):
                    self._nr_reported[int(lid)] -= int(c)
        per_list = np.bincount(lids, minlength=NR_LISTS)
        pages = np.bincount(lids, weights=(1 << orders), minlength=NR_LISTS)
        for lid in np.flatnonzero(per_list).tolist():
            self._count[lid] -= int(per_list[lid])
            self._zone_free[lid // (MAX_ORDER * MIGRATE_TYPES)] -= int(pages[lid])

