"""guest_model.buddy.bulk_alloc and bulk_free: bulk calls leave the layout single calls leave."""
from __future__ import annotations

import numpy as np

from guest_model.buddy import PG_ALLOC, BuddyAllocator
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
