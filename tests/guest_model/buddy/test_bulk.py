"""guest_model.buddy.bulk_alloc and bulk_free: bulk calls leave the layout single calls leave."""
from __future__ import annotations

import numpy as np
import pytest

from guest_model.buddy import (
    MAX_ORDER,
    MIGRATE_MOVABLE,
    MIGRATE_UNMOVABLE,
    PG_ALLOC,
    ZONE_DMA32,
    BuddyAllocator,
    list_id,
)
from tests.guest_model.buddy.checks import MiB, assert_maximal


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


def test_bulk_free_lists_max_order_blocks_as_ascending_single_frees_do() -> None:
    """Linux puts a block whose merging ends at the top order at its list's head (no
    buddy_merge_likely there; only boot memory goes to the tail), so pages freed in address order
    (a tmpfs file deleted in index order, its pages allocated in ascending order) leave the last
    block completed, the highest, first: the balloon's capture then takes the freed memory from
    the top down, as the lab's recorded capture order shows (docs/cost-model.md). The bulk free
    must leave that list order, not its reverse."""
    a = BuddyAllocator(64 * MiB, seed=1)
    b = BuddyAllocator(64 * MiB, seed=1)
    pa = a.alloc_pages_bulk(8192)  # 32 MiB from the boot blocks of DMA32, ascending
    pb = b.alloc_pages_bulk(8192)
    np.testing.assert_array_equal(pa, pb)
    a.free_pages_bulk(pa)
    for p in np.sort(pb).tolist():
        b.free_pages(p, 0)
    b.drain_pcp()
    lid = list_id(ZONE_DMA32, MAX_ORDER - 1, MIGRATE_MOVABLE)
    freed = sorted({int(p) >> (MAX_ORDER - 1) << (MAX_ORDER - 1) for p in pa.tolist()})
    assert b.free_blocks(lid)[:len(freed)] == freed[::-1]  # the reference: top down
    assert a.free_blocks(lid) == b.free_blocks(lid)
    # What the balloon's capture (unmovable max-order allocations) gets first.
    got = [a.alloc_pages(MAX_ORDER - 1, MIGRATE_UNMOVABLE, noretry=True) for _ in range(3)]
    assert got == freed[::-1][:3]


@pytest.mark.parametrize("how", ["descending", "shuffled", "interleaved"])
def test_bulk_free_keeps_the_order_of_the_frees(how: str) -> None:
    """The max-order blocks come out in the order the same frees one by one leave, whatever the
    order of the pfns given (a churn frees by expiry, not by address)."""
    a = BuddyAllocator(64 * MiB, seed=1)
    b = BuddyAllocator(64 * MiB, seed=1)
    pa = a.alloc_pages_bulk(8192)
    b.alloc_pages_bulk(8192)
    if how == "descending":
        order = pa[::-1]
    elif how == "shuffled":
        order = np.random.default_rng(3).permutation(pa)
    else:  # every other block first, then the rest: completion order differs from address
        blk = pa >> (MAX_ORDER - 1)
        order = np.concatenate([pa[blk % 2 == 1], pa[blk % 2 == 0]])
    a.free_pages_bulk(order)
    for p in order.tolist():
        b.free_pages(p, 0)
    b.drain_pcp()
    a.check()
    lid = list_id(ZONE_DMA32, MAX_ORDER - 1, MIGRATE_MOVABLE)
    assert a.free_blocks(lid) == b.free_blocks(lid)


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
