"""guest_model.buddy.pagealloc: single allocations and frees, per-cpu lists, fallback,
watermarks, memory initialisation, reclaim, OOM notifiers and pageblock isolation.
"""
from __future__ import annotations

import numpy as np
import pytest

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_TYPES,
    MIGRATE_UNMOVABLE,
    OWNER_BALLOON,
    PG_ALLOC,
    PG_BALLOON,
    PG_BUDDY,
    PG_PCP,
    PG_RESERVED,
    ZONE_DMA32,
    BuddyAllocator,
    BuddyError,
    pageblock_order,
)
from guestmem import DirtyLog
from guestmem.pages import POISON, ZERO, PageVersions
from tests.guest_model.buddy.checks import MiB, assert_maximal, recount


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
