"""guest_model.page_reporting: reporting passes through the real device core."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import PagesReported
from guest_model.buddy import PG_ISOLATED
from guest_model.driver import PAGE_POISON_VAL
from guestmem import DirtyLog
from guestmem.pages import POISON
from protocol.balloon import VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING
from protocol.virtio import feature_mask
from tests.guest_model.driver_rig import REPORTING, Rig


def reported_ranges(r: Rig) -> list[tuple[int, int]]:
    return [rg for e in r.of(PagesReported) for rg in e.ranges]


@pytest.mark.spec("DR-13")
def test_reporting_posts_chains_of_free_blocks_and_puts_them_back() -> None:
    r = Rig(offered=REPORTING, ram=256 << 20).probe()
    r.run(2.5)
    reps = r.of(PagesReported)
    assert reps and all(len(e.ranges) <= 32 for e in reps)
    # Blocks as they sit on the free lists: 2 MiB or 4 MiB, aligned to their size.
    assert all(n in (2 << 20, 4 << 20) and a % n == 0 for e in reps for a, n in e.ranges)
    assert not (r.alloc.state == PG_ISOLATED).any()  # all put back after the device used them
    r.run(6.0)
    # Nothing changed in the guest: no block is reported twice, every block is reported.
    ranges = reported_ranges(r)
    assert len(ranges) == len(set(ranges))
    assert sum(n for _, n in ranges) >> 12 == r.drv.counters["reported_pages"]
    assert r.alloc.nr_reported_pages() == r.drv.counters["reported_pages"]
    r.alloc.check()


@pytest.mark.spec("DR-13")
@pytest.mark.parametrize("poisoning", [False, True])
def test_reporting_writes_no_page(poisoning: bool) -> None:
    # init_on_alloc is on (the allocator's default): an allocation would zero the blocks.
    r = Rig(offered=REPORTING | feature_mask(VIRTIO_BALLOON_F_PAGE_POISON), ram=256 << 20,
            page_poisoning=poisoning)
    log = DirtyLog(r.pages.ram_pages)
    r.pages.dirty_log = log
    r.probe()
    assert r.drv.has(VIRTIO_BALLOON_F_REPORTING)
    assert r.drv.poison_val == (PAGE_POISON_VAL if poisoning else None)
    before, writes = r.pages.version.copy(), r.pages.writes
    log.start()
    r.run(2.5)
    assert r.drv.counters["reports"] >= 1
    assert not log.peek().any() and r.pages.writes == writes
    np.testing.assert_array_equal(r.pages.version, before)
    if poisoning:
        # Reported pages keep the poison pattern the host may rely on (protocol.md 3.6, 3.7).
        for a, n in reported_ranges(r):
            assert (r.pages.version[a >> 12:(a + n) >> 12] == POISON).all()


def test_block_allocated_and_freed_between_passes_is_reported_again() -> None:
    r = Rig(offered=REPORTING, ram=256 << 20).probe()
    r.run(10.0)  # every pass done: everything free is reported
    n0 = len(reported_ranges(r))
    r.run(4.0)
    assert len(reported_ranges(r)) == n0
    p = r.alloc.alloc_pages(9)  # Linux clears PageReported when the block is allocated
    assert p is not None
    r.pages.write_range(p, 512, "data")
    r.alloc.free_pages(p, 9)
    r.run(2.5)
    new = reported_ranges(r)[n0:]
    assert len(new) == 1
    a, n = new[0]
    assert a >> 12 <= p and p + 512 <= (a + n) >> 12
    r.alloc.check()


def test_reporting_passes_are_requested_by_frees_and_go_idle() -> None:
    r = Rig(offered=REPORTING, ram=256 << 20).probe()
    r.run(1.9)
    assert r.of(PagesReported) == []  # the initial pass waits PAGE_REPORTING_DELAY (2 s)
    r.run(0.2)
    n0 = len(reported_ranges(r))
    assert n0 > 0
    r.run(10.0)
    assert len(reported_ranges(r)) == n0 and r.sched.pending() == 0  # idle: nothing scheduled
    p = r.alloc.alloc_pages(9)
    assert p is not None
    t0 = r.sched.now
    r.alloc.free_pages(p, 9)  # a large block freed: a pass is requested for 2 s later
    r.run(1.9)
    assert len(reported_ranges(r)) == n0
    r.run(0.2)
    assert len(reported_ranges(r)) == n0 + 1 and r.sched.now - t0 < 2.2


def test_reporting_pass_budget_spreads_a_large_free_list_over_passes() -> None:
    # 4 GiB: about a thousand free 4 MiB blocks in DMA32. Each list's budget is
    # ceil(1019 / 512) = 2 full chains, and the third chain taken ends the list's turn.
    r = Rig(offered=REPORTING, ram=4 << 30).probe()
    order10 = int(r.alloc.free_counts()[1, 10].sum())
    r.run(2.1)
    first = reported_ranges(r)
    budget = -(-order10 // 512)
    assert len(r.of(PagesReported)) == budget + 1
    assert len(first) == 32 * (budget + 1) and all(n == 4 << 20 for _, n in first)
    # Blocks were left: the pass asked for another, 2 s later, and so on until all are done.
    r.run(2.0)
    assert len(reported_ranges(r)) > len(first)
    r.run(60.0)
    assert r.alloc.nr_unreported_blocks(1, 10, 1) == 0 and r.sched.pending() == 0
    assert len(set(reported_ranges(r))) == len(reported_ranges(r))
    r.alloc.check()


def test_reporting_leaves_a_small_zone_alone() -> None:
    # page_reporting_process_zone: a zone must keep its low watermark plus a full chain
    # (32 x 2 MiB) free, which a 64 MiB guest never has.
    r = Rig(offered=REPORTING).probe()
    r.run(5.0)
    assert r.drv.has(VIRTIO_BALLOON_F_REPORTING) and r.of(PagesReported) == []
