"""guest_model.buddy.reporting: isolating free blocks for page reporting, putting them back,
reported marks and the free notifier.
"""
from __future__ import annotations

import numpy as np
import pytest

from guest_model.buddy import MAX_ORDER, WMARK_MIN, BuddyAllocator, BuddyError, pageblock_order
from guestmem import DirtyLog
from guestmem.pages import PageVersions
from tests.guest_model.buddy.checks import MiB


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
