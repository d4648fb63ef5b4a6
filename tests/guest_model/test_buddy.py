"""guest_model.buddy: the simulated guest's page allocator.

The brute-force recount here reads only the per-page arrays (``buddy_order``, ``state``,
``pageblock_mt``) and rebuilds the per-list counts from scratch, so it does not share the
allocator's bookkeeping; ``BuddyAllocator.check()`` additionally walks every linked list.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_PCPTYPES,
    MIGRATE_RECLAIMABLE,
    MIGRATE_TYPES,
    MIGRATE_UNMOVABLE,
    NR_ZONES,
    OWNER_BALLOON,
    PG_ALLOC,
    PG_BALLOON,
    PG_BUDDY,
    PG_ISOLATED,
    PG_PCP,
    PG_RESERVED,
    WMARK_MIN,
    ZONE_DMA,
    ZONE_DMA32,
    ZONE_NORMAL,
    BuddyAllocator,
    BuddyError,
    pageblock_order,
)
from guestmem import DirtyLog
from guestmem.pages import POISON, ZERO, PageVersions

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


def test_boot_layout_zones_and_reserved() -> None:
    ram = 4 * GiB + 64 * MiB + 12 * 4096  # a ragged end
    a = BuddyAllocator(ram, reserved=[(1 * MiB, 4 * MiB), (0, 1)])
    assert [z.name for z in a.zones] == ["DMA", "DMA32", "Normal"]
    assert (a.zones[0].start_pfn, a.zones[0].end_pfn) == (0, 4096)
    assert (a.zones[1].start_pfn, a.zones[1].end_pfn) == (4096, 1 << 20)
    assert a.zones[2].end_pfn == ram >> 12
    reserved = 1 + (4 * MiB >> 12)  # pfn 0 (1 byte rounds out to a page) and the driver area
    assert a.nr_free_pages() == (ram >> 12) - reserved
    assert int(np.count_nonzero(a.state == PG_RESERVED)) == reserved
    assert a.zones[0].managed_pages == 4096 - reserved
    np.testing.assert_array_equal(a.free_counts(), recount(a))
    a.check()
    assert_maximal(a)
    # The ragged end is 12 pages: blocks of order 3 and 2 at the top of Normal.
    top = (ram >> 12) - 12
    assert a.page_order(top) == 3 and a.page_order(top + 8) == 2
    # All memory starts movable; the big middle is max-order blocks in address order.
    counts = a.free_counts()
    assert counts[:, :, MIGRATE_MOVABLE].sum() == counts.sum()
    lid = (ZONE_DMA32 * MAX_ORDER + MAX_ORDER - 1) * MIGRATE_TYPES + MIGRATE_MOVABLE
    blocks = a.free_blocks(lid)
    assert blocks == sorted(blocks) and len(blocks) == (4 * GiB - 16 * MiB) >> 22


def test_watermarks_look_like_linux() -> None:
    a = BuddyAllocator(8 * GiB)
    # min_free_kbytes = sqrt(16 * 8 GiB in KiB) = 11585 KiB -> 2896 pages, spread by size.
    assert sum(z.watermark[WMARK_MIN] for z in a.zones) in range(2890, 2897)
    n = a.zones[ZONE_NORMAL]
    assert n.watermark[0] < n.watermark[1] < n.watermark[2]
    assert n.pcp_batch == 63 and n.pcp_high == 378
    # DMA32 is protected from allocations that could have used Normal.
    assert a.zones[ZONE_DMA32].lowmem_reserve[ZONE_NORMAL] == n.managed_pages // 256


def test_split_and_merge_back() -> None:
    a = BuddyAllocator(64 * MiB)
    before = a.free_counts()
    p = a.alloc_pages(3)
    assert p is not None and p % 8 == 0
    assert np.all(a.state[p:p + 8] == PG_ALLOC)
    # A max-order block was split: one block of each order 3..9 came back on the lists.
    diff = (a.free_counts() - before).sum(axis=(0, 2))
    assert diff[MAX_ORDER - 1] == -1 and all(diff[o] == 1 for o in range(3, MAX_ORDER - 1))
    a.free_pages(p, 3)
    np.testing.assert_array_equal(a.free_counts(), before)
    a.check()


def test_pcp_lists_hide_free_pages_until_drained() -> None:
    a = BuddyAllocator(64 * MiB, nr_cpus=2)
    free0 = a.nr_free_pages()
    p = a.alloc_pages(0, cpu=1)
    assert p is not None
    z = a.zones[a.zone_of(p)]
    # The refill took a whole batch from the buddy; the rest waits on cpu 1's list.
    assert a.nr_free_pages() == free0 - z.pcp_batch
    assert a.nr_pcp_pages() == z.pcp_batch - 1
    a.free_pages(p, 0, cpu=1)
    assert a.state[p] == PG_PCP and a.is_free(p)
    assert a.page_order(p) == -1  # not on a buddy list: a walk cannot see it
    a.drain_pcp()
    assert a.nr_pcp_pages() == 0 and a.nr_free_pages() == free0
    a.check()


def test_pcp_high_flushes_a_batch() -> None:
    a = BuddyAllocator(256 * MiB)
    z = a.zones[ZONE_DMA32]
    pfns = [a.alloc_pages(0) for _ in range(z.pcp_high + z.pcp_batch)]
    assert all(p is not None for p in pfns)
    a.drain_pcp()
    flushes = a.counters["pcp_flush"]
    for p in pfns:
        assert p is not None
        a.free_pages(p, 0)
    assert a.counters["pcp_flush"] > flushes
    assert a.nr_pcp_pages() < z.pcp_high
    a.check()


def test_fallback_claims_a_pageblock_for_unmovable() -> None:
    a = BuddyAllocator(64 * MiB)
    assert a.free_counts()[:, :, MIGRATE_UNMOVABLE].sum() == 0
    p = a.alloc_pages(0, MIGRATE_UNMOVABLE)
    assert p is not None
    assert a.counters["pageblock_claim"] >= 1
    # The pageblock (here a whole max-order block) is now unmovable, its rest on unmovable lists.
    assert a.pageblock_mt[p >> pageblock_order] == MIGRATE_UNMOVABLE
    assert a.free_counts()[:, :, MIGRATE_UNMOVABLE].sum() > 0
    np.testing.assert_array_equal(a.free_counts(), recount(a))
    a.check()


def test_exhaustion_respects_min_watermark_and_noretry() -> None:
    a = BuddyAllocator(64 * MiB)
    got = []
    while (p := a.alloc_pages(MAX_ORDER - 1, noretry=True)) is not None:
        got.append(p)
    assert got and a.counters["alloc_fail"] == 1
    for z in a.zones:
        if z.populated:
            assert a.nr_free_pages(z.idx) > 0
    # Order-0 allocations still find pages above min.
    small = a.alloc_pages(0)
    assert small is not None
    for p in got:
        a.free_pages(p, MAX_ORDER - 1)
    a.free_pages(small, 0)
    a.drain_pcp()
    assert_maximal(a)


def test_misuse_raises_with_the_culprit() -> None:
    a = BuddyAllocator(64 * MiB, reserved=[(1 * MiB, 4 * MiB)])
    p = a.alloc_pages(2)
    assert p is not None
    a.free_pages(p, 2)
    with pytest.raises(BuddyError, match="double free"):
        a.free_pages(p, 2)
    with pytest.raises(BuddyError, match="double free or reserved"):
        a.free_pages(1 * MiB >> 12, 0)
    with pytest.raises(BuddyError, match="not aligned"):
        a.free_pages(p + 1, 1)
    with pytest.raises(BuddyError, match="order"):
        a.alloc_pages(MAX_ORDER)
    with pytest.raises(BuddyError, match="migratetype"):
        a.alloc_pages(0, 4)
    with pytest.raises(BuddyError, match="outside RAM"):
        a.free_pages(a.ram_pages, 0)
    for pfn in (-1, a.ram_pages):  # -1 used to answer for the last page
        with pytest.raises(BuddyError, match="outside RAM"):
            a.is_free(pfn)
    a.check()


def test_reserved_pages_are_never_handed_out() -> None:
    a = BuddyAllocator(32 * MiB, reserved=[(1 * MiB, 4 * MiB)])
    got = a.alloc_pages_bulk(a.ram_pages)
    singles = [p for p in iter(lambda: a.alloc_pages(0), None)]
    got = np.concatenate([got, np.array(singles, dtype=np.int64)])
    res = np.arange(256, 256 + 1024)
    assert not np.isin(res, got).any()
    assert np.all(a.state[res] == PG_RESERVED)


def test_memory_init_writes_and_dirty_log() -> None:
    n = (64 * MiB) >> 12
    log = DirtyLog(n)
    pv = PageVersions(n, log)
    a = BuddyAllocator(64 * MiB, pages=pv, init_on_alloc=True, init_on_free=True)
    log.start()
    p = a.alloc_pages(4)
    assert p is not None
    assert log.sync()[p:p + 16].all()  # init_on_alloc: the allocation wrote (zeroed) the block
    pv.write_range(p, 16, "data")
    assert np.all(pv.version[p:p + 16] >= 2)
    a.free_pages(p, 4)
    assert np.all(pv.version[p:p + 16] == ZERO)  # init_on_free
    # Poisoning takes precedence over both init options.
    pv2 = PageVersions(n)
    b = BuddyAllocator(64 * MiB, pages=pv2, init_on_alloc=True, init_on_free=True,
                       page_poisoning=True)
    assert not b.init_on_alloc and not b.init_on_free
    assert np.all(pv2.version == POISON)  # boot memory was freed through the poisoning path
    q = b.alloc_pages(2)
    assert q is not None
    pv2.write_range(q, 4, "data")
    b.free_pages(q, 2)
    assert np.all(pv2.version[q:q + 4] == POISON)
    # No init at all: allocation leaves old content.
    pv3 = PageVersions(n)
    c = BuddyAllocator(64 * MiB, pages=pv3, init_on_alloc=False)
    r = c.alloc_pages(0)
    assert r is not None
    pv3.write_range(r, 1, "data")
    v = int(pv3.version[r])
    c.free_pages(r, 0)
    assert c.alloc_pages(0) == r and pv3.version[r] == v  # pcp hands the hot page back


def test_balloon_owner_is_not_in_use() -> None:
    a = BuddyAllocator(64 * MiB)
    p = a.alloc_pages(MAX_ORDER - 1, owner=OWNER_BALLOON)
    q = a.alloc_pages(0)
    assert p is not None and q is not None
    assert np.all(a.state[p:p + 1024] == PG_BALLOON)
    mask = a.in_use_mask()
    assert not mask[p:p + 1024].any() and mask[q]
    assert int(mask.sum()) == 1


def test_bulk_matches_layout_of_single_frees() -> None:
    """Freeing pages in bulk leaves the same free-block layout as freeing them one by one."""
    rng = np.random.default_rng(5)
    a = BuddyAllocator(48 * MiB, seed=1)
    b = BuddyAllocator(48 * MiB, seed=1)
    pa = a.alloc_pages_bulk(9000)
    pb = b.alloc_pages_bulk(9000)
    np.testing.assert_array_equal(pa, pb)
    assert np.unique(pa).size == 9000 and np.all(a.state[pa] == PG_ALLOC)
    sel = rng.choice(pa, 5000, replace=False)
    a.free_pages_bulk(sel)
    for p in sel.tolist():
        b.free_pages(int(p), 0)
    b.drain_pcp()
    a.check()
    b.check()
    np.testing.assert_array_equal(a.state, b.state)
    np.testing.assert_array_equal(a.buddy_order, b.buddy_order)
    np.testing.assert_array_equal(a.free_counts().sum(axis=2), b.free_counts().sum(axis=2))


def test_deterministic_from_seed() -> None:
    def run(seed: int) -> list[int | None]:
        a = BuddyAllocator(64 * MiB, seed=seed, shuffle=True)
        rng = np.random.default_rng(seed)
        held: list[tuple[int, int]] = []
        out: list[int | None] = []
        for _ in range(300):
            if held and rng.random() < 0.45:
                hp, o = held.pop(int(rng.integers(len(held))))
                a.free_pages(hp, o)
            else:
                o = int(rng.integers(0, 6))
                p = a.alloc_pages(o, int(rng.integers(0, 3)))
                out.append(p)
                if p is not None:
                    held.append((p, o))
        return out

    assert run(3) == run(3)


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/bulk/drain sequences against a model of who holds what."""

    def __init__(self) -> None:
        super().__init__()
        # 24 MiB: all of DMA (with a reserved hole) and a little DMA32, 2 cpus.
        self.a = BuddyAllocator(24 * MiB + 5 * 4096, reserved=[(1 * MiB, 3 * MiB + 4096)],
                                nr_cpus=2)
        self.fresh = self.a.free_counts().sum(axis=2)
        self.held: dict[int, tuple[int, int]] = {}  # pfn -> (order, owner state)
        self.isolated: dict[int, int] = {}  # pfn -> order (page reporting)

    @rule(order=st.integers(0, MAX_ORDER - 1), mt=st.sampled_from(
        [MIGRATE_UNMOVABLE, MIGRATE_MOVABLE, MIGRATE_RECLAIMABLE]), cpu=st.integers(0, 1),
        balloon=st.booleans())
    def alloc(self, order: int, mt: int, cpu: int, balloon: bool) -> None:
        owner = OWNER_BALLOON if balloon else PG_ALLOC
        p = self.a.alloc_pages(order, mt, cpu=cpu, owner=owner)
        if p is None:
            return
        assert p % (1 << order) == 0
        for q, (o, _) in self.held.items():
            assert p + (1 << order) <= q or q + (1 << o) <= p, "double allocation"
        self.held[p] = (order, owner)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), cpu=st.integers(0, 1))
    def free(self, data: st.DataObject, cpu: int) -> None:
        p = data.draw(st.sampled_from(sorted(self.held)))
        o, _ = self.held.pop(p)
        self.a.free_pages(p, o, cpu=cpu)

    @rule(n=st.integers(1, 3000), mt=st.sampled_from([MIGRATE_UNMOVABLE, MIGRATE_MOVABLE]))
    def alloc_bulk(self, n: int, mt: int) -> None:
        pfns = self.a.alloc_pages_bulk(n, mt)
        assert pfns.size <= n and np.unique(pfns).size == pfns.size
        for p in pfns.tolist():
            assert p not in self.held
            self.held[p] = (0, PG_ALLOC)

    @precondition(lambda self: any(o == 0 for o, _ in self.held.values()))
    @rule(data=st.data())
    def free_bulk(self, data: st.DataObject) -> None:
        zero = sorted(p for p, (o, _) in self.held.items() if o == 0)
        k = data.draw(st.integers(1, len(zero)))
        sel = zero[:k] if data.draw(st.booleans()) else zero[-k:]
        for p in sel:
            del self.held[p]
        self.a.free_pages_bulk(np.array(sel))

    @rule()
    def drain(self) -> None:
        self.a.drain_pcp()

    @rule(order=st.integers(pageblock_order, MAX_ORDER - 1), skip=st.booleans())
    def isolate(self, order: int, skip: bool) -> None:
        p = self.a.isolate_free_block(order, skip_reported=skip)
        if p is None:
            return
        assert p % (1 << order) == 0 and p not in self.isolated
        assert (self.a.state[p:p + (1 << order)] == PG_ISOLATED).all()
        self.isolated[p] = order

    @precondition(lambda self: self.isolated)
    @rule(data=st.data(), reported=st.booleans())
    def putback(self, data: st.DataObject, reported: bool) -> None:
        p = data.draw(st.sampled_from(sorted(self.isolated)))
        o = self.isolated.pop(p)
        self.a.putback_block(p, o, reported=reported)
        # Marked only if it stayed a block of its own order (no merge).
        assert self.a.is_reported(p) == (reported and self.a.page_order(p) == o)

    @rule(data=st.data())
    def double_free_is_refused(self, data: st.DataObject) -> None:
        p = data.draw(st.integers(0, self.a.ram_pages - 1))
        if self.a.state[p] in (PG_ALLOC, PG_BALLOON):
            return
        with pytest.raises(BuddyError):
            self.a.free_pages(p, 0)

    @invariant()
    def no_page_both_free_and_allocated(self) -> None:
        expect = np.zeros(self.a.ram_pages, dtype=np.uint8)
        for p, (o, owner) in self.held.items():
            expect[p:p + (1 << o)] = owner
        alloc = (self.a.state == PG_ALLOC) | (self.a.state == PG_BALLOON)
        np.testing.assert_array_equal(np.flatnonzero(alloc), np.flatnonzero(expect))
        np.testing.assert_array_equal(self.a.state[expect > 0], expect[expect > 0])
        iso = np.zeros(self.a.ram_pages, dtype=np.bool_)
        for p, o in self.isolated.items():
            iso[p:p + (1 << o)] = True
        np.testing.assert_array_equal(iso, self.a.state == PG_ISOLATED)

    @invariant()
    def counts_match_brute_force(self) -> None:
        np.testing.assert_array_equal(self.a.free_counts(), recount(self.a))
        self.a.check()

    def teardown(self) -> None:
        for p, (o, _) in list(self.held.items()):
            self.a.free_pages(p, o)
        for p, o in list(self.isolated.items()):
            self.a.putback_block(p, o)
        self.a.drain_pcp()
        # Everything coalesces back into maximal blocks: same blocks per zone/order as at boot.
        np.testing.assert_array_equal(self.a.free_counts().sum(axis=2), self.fresh)
        assert_maximal(self.a)
        self.a.check()


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


def test_shrinker_runs_before_an_allocation_fails() -> None:
    """A held-blocks shrinker (like the balloon's) is asked for memory under pressure, but not
    by __GFP_NORETRY allocations."""
    a = BuddyAllocator(64 * MiB)
    held: list[int] = []
    while (p := a.alloc_pages(MAX_ORDER - 1, noretry=True, owner=OWNER_BALLOON)) is not None:
        held.append(p)
    assert held
    scans: list[int] = []

    def count() -> int:
        return len(held) << (MAX_ORDER - 1)

    def scan(nr: int) -> int:
        scans.append(nr)
        freed = 0
        while held and freed < nr:
            a.free_pages(held.pop(), MAX_ORDER - 1)
            freed += 1 << (MAX_ORDER - 1)
        return freed

    a.register_shrinker(count, scan)
    assert a.alloc_pages(MAX_ORDER - 1, noretry=True) is None and not scans
    got = a.alloc_pages(MAX_ORDER - 1)
    assert got is not None and scans and a.counters["reclaimed_pages"] >= 1024
    bulk = a.alloc_pages_bulk(4096)
    assert bulk.size == 4096
    a.check()


def test_bulk_free_unlinks_many_blocks_at_once() -> None:
    """Freeing every other page, then the rest: the second bulk free must take thousands of
    order-0 blocks off their lists (vectorised unlinking) and merge all back."""
    a = BuddyAllocator(48 * MiB)
    fresh = a.free_counts().sum(axis=2)
    pf = a.alloc_pages_bulk(a.nr_free_pages())
    pf = pf[pf.size % 2:]  # an even count
    a.free_pages_bulk(pf[::2])
    a.check()
    assert a.free_counts()[:, 0, :].sum() >= pf.size // 2 - 64
    # A few single frees/allocs in between, so the lists are not in address order.
    for p in pf[1:200:2].tolist():
        a.free_pages(p, 0)
    a.drain_pcp()
    rest = pf[201::2]
    a.free_pages_bulk(rest)
    a.check()
    left = np.flatnonzero(a.state == PG_ALLOC)
    a.free_pages_bulk(left)
    a.check()
    np.testing.assert_array_equal(a.free_counts().sum(axis=2), fresh)
    assert_maximal(a)


def test_isolated_pageblock_is_not_allocated_from() -> None:
    a = BuddyAllocator(32 * MiB)
    fresh = a.free_counts().sum(axis=2)
    target = 5 * 1024 + 512  # the upper pageblock of a max-order block in DMA32
    old = a.set_migratetype_isolate(target)
    assert old == MIGRATE_MOVABLE
    assert a.pageblock_mt[target >> pageblock_order] == 4
    assert a.page_order(target) == pageblock_order
    a.check()
    got = a.alloc_pages_bulk(a.nr_free_pages())
    got = np.concatenate([got, np.array([p for p in iter(lambda: a.alloc_pages(0), None)])])
    assert not np.any((got >= target) & (got < target + 512))
    a.free_pages_bulk(got[got >= 0].astype(np.int64))
    a.drain_pcp()
    a.check()
    a.unset_migratetype_isolate(target)
    a.check()
    np.testing.assert_array_equal(a.free_counts().sum(axis=2), fresh)


def test_isolation_drains_per_cpu_pages_of_the_block() -> None:
    a = BuddyAllocator(32 * MiB)
    p = a.alloc_pages(0)
    assert p is not None
    a.free_pages(p, 0)
    assert a.state[p] == PG_PCP
    a.set_migratetype_isolate(p)
    assert a.state[p] == PG_BUDDY
    start = p >> pageblock_order << pageblock_order
    heads = np.flatnonzero(a.buddy_order[start:start + 512] >= 0) + start
    assert heads.size and all(a.block_list_id(int(h)) % MIGRATE_TYPES == 4 for h in heads)
    assert int(a.free_counts()[:, :, 4].sum()) == heads.size
    q = [a.alloc_pages(0) for _ in range(50)]
    assert p not in q
    a.check()


# -- free page reporting: isolate without touching, put back, PageReported ---------------------

def _isolate_all(a: BuddyAllocator) -> list[tuple[int, int]]:
    out = []
    for order in range(pageblock_order, MAX_ORDER):
        while (p := a.isolate_free_block(order)) is not None:
            out.append((p, order))
    return out


def _report_all(a: BuddyAllocator) -> int:
    """Reporting passes until one finds nothing new (each stops at the watermark)."""
    passes = 0
    while got := _isolate_all(a):
        for p, o in got:
            a.putback_block(p, o, reported=True)
        passes += 1
        assert passes < 100
    return passes


@pytest.mark.spec("DR-13")
@pytest.mark.parametrize("poisoning", [False, True])
def test_isolation_and_putback_write_nothing(poisoning: bool) -> None:
    n = (256 * MiB) >> 12
    log = DirtyLog(n)
    pv = PageVersions(n, log)
    a = BuddyAllocator(256 * MiB, pages=pv, init_on_alloc=True, page_poisoning=poisoning)
    before, writes0 = pv.version.copy(), pv.writes  # boot poisoning wrote every free page
    log.start()
    free0 = a.nr_free_pages()
    got = _isolate_all(a)
    assert got and {o for _, o in got} == {MAX_ORDER - 1}  # boot memory: 4 MiB blocks
    # Isolated pages left the free lists (NR_FREE_PAGES), yet nothing wrote them.
    assert a.nr_free_pages() == free0 - sum(1 << o for _, o in got)
    # The zone keeps more than its min watermark plus one block.
    for z in a.zones:
        if z.populated:
            assert a.nr_free_pages(z.idx) + (1 << (MAX_ORDER - 1)) > z.watermark[WMARK_MIN]
    assert not a.free_mask()[got[0][0]] and not a.in_use_mask()[got[0][0]]
    for p, o in got:
        a.putback_block(p, o, reported=True)
    assert not log.peek().any() and pv.writes == writes0
    np.testing.assert_array_equal(pv.version, before)  # poison (or zero) content survives
    assert a.nr_free_pages() == free0 and a.nr_reported_pages() == sum(1 << o for _, o in got)
    # The first pass stopped at the watermark; the next one takes only what it left behind.
    rest = _isolate_all(a)
    assert not set(rest) & set(got)
    for p, o in rest:
        a.putback_block(p, o, reported=True)
    assert _isolate_all(a) == []
    assert not log.peek().any() and pv.writes == writes0
    # Without skipping, reported blocks can be taken again.
    q = a.isolate_free_block(MAX_ORDER - 1, skip_reported=False)
    assert q is not None and not a.is_reported(q)
    a.putback_block(q, MAX_ORDER - 1)
    a.check()


def test_allocation_clears_reported_and_the_block_is_found_again() -> None:
    a = BuddyAllocator(128 * MiB)
    assert _report_all(a) >= 1
    q = a.alloc_pages(pageblock_order)  # splits a reported 4 MiB block
    assert q is not None
    head = q & ~((1 << (MAX_ORDER - 1)) - 1)
    assert not a.is_reported(head)
    # The other half went back on the lists as a new, unreported block.
    half = head if q != head else head + (1 << pageblock_order)
    assert a.page_order(half) == pageblock_order and not a.is_reported(half)
    a.free_pages(q, pageblock_order)
    a.check()
    again = _isolate_all(a)
    assert again == [(head, MAX_ORDER - 1)]  # merged back: reported once more, nothing else
    for p, o in again:
        a.putback_block(p, o, reported=True)
    a.check()


def test_putback_that_merges_is_not_marked_reported() -> None:
    a = BuddyAllocator(64 * MiB)
    x = a.alloc_pages(pageblock_order)
    assert x is not None
    buddy = x ^ (1 << pageblock_order)
    assert a.page_order(buddy) == pageblock_order
    assert a.isolate_free_block(pageblock_order) == buddy
    a.free_pages(x, pageblock_order)  # its buddy is isolated: no merge yet
    assert a.page_order(x) == pageblock_order
    a.putback_block(buddy, pageblock_order, reported=True)
    head = min(x, buddy)
    assert a.page_order(head) == MAX_ORDER - 1 and not a.is_reported(head)
    assert a.free_blocks(a.block_list_id(head))[-1] == head  # put back to the tail
    a.check()


def test_reported_marks_survive_unrelated_bulk_frees_and_type_moves() -> None:
    a = BuddyAllocator(64 * MiB)
    pfns = a.alloc_pages_bulk(a.nr_free_pages() - 2048)
    _report_all(a)
    free_blocks = [(p, int(a.page_order(p))) for p in np.flatnonzero(a.reported) << pageblock_order]
    assert free_blocks
    marked = [p for p, _ in free_blocks]
    # Free pages far from any reported block: the re-layout keeps the marks.
    far = pfns[(pfns >> (MAX_ORDER - 1)) != (marked[0] >> (MAX_ORDER - 1))][:100]
    a.free_pages_bulk(far)
    assert all(a.is_reported(p) for p in marked)
    # Moving a reported order-9 block to another migratetype's list keeps the mark.
    nine = [p for p, o in free_blocks if o == pageblock_order]
    if nine:
        a.set_migratetype_isolate(nine[0])
        assert a.is_reported(nine[0])
    a.check()


def test_isolation_misuse_is_refused() -> None:
    a = BuddyAllocator(64 * MiB)
    with pytest.raises(BuddyError, match="order"):
        a.isolate_free_block(3)
    p = a.alloc_pages(MAX_ORDER - 1)
    assert p is not None
    with pytest.raises(BuddyError, match="not isolated"):
        a.putback_block(p, MAX_ORDER - 1)
    q = a.isolate_free_block(MAX_ORDER - 1)
    assert q is not None
    with pytest.raises(BuddyError):
        a.free_pages(q, MAX_ORDER - 1)  # isolated pages are not allocated pages
    a.putback_block(q, MAX_ORDER - 1)
    a.check()


# -- OOM notifiers ------------------------------------------------------------------------------

def test_oom_notifier_runs_after_reclaim_and_the_allocation_retries() -> None:
    a = BuddyAllocator(64 * MiB)
    hoard = list(a.alloc_pages_bulk(1 << 20).tolist())
    while (p := a.alloc_pages(0)) is not None:  # all that can be had
        hoard.append(p)
    calls: list[int] = []

    def notify() -> int:
        calls.append(len(hoard))
        give = np.array(hoard[-256:])
        del hoard[-256:]
        a.free_pages_bulk(give)
        return int(give.size)

    a.register_oom_notifier(notify)
    assert a.alloc_pages(MAX_ORDER - 1) is None and not calls  # costly order: no OOM path
    assert a.alloc_pages(0, noretry=True) is None and not calls  # __GFP_NORETRY: none either
    p = a.alloc_pages(0)
    assert p is not None and len(calls) >= 1
    assert a.counters["oom_runs"] == len(calls)
    assert a.counters["oom_freed_pages"] == 256 * len(calls)
    # Bulk allocations run the notifiers too (unless noretry), for as long as they free pages.
    got = a.alloc_pages_bulk(1000, noretry=True)
    runs = a.counters["oom_runs"]
    assert a.counters["oom_runs"] == runs
    got2 = a.alloc_pages_bulk(600)
    assert got2.size == 600 and a.counters["oom_runs"] > runs
    assert got.size + got2.size <= 256 * len(calls) + 256
    a.check()


def test_oom_notifier_that_frees_nothing_ends_the_retry() -> None:
    a = BuddyAllocator(32 * MiB)
    a.alloc_pages_bulk(1 << 20)
    while a.alloc_pages(0) is not None:
        pass
    calls = []

    def notify() -> int:
        calls.append(1)
        return 0

    a.register_oom_notifier(notify)
    assert a.alloc_pages(0) is None
    assert calls == [1] and a.counters["oom_freed_pages"] == 0


def test_free_notifier_sees_frees_that_leave_large_blocks() -> None:
    a = BuddyAllocator(64 * MiB)
    seen: list[int] = []
    a.register_free_notifier(seen.append)
    p = a.alloc_pages(pageblock_order)
    x, y = a.alloc_pages(1), a.alloc_pages(1)
    assert p is not None and x is not None and y is not None and x >> 9 == y >> 9
    a.free_pages(x, 1)  # y still holds its 2 MiB block: no large block appears
    assert seen == []
    a.free_pages(y, 1)
    assert seen and seen[-1] >= pageblock_order
    seen.clear()
    a.free_pages(p, pageblock_order)
    assert seen == [MAX_ORDER - 1]  # merged with its buddy: a 4 MiB block
    # Isolation and putback are silent (FPI_SKIP_REPORT_NOTIFY).
    r = a.isolate_free_block(MAX_ORDER - 1)
    assert r is not None
    a.putback_block(r, MAX_ORDER - 1, reported=True)
    assert seen == [MAX_ORDER - 1]
    # Bulk frees notify only when they complete a large block.
    pf = a.alloc_pages_bulk(1024)
    seen.clear()
    a.free_pages_bulk(pf[:100])
    assert seen == []
    a.free_pages_bulk(pf[100:])
    assert seen and max(seen) >= pageblock_order
    a.check()
