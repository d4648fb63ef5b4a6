"""guest_model.walk: the seed's walk_free_mem_block, its stale-link hazard, and our safe walker.

Expected blocks come from the allocator's per-page arrays (``buddy_order``, ``pageblock_mt``),
not from its lists, so the walk is checked against something it does not read.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_TYPES,
    PG_ALLOC,
    PG_BUDDY,
    PG_PCP,
    ZONE_DMA32,
    BuddyAllocator,
    list_id,
    list_sentinel,
    pageblock_order,
)
from guest_model.walk import (
    FreeBlockWalker,
    WalkStats,
    report_free_page_block,
    schedule_walk,
    walk_free_mem_block,
)
from guestmem import DirtyLog
from guestmem.clock import Scheduler
from guestmem.pages import PageVersions

MiB = 1 << 20


def free_blocks_from_arrays(a: BuddyAllocator, min_order: int) -> Counter[tuple[int, int]]:
    heads = np.flatnonzero(a.buddy_order >= min_order)
    return Counter((int(h), 1 << int(a.buddy_order[h])) for h in heads)


def fragment(a: BuddyAllocator, seed: int, ops: int = 400) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    held: list[tuple[int, int]] = []
    for _ in range(ops):
        if held and rng.random() < 0.4:
            hp, o = held.pop(int(rng.integers(len(held))))
            a.free_pages(hp, o)
        else:
            o = int(rng.integers(0, MAX_ORDER))
            p = a.alloc_pages(o, int(rng.integers(0, 3)))
            if p is not None:
                held.append((p, o))
    return held


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), min_order=st.integers(0, MAX_ORDER - 1),
       drain=st.booleans())
def test_quiet_walk_reports_exactly_the_free_lists(seed: int, min_order: int, drain: bool) -> None:
    a = BuddyAllocator(40 * MiB, reserved=[(1 * MiB, 4 * MiB)], seed=seed)
    fragment(a, seed)
    if drain:
        a.drain_pcp()
    for safe in (True, False):
        seen: list[tuple[int, int]] = []
        stats = walk_free_mem_block(seen, min_order, lambda o, p, n: o.append((p, n)),
                                    allocator=a, safe=safe)
        assert Counter(seen) == free_blocks_from_arrays(a, min_order)
        assert len(seen) == len(set(seen))  # no repeats without concurrency
        assert stats.stale_links == stats.wild == stats.restarts_gone == stats.runaway == 0
        # Order of the seed: zones ascending, orders descending, migratetypes ascending.
        keys = [(a.zone_of(p), -(n.bit_length() - 1),
                 int(a.pageblock_mt[p >> pageblock_order])) for p, n in seen]
        assert keys == sorted(keys)
    # Per-cpu pages are free but never reported.
    pcp = np.flatnonzero(a.state == PG_PCP)
    assert not (set(pcp.tolist()) & {p for p, _ in seen})


def test_report_free_page_block_rules() -> None:
    a = BuddyAllocator(64 * MiB)
    z = a.zones[ZONE_DMA32]
    o = MAX_ORDER - 1
    first = report_free_page_block(z, o, MIGRATE_MOVABLE, None)
    assert first == z.start_pfn
    nxt = report_free_page_block(z, o, MIGRATE_MOVABLE, first)
    assert nxt == first + 1024
    assert report_free_page_block(z, o, 0, None) is None  # empty list: -EAGAIN
    last = a.free_blocks(list_id(z.idx, o, MIGRATE_MOVABLE))[-1]
    assert report_free_page_block(z, o, MIGRATE_MOVABLE, last) is None  # end of the list


def two_walkers_and_take(safe_first: bool = True) -> tuple[BuddyAllocator, FreeBlockWalker,
                                                           FreeBlockWalker, int, int]:
    """Both walkers hand out the first DMA32 max-order block, then a workload allocates the
    first two blocks of that list (the handed-out one and its successor) and writes them."""
    a = BuddyAllocator(64 * MiB)
    # Keep the DMA zone out of the way: the walk and the allocations meet in DMA32.
    seed_w = FreeBlockWalker(a, MAX_ORDER - 1, safe=False)
    safe_w = FreeBlockWalker(a, MAX_ORDER - 1, safe=True)
    for w in (seed_w, safe_w):
        while True:
            blk = w.step()
            assert blk is not None
            if a.zone_of(blk[0]) == ZONE_DMA32:
                break
    x = a.alloc_pages(MAX_ORDER - 1)
    y = a.alloc_pages(MAX_ORDER - 1)
    assert x is not None and y is not None and y == x + 1024
    return a, seed_w, safe_w, x, y


def test_seed_follows_a_stale_link_and_reports_an_allocated_block() -> None:
    a, seed_w, safe_w, x, y = two_walkers_and_take()
    assert seed_w._page == x and safe_w._page == x
    blk = seed_w.step()
    # The seed reads x's lru.next although x left the list: it hands out y, which is allocated.
    assert blk == (y, 1024)
    assert a.state[y] != PG_BUDDY
    assert seed_w.stats.stale_links == 1
    # Our walker notices x is gone and starts the list again: the block it reports is free.
    blk2 = safe_w.step()
    assert blk2 is not None and np.all(a.state[blk2[0]:blk2[0] + blk2[1]] == PG_BUDDY)
    assert safe_w.stats.restarts_gone == 1 and safe_w.stats.stale_links == 0


def test_split_block_restarts_at_the_head_in_both() -> None:
    a = BuddyAllocator(64 * MiB)
    z = a.zones[ZONE_DMA32]
    o = MAX_ORDER - 1
    for safe in (False, True):
        p = report_free_page_block(z, o, MIGRATE_MOVABLE, None, safe=safe)
        assert p is not None
        q = a.alloc_pages(0)  # splits p (the first block of the list): p is now order-0 allocated
        assert q == p
        a.free_pages(q, 0)  # back on a per-cpu list ...
        a.drain_pcp()  # ... then merged into a max-order block at p again
        # A different case: split p and leave its upper half free (a buddy of order 9).
        r = a.alloc_pages(MAX_ORDER - 2)
        assert r is not None
        stats = WalkStats()
        # Hand back the upper half of the split block: a buddy, but of order 9, not 10.
        assert a.page_order(r + 512) == MAX_ORDER - 2
        got = report_free_page_block(z, o, MIGRATE_MOVABLE, r + 512, safe=safe, stats=stats)
        assert got == a.list_first(list_id(z.idx, o, MIGRATE_MOVABLE))
        assert stats.restarts_split == 1
        a.free_pages(r, MAX_ORDER - 2)


def test_seed_hazards_are_bounded_wild_and_runaway() -> None:
    """A stale link is whatever the page's new owner left in lru; model two such owners."""
    a = BuddyAllocator(64 * MiB)
    z = a.zones[ZONE_DMA32]
    o = MAX_ORDER - 1
    lid = list_id(z.idx, o, MIGRATE_MOVABLE)
    # Owner 1 put the page on a list of its own whose head we model as another list's head.
    p = report_free_page_block(z, o, MIGRATE_MOVABLE, None, safe=False)
    x = a.alloc_pages(o)
    assert x == p
    a.next[x] = list_sentinel(list_id(z.idx, 3, 0))
    w = FreeBlockWalker(a, o, safe=False)
    w._zi = [zz.idx for zz in w._zones].index(ZONE_DMA32)
    w._page, w._order, w._mt = x, o, MIGRATE_MOVABLE
    assert w.step() is None or w.stats.wild == 1
    assert w.stats.wild == 1
    # Owner 2 made the page point at itself: the seed would spin; our model stops at a bound.
    y = a.alloc_pages(o)
    assert y is not None
    a.next[y] = y
    w2 = FreeBlockWalker(a, o, safe=False)
    w2._zi = [zz.idx for zz in w2._zones].index(ZONE_DMA32)
    w2._page, w2._order, w2._mt = y, o, MIGRATE_MOVABLE
    n = 0
    while w2.step() is not None:
        n += 1
        assert n < 10_000
    assert w2.stats.runaway == 1
    assert a.list_count(lid) > 0


def test_visit_that_allocates_shows_the_difference() -> None:
    """The seed's visit runs outside the lock; if it allocates, the seed reports used pages."""
    def run(safe: bool) -> tuple[int, int]:
        a = BuddyAllocator(96 * MiB)
        bad = 0

        def visit(_: object, pfn: int, n: int) -> None:
            nonlocal bad
            if not np.all(a.state[pfn:pfn + n] == PG_BUDDY):
                bad += 1
            # Something else in the guest grabs two max-order blocks meanwhile.
            for _ in range(2):
                a.alloc_pages(MAX_ORDER - 1)

        st_ = walk_free_mem_block(None, MAX_ORDER - 1, visit, allocator=a, safe=safe)
        return bad, st_.stale_links

    bad_seed, stale_seed = run(False)
    bad_safe, stale_safe = run(True)
    assert bad_seed > 0 and stale_seed > 0
    assert bad_safe == 0 and stale_safe == 0


def churn_event(sched: Scheduler, a: BuddyAllocator, pv: PageVersions, rng: np.random.Generator,
                held: list[tuple[int, int]], dt: float) -> None:
    """Background guest activity: allocate (and write) or free a block of a random order."""
    if held and rng.random() < 0.5:
        hp, o = held.pop(int(rng.integers(len(held))))
        a.free_pages(hp, o, cpu=int(rng.integers(2)))
    else:
        o = int(rng.choice([0, 0, 1, 3, 9, 10]))
        p = a.alloc_pages(o, int(rng.integers(3)), cpu=int(rng.integers(2)))
        if p is not None:
            pv.write_range(p, 1 << o, "data")
            held.append((p, o))
    sched.after(float(rng.exponential(dt)), churn_event, sched, a, pv, rng, held, dt)


def run_concurrent(seed: int, safe: bool) -> tuple[int, int, int, bool]:
    n = (96 * MiB) >> 12
    log = DirtyLog(n)
    pv = PageVersions(n, log)
    a = BuddyAllocator(96 * MiB, pages=pv, seed=seed)
    rng = np.random.default_rng(seed)
    held = fragment(a, seed, 200)
    sched = Scheduler()
    log.start()
    reports: list[tuple[int, int]] = []
    not_free = 0

    def visit(_: object, pfn: int, nr: int) -> None:
        nonlocal not_free
        # At the instant of the report (nothing runs in between), is the block free?
        if not np.all(a.state[pfn:pfn + nr] == PG_BUDDY):
            not_free += 1
        reports.append((pfn, nr))

    w = FreeBlockWalker(a, 0, safe=safe)
    h = schedule_walk(sched, w, cost_per_block=100e-6, visit=visit)
    sched.after(0.0, churn_event, sched, a, pv, rng, held, 4e-6)
    for _ in range(1_000_000):  # until the walk ends (bounded)
        if h.finished is not None or not sched.run_next():
            break
    assert h.finished is not None
    # Writes after a report are in the dirty log: a reported block that the guest took and wrote
    # afterwards is dirty, so a host that snapshots before using hints would resend it.
    dirty = log.peek()
    written_after = 0
    logged = True
    for pfn, nr in reports:
        if np.any(a.state[pfn:pfn + nr] == PG_ALLOC) and np.any(pv.version[pfn:pfn + nr] >= 2):
            written_after += 1
            logged &= bool(dirty[pfn:pfn + nr].any())
    return not_free, w.stats.stale_links, written_after, logged


@pytest.mark.parametrize("seed", range(6))
def test_concurrent_safe_walk_reports_only_free_blocks(seed: int) -> None:
    not_free, stale, written_after, logged = run_concurrent(seed, safe=True)
    assert not_free == 0 and stale == 0
    assert logged
    # The race the seed accepts still exists: blocks get allocated and written after reports.
    if seed == 0:
        assert written_after > 0


def test_concurrent_seed_walk_reports_blocks_in_use() -> None:
    results = [run_concurrent(seed, safe=False) for seed in range(6)]
    assert sum(r[1] for r in results) > 0  # the seed followed stale links ...
    assert sum(r[0] for r in results) > 0  # ... and reported blocks that were not free


class WalkMachine(RuleBasedStateMachine):
    """A safe walk interleaved with arbitrary guest activity: every block it reports is free
    at that instant; a walk with nothing in between reports exactly the free lists."""

    def __init__(self) -> None:
        super().__init__()
        # DMA only: the walk and the allocations meet in the same zone.
        self.a = BuddyAllocator(16 * MiB, reserved=[(1 * MiB, 1 * MiB)])
        self.held: list[tuple[int, int]] = []
        self.w = FreeBlockWalker(self.a, 0)

    @rule(order=st.integers(0, MAX_ORDER - 1), mt=st.integers(0, 2), cpu=st.integers(0, 1))
    def alloc(self, order: int, mt: int, cpu: int) -> None:
        p = self.a.alloc_pages(order, mt, cpu=cpu)
        if p is not None:
            self.held.append((p, order))

    @precondition(lambda self: self.w.position is not None)
    @rule(k=st.sampled_from([2, 1, 3]))
    def alloc_like_the_walk(self, k: int) -> None:
        """Allocations of the order and type being walked: they take blocks off that very
        list, so the block handed back and its neighbours leave between two steps."""
        pos = self.w.position
        assert pos is not None
        _, order, mt = pos
        for _ in range(k):
            self.alloc(order, mt if mt < 3 else 1, 0)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 10_000), cpu=st.integers(0, 1))
    def free(self, i: int, cpu: int) -> None:
        p, o = self.held.pop(i % len(self.held))
        self.a.free_pages(p, o, cpu=cpu)

    @rule()
    def drain(self) -> None:
        self.a.drain_pcp()

    @rule(n=st.sampled_from([1, 1, 2, 8]))
    def walk_steps(self, n: int) -> None:
        for _ in range(n):
            blk = self.w.step()
            if blk is None:
                self.w = FreeBlockWalker(self.a, 0)
                return
            pfn, nr = blk
            assert np.all(self.a.state[pfn:pfn + nr] == PG_BUDDY), f"reported {pfn:#x} not free"
            assert self.a.page_order(pfn) == nr.bit_length() - 1

    @rule(min_order=st.integers(0, MAX_ORDER - 1))
    def quiet_walk(self, min_order: int) -> None:
        seen: list[tuple[int, int]] = []
        walk_free_mem_block(seen, min_order, lambda o, p, n: o.append((p, n)), allocator=self.a)
        assert Counter(seen) == free_blocks_from_arrays(self.a, min_order)


TestWalkMachine = WalkMachine.TestCase
TestWalkMachine.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)


def test_schedule_walk_costs_simulated_time_and_can_be_cancelled() -> None:
    a = BuddyAllocator(64 * MiB)
    sched = Scheduler()
    times: list[float] = []
    done: list[float] = []
    h = schedule_walk(sched, FreeBlockWalker(a, MAX_ORDER - 1), cost_per_block=0.001,
                      visit=lambda _o, p, n: times.append(sched.now),
                      on_done=lambda hh: done.append(hh.finished or -1.0))
    sched.run_until(10.0)
    nblocks = int(a.free_counts()[:, MAX_ORDER - 1, :].sum())
    assert len(times) == nblocks
    assert np.allclose(np.diff(times), 0.001)
    assert done and done[0] == pytest.approx(nblocks * 0.001)
    times.clear()
    h2 = schedule_walk(sched, FreeBlockWalker(a, 0), cost_per_block=0.001,
                       visit=lambda _o, p, n: times.append(sched.now))
    sched.run_until(sched.now + 0.0025)
    h2.cancel()
    sched.run_until(sched.now + 1.0)
    assert len(times) == 3 and h2.finished is None
    assert h.finished is not None


def test_small_guest_walks_only_populated_zones() -> None:
    a = BuddyAllocator(8 * MiB)  # DMA only
    assert [z.populated for z in a.zones] == [True, False, False]
    w = FreeBlockWalker(a, 0)
    blocks = []
    while (b := w.step()) is not None:
        blocks.append(b)
    assert sum(n for _, n in blocks) == a.nr_free_pages() == 2048
    assert w.stats.calls == MAX_ORDER * MIGRATE_TYPES + len(blocks)
