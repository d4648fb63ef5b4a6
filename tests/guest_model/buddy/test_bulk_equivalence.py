"""guest_model.buddy bulk paths against a reference: the same free lists, link for link.

``alloc_pages_bulk`` / ``free_pages_bulk`` are batched with numpy (blocks unlinked a list prefix
at a time, many lists spliced at once). ``ReferenceAllocator`` keeps the earlier, plainer
implementation (one ``_list_del`` per consumed block, one ``_splice_heads`` per list, the
pointer-jumping ``_list_del_many``) as an oracle. The two are driven by the same calls and must
agree on every returned pfn and on every per-page array, list head, tail and count, ``next`` /
``prev`` links included (stale links of blocks off the lists too: the seed walker follows
them, and list order decides which pfns later allocations return, so it is part of the
simulation's determinism).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from guest_model.buddy import (
    FALLBACKS,
    MAX_ORDER,
    MAX_ORDER_NR_PAGES,
    MIGRATE_ISOLATE,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_RECLAIMABLE,
    MIGRATE_TYPES,
    MIGRATE_UNMOVABLE,
    NR_LISTS,
    OOM_MAX_ROUNDS,
    OWNER_BALLOON,
    OWNER_GUEST,
    PG_BUDDY,
    WMARK_MIN,
    ZONE_NORMAL,
    BuddyAllocator,
    BuddyError,
    blocks_of_range,
    list_id,
    pageblock_order,
    run_blocks,
)
from tests.guest_model.buddy.twins import TwinRules, assert_same

MiB = 1 << 20
GiB = 1 << 30


class ReferenceAllocator(BuddyAllocator):
    """The bulk paths as they were before batching (kept verbatim as the oracle; their runs
    are (pfn, pages) pairs, hence the overrides' other argument types)."""

    def _take_bulk(self, z: int, want: int, mt: int, out: list[tuple[int, int]]) -> int:  # type: ignore[override]
        """Take up to ``want`` order-0 pages from ``mt``'s lists smallest-first; pages taken.

        Repeated order-0 ``__rmqueue_smallest`` eats whole small blocks first and, when it must
        split one, ends with the low pages allocated and the rest free: so do that directly.
        """
        got = 0
        first = self._first
        for o in range(MAX_ORDER):
            lid = list_id(z, o, mt)
            size = 1 << o
            while got < want and first[lid] >= 0:
                pfn = first[lid]
                self._list_del(pfn, o, lid)
                take = min(size, want - got)
                out.append((pfn, take))
                got += take
                if take < size:
                    for bp, bo in blocks_of_range(pfn + take, pfn + size):
                        self._list_add(bp, bo, self._lid_of_block(bp, bo))
            if got >= want:
                break
        return got

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
        runs: list[tuple[int, int]] = []
        remaining = max(0, int(nr_pages))
        remaining = self._bulk_pass(remaining, migratetype, runs, owner)
        if remaining > 0 and not noretry and self.shrinkers and self._reclaim(0, remaining):
            remaining = self._bulk_pass(remaining, migratetype, runs, owner)
        if remaining > 0 and self.nr_pcp_pages():
            self.drain_pcp()
            remaining = self._bulk_pass(remaining, migratetype, runs, owner)
        if remaining > 0 and not noretry and self.oom_notifiers:
            # As many order-0 allocations would: OOM notifiers, retry while they free pages.
            for _ in range(OOM_MAX_ROUNDS):
                if remaining <= 0 or not self._out_of_memory():
                    break
                remaining = self._bulk_pass(remaining, migratetype, runs, owner)
        if remaining > 0:
            self.counters["alloc_fail"] += 1
        if not runs:
            return np.empty(0, dtype=np.int64)
        starts = np.array([r[0] for r in runs], dtype=np.int64)
        lens = np.array([r[1] for r in runs], dtype=np.int64)
        offs = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        pfns = np.repeat(starts, lens) + offs
        self.state[pfns] = owner
        self.counters["bulk_alloc_pages"] += int(pfns.size)
        if self.init_on_alloc and self.pages is not None:
            self.pages.write_pfns(pfns, "zero")
        return pfns

    def _bulk_pass(self, remaining: int, migratetype: int, runs: list[tuple[int, int]],  # type: ignore[override]
                   owner: int) -> int:
        """Take pages into ``runs``; their state is set at once, because reclaim and OOM
        notifiers run between passes and may free pages (a bulk free re-lays out free blocks
        from ``state``, so taken pages must not look free)."""
        first_new = len(runs)
        remaining = self._bulk_pass_take(remaining, migratetype, runs)
        for p, k in runs[first_new:]:
            self.state[p:p + k] = owner
        return remaining

    def _bulk_pass_take(self, remaining: int, migratetype: int,  # type: ignore[override]
                        runs: list[tuple[int, int]]) -> int:
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
                    runs.append((p, 1))
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
        given = pfns
        if pfns.size > 1 and not bool(np.all(pfns[1:] > pfns[:-1])):
            pfns = np.sort(pfns)
            if bool(np.any(pfns[1:] == pfns[:-1])):
                dup = int(pfns[1:][pfns[1:] == pfns[:-1]][0])
                raise BuddyError(f"free_pages_bulk: pfn {dup:#x} given twice (double free)")
        # The checks and page marking are the allocator's; the twin differs in the re-layout.
        self._mark_freed(pfns)
        # The place of each page in the order of the frees (-1: not freed now).
        self._freed_at = np.full(self.ram_pages, -1, dtype=np.int64)
        self._freed_at[given] = np.arange(given.size)
        self._relayout(np.unique(pfns >> (MAX_ORDER - 1)))

    def _relayout(self, mblocks: np.ndarray) -> None:  # type: ignore[override]
        """Rebuild the free blocks inside the given max-order blocks from ``state``; each
        list's new blocks go first the one whose last freed page came last, then those
        holding no freed page, ascending."""
        M = MAX_ORDER_NR_PAGES
        n = self.ram_pages
        idx = (mblocks[:, None] * M + np.arange(M, dtype=np.int64)[None, :])
        inside = idx < n
        idxc = np.minimum(idx, n - 1)
        # Take the old blocks off their lists.
        old = np.flatnonzero((self.buddy_order[idxc] >= 0) & inside)
        old_heads = idx.ravel()[old]
        # Blocks that were reported and come out of the re-layout unchanged (nothing merged
        # with them) keep the mark, as they would under Linux's one-page-at-a-time frees.
        old_orders = self.buddy_order[old_heads].astype(np.int64)
        was_rep = old_orders >= pageblock_order
        was_rep[was_rep] = self.reported[old_heads[was_rep] >> pageblock_order]
        rep_heads, rep_orders = old_heads[was_rep], old_orders[was_rep]
        old_big = set(zip(old_heads[old_orders >= pageblock_order].tolist(),
                          old_orders[old_orders >= pageblock_order].tolist(), strict=True))
        self._list_del_many(old_heads)
        full = (self.state[idxc] == PG_BUDDY) & inside
        levels = [full]
        for _ in range(MAX_ORDER - 1):
            f = levels[-1]
            levels.append(f[:, 0::2] & f[:, 1::2])
        # Two pageblocks merge into a max-order block only if their types may mix.
        pb0 = self.pageblock_mt[(mblocks * M) >> pageblock_order]
        pb1i = np.minimum(((mblocks * M) >> pageblock_order) + 1, self.pageblock_mt.size - 1)
        pb1 = self.pageblock_mt[pb1i]
        mix_ok = (pb0 == pb1) | ((pb0 < MIGRATE_PCPTYPES) & (pb1 < MIGRATE_PCPTYPES))
        levels[-1] = levels[-1] & mix_ok[:, None]
        # A merged max-order block's second pageblock takes the first one's type.
        merged = np.flatnonzero(levels[-1][:, 0])
        if merged.size:
            self.pageblock_mt[pb1i[merged]] = pb0[merged]
        zone_of_block = np.searchsorted(
            np.array([self._zone_bounds[0][1], self._zone_bounds[1][1]], dtype=np.int64),
            mblocks * M, side="right")
        new_heads: list[tuple[int, np.ndarray]] = []
        for o in range(MAX_ORDER):
            f = levels[o]
            if o < MAX_ORDER - 1:
                parent = np.repeat(levels[o + 1], 2, axis=1)
                f = f & ~parent
            r, c = np.nonzero(f)
            if r.size == 0:
                continue
            heads = mblocks[r] * M + (c.astype(np.int64) << o)
            new_heads.append((o, np.stack([heads, zone_of_block[r]])))
        for o, arr in new_heads:
            heads, zs = arr[0], arr[1]
            mts = self.pageblock_mt[heads >> pageblock_order].astype(np.int64)
            lids = (zs * MAX_ORDER + o) * MIGRATE_TYPES + mts
            for lid in np.unique(lids).tolist():
                mine = np.sort(heads[lids == lid])
                done = [int(self._freed_at[h:h + (1 << o)].max()) for h in mine.tolist()]
                ranked = sorted(zip(done, mine.tolist(), strict=True),
                                key=lambda x: (-x[0], x[1]))
                self._splice_heads(lid, np.array([h for _, h in ranked], dtype=np.int64),
                                   at_tail=False)
        for h, o in zip(rep_heads.tolist(), rep_orders.tolist(), strict=True):
            if self._bo[h] == o:
                self._mark_reported(h, self._lid_of_block(h, o))
        if self.free_notifiers:
            # One free that left a new large block (a merge result), as page by page frees
            # would have notified: the biggest such order.
            new_big = [o for o, arr in new_heads if o >= pageblock_order
                       for h in arr[0].tolist() if (h, o) not in old_big]
            if new_big:
                self._notify_free(max(new_big))

    def _list_del_many(self, heads: np.ndarray) -> None:
        """Unlink many free blocks at once (``_list_del`` for each, at numpy speed).

        Removed blocks form runs along their lists; each run is bridged by linking its outside
        predecessor to its outside successor, found by pointer jumping over the removed set.
        """
        R = np.asarray(heads, dtype=np.int64)
        if R.size > 1 and not bool(np.all(R[1:] > R[:-1])):
            R = np.unique(R)
        k = int(R.size)
        if k == 0:
            return
        if k <= 32:
            for h in R.tolist():
                o = self._bo[h]
                self._list_del(h, o, self._lid_of_block(h, o))
            return
        lids = self._lids_of_blocks(R)
        orders = self.buddy_order[R].astype(np.int64)

        def member(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pos = np.minimum(np.searchsorted(R, x), k - 1)
            return (x >= 0) & (R[pos] == x), pos

        succ = self.next[R].astype(np.int64)
        pred = self.prev[R].astype(np.int64)
        for arr in (succ, pred):
            # Pointer jumping: every removed block ends up pointing past its whole run.
            for _ in range(64):
                m, pos = member(arr)
                if not m.any():
                    break
                arr[m] = arr[pos[m]]
            else:  # pragma: no cover - would mean a cycle in a free list
                raise AssertionError("free list cycle while unlinking")
        in_pred, _ = member(self.prev[R].astype(np.int64))
        starts = ~in_pred  # first block of each removed run
        P, S = pred[starts], succ[starts]
        pm, sm = P >= 0, S >= 0
        self.next[P[pm]] = S[pm]
        self.prev[S[sm]] = P[sm]
        for p_, s_ in zip(P[~pm].tolist(), S[~pm].tolist(), strict=True):
            self._first[-1 - p_] = s_
        for p_, s_ in zip(P[~sm].tolist(), S[~sm].tolist(), strict=True):
            self._last[-1 - s_] = p_
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



def twins(ram: int, **kw: object) -> tuple[BuddyAllocator, ReferenceAllocator]:
    """The allocator under test and the reference, booted alike, with identical link arrays
    (``next``/``prev`` start uninitialised except at free-block heads)."""
    a = BuddyAllocator(ram, **kw)  # type: ignore[arg-type]
    r = ReferenceAllocator(ram, **kw)  # type: ignore[arg-type]
    a.next[:] = r.next
    a.prev[:] = r.prev
    return a, r


class TwinMachine(TwinRules):
    """Random single and bulk calls on both allocators; after each, everything is equal."""

    def __init__(self) -> None:
        super().__init__()
        # DMA with a reserved hole, a little DMA32 and a ragged end (a partial max-order
        # block); 2 cpus so per-cpu lists and their flushes interleave with bulk calls.
        self.a, self.r = twins(24 * MiB + 5 * 4096, reserved=[(1 * MiB, 3 * MiB + 4096)],
                               nr_cpus=2)
        self.held: dict[int, int] = {}  # pfn -> order
        self.isolated: dict[int, int] = {}
        self.notified: tuple[list[int], list[int]] = ([], [])
        self.a.register_free_notifier(self.notified[0].append)
        self.r.register_free_notifier(self.notified[1].append)

    @rule(order=st.integers(0, MAX_ORDER - 1), mt=st.sampled_from(
        [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]), cpu=st.integers(0, 1))
    def alloc(self, order: int, mt: int, cpu: int) -> None:
        p = self.a.alloc_pages(order, mt, cpu=cpu)
        assert p == self.r.alloc_pages(order, mt, cpu=cpu)
        if p is not None:
            self.held[p] = order

    @precondition(lambda self: self.held)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def free(self, data: st.DataObject, cpu: int) -> None:
        p = data.draw(st.sampled_from(sorted(self.held)))
        o = self.held.pop(p)
        self.a.free_pages(p, o, cpu=cpu)
        self.r.free_pages(p, o, cpu=cpu)

    @rule(n=st.integers(1, 7000), mt=st.sampled_from(
        [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]), balloon=st.booleans(),
        noretry=st.booleans())
    def alloc_bulk(self, n: int, mt: int, balloon: bool, noretry: bool) -> None:
        owner = OWNER_BALLOON if balloon else OWNER_GUEST
        got = self.a.alloc_pages_bulk(n, mt, owner=owner, noretry=noretry)
        np.testing.assert_array_equal(
            got, self.r.alloc_pages_bulk(n, mt, owner=owner, noretry=noretry))
        for p in got.tolist():
            self.held[p] = 0

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free_bulk(self, data: st.DataObject) -> None:
        # Order-0 pages only; pages of larger allocations are freed by free_pages.
        zero = sorted(p for p, o in self.held.items() if o == 0)
        if not zero:
            return
        how = data.draw(st.sampled_from(["prefix", "suffix", "random", "stride"]))
        if how == "prefix":
            sel = zero[:data.draw(st.integers(1, len(zero)))]
        elif how == "suffix":
            sel = zero[-data.draw(st.integers(1, len(zero))):]
        elif how == "stride":
            sel = zero[data.draw(st.integers(0, 2))::data.draw(st.integers(2, 5))]
        else:
            rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
            sel = sorted(rng.choice(zero, size=rng.integers(1, len(zero) + 1),
                                    replace=False).tolist())
        if not sel:
            return
        for p in sel:
            del self.held[p]
        # Unsorted input goes through the sorting path.
        order = np.array(sel[::-1] if data.draw(st.booleans()) else sel, dtype=np.int64)
        self.a.free_pages_bulk(order)
        self.r.free_pages_bulk(order.copy())


TestTwinMachine = TwinMachine.TestCase
TestTwinMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


def test_churn_on_a_guest_with_every_zone_matches_the_reference() -> None:
    """A seeded churn (bulk allocations of mixed types, scattered bulk frees, single calls)
    on a guest reaching ZONE_NORMAL: identical results call for call."""
    a, r = twins(4 * GiB + 24 * MiB + 3 * 4096, reserved=[(1 * MiB, 4 * MiB)], seed=5)
    rng = np.random.default_rng(7)
    live: list[np.ndarray] = []
    singles: list[tuple[int, int]] = []
    for step in range(60):
        mt = int(rng.choice([MIGRATE_MOVABLE, MIGRATE_UNMOVABLE, MIGRATE_RECLAIMABLE]))
        n = int(rng.integers(1, 40000)) if step % 7 else int(rng.integers(100_000, 300_000))
        got = a.alloc_pages_bulk(n, mt)
        np.testing.assert_array_equal(got, r.alloc_pages_bulk(n, mt))
        live.append(got)
        for _ in range(int(rng.integers(0, 20))):
            o = int(rng.integers(0, MAX_ORDER))
            cpu = int(rng.integers(2))
            p = a.alloc_pages(o, mt, cpu=cpu)
            assert p == r.alloc_pages(o, mt, cpu=cpu)
            if p is not None:
                singles.append((p, o))
        if len(live) > 3:
            # Free a random part of an old allocation: scattered pages, many max-order blocks.
            old = live.pop(int(rng.integers(len(live) - 1)))
            keep = rng.random(old.size) < rng.random()
            a.free_pages_bulk(old[~keep])
            r.free_pages_bulk(old[~keep])
            live.append(old[keep])
        if singles and step % 3 == 0:
            p, o = singles.pop(int(rng.integers(len(singles))))
            a.free_pages(p, o)
            r.free_pages(p, o)
        assert_same(a, r)
    a.check()


def test_run_blocks_cuts_runs_as_blocks_of_range() -> None:
    """The vectorised run cutting used by bulk frees against the one-run loop, over every run
    starting or ending at a block edge and a random sample of the rest."""
    M = MAX_ORDER_NR_PAGES
    rng = np.random.default_rng(3)
    s = np.concatenate((np.zeros(M, np.int64), np.arange(M, dtype=np.int64),
                        rng.integers(0, M, 20000)))
    e = np.concatenate((np.arange(1, M + 1, dtype=np.int64), np.full(M, M, np.int64),
                        np.zeros(20000, np.int64)))
    e[2 * M:] = s[2 * M:] + 1 + (rng.random(20000) * (M - s[2 * M:])).astype(np.int64)
    run, first, order = run_blocks(s, e)
    got: dict[int, list[tuple[int, int]]] = {}
    for i, f, o in zip(run.tolist(), first.tolist(), order.tolist(), strict=True):
        got.setdefault(i, []).append((f, o))
    for i, (a, b) in enumerate(zip(s.tolist(), e.tolist(), strict=True)):
        assert sorted(got[i]) == blocks_of_range(a, b), (a, b)


@pytest.mark.parametrize("second_mt", [MIGRATE_ISOLATE, MIGRATE_UNMOVABLE])
def test_bulk_free_of_a_whole_block_merges_only_types_that_mix(second_mt: int) -> None:
    """A bulk free leaving a whole max-order block free: an isolated pageblock in it keeps the
    two halves apart (two order-9 blocks); an unmovable one merges, taking the first half's
    type."""
    a, r = twins(24 * MiB, reserved=[(1 * MiB, 3 * MiB)])
    mb = 4096  # 16 MiB: the first max-order block of DMA32
    pa = a.alloc_pages_bulk(a.nr_free_pages())
    np.testing.assert_array_equal(pa, r.alloc_pages_bulk(r.nr_free_pages()))
    for x in (a, r):
        if second_mt == MIGRATE_ISOLATE:
            x.set_migratetype_isolate(mb + 512)
        else:
            x.pageblock_mt[(mb + 512) >> pageblock_order] = second_mt
    sel = pa[(pa >= mb) & (pa < mb + MAX_ORDER_NR_PAGES)]
    assert sel.size == MAX_ORDER_NR_PAGES
    a.free_pages_bulk(sel)
    r.free_pages_bulk(sel)
    assert_same(a, r)
    if second_mt == MIGRATE_ISOLATE:
        assert a.page_order(mb) == a.page_order(mb + 512) == pageblock_order
        assert a.pageblock_mt[(mb + 512) >> pageblock_order] == MIGRATE_ISOLATE
    else:
        assert a.page_order(mb) == MAX_ORDER - 1
        assert a.pageblock_mt[(mb + 512) >> pageblock_order] == MIGRATE_MOVABLE
    a.check()
