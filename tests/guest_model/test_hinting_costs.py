"""The guest's side of a hint round in simulated time (docs/cost-model.md): per captured block
its allocation, the init_on_alloc zeroing of 4 MiB at the memory bandwidth and posting it; per
walked block the visit and posting; all over the driver's share of a vCPU."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import HintRoundStopped
from guest_model.buddy import BuddyAllocator
from guest_model.buddy.defs import PG_BUDDY
from protocol.errors import UsageError
from tests.guest_model.driver_rig import Rig

BLOCK = 4 << 20


def test_step_cost_splits_capture_walk_zeroing_and_share():
    r = Rig(hint_cost_per_block=None, hint_alloc_cost=2e-6, hint_post_cost=3e-6,
            hint_walk_cost=1e-6, memory_bandwidth=4e9, cpu_share=0.5).probe()
    hinting = r.drv.hint
    assert isinstance(r.alloc, BuddyAllocator) and r.alloc.init_on_alloc
    # capture, 4 allocated, 3 posted, zeroing on: (4*2 + 3*3) us + 4 * 4 MiB / 4 GB/s, doubled
    expect = (4 * 2e-6 + 3 * 3e-6 + 4 * BLOCK / 4e9) / 0.5
    assert hinting.step_cost(4, 3) == pytest.approx(expect)
    # a step that found nothing still costs one look
    assert hinting.step_cost(0, 0) == pytest.approx((2e-6 + BLOCK / 4e9) / 0.5)
    r.alloc.init_on_alloc = False
    assert hinting.step_cost(4, 3) == pytest.approx((4 * 2e-6 + 3 * 3e-6) / 0.5)
    r.drv.opts.hint_cost_per_block = 5e-6   # the flat cost replaces all of it
    assert hinting.step_cost(4, 3) == pytest.approx(4 * 5e-6 / 0.5)


def test_walk_pays_visits_and_posts_not_zeroing():
    r = Rig(strategy="walk", hint_cost_per_block=None, hint_walk_cost=1e-6,
            hint_post_cost=3e-6, memory_bandwidth=1e6).probe()
    assert r.drv.hint.step_cost(5, 2) == pytest.approx(5e-6 + 6e-6)


def test_init_on_alloc_zeroing_makes_a_real_round_longer():
    """Same guest, same blocks: with init_on_alloc every captured block also costs its zeroing,
    so the round ends later by about blocks x 4 MiB / bandwidth."""
    def round_end(zero: bool) -> tuple[float, int]:
        r = Rig(ram=256 << 20, hint_batch=4, hint_cost_per_block=None,
                memory_bandwidth=10e9).probe()
        r.alloc.init_on_alloc = zero
        t0 = r.sched.now
        r.host(r.dev.free_page_start)
        ends = []
        r.t.add_host_listener(lambda e: ends.append(r.sched.now)
                              if isinstance(e, HintRoundStopped) else None)
        r.run(1.0)
        assert ends, "the round did not end"
        return ends[0] - t0, r.drv.counters["hints_sent"]

    t_plain, n_plain = round_end(False)
    t_zero, n_zero = round_end(True)
    assert n_plain == n_zero > 20
    extra = t_zero - t_plain
    assert extra == pytest.approx(n_zero * BLOCK / 10e9, rel=0.15)


@pytest.mark.parametrize("bad", [{"cpu_share": 0.0}, {"cpu_share": 1.5},
                                 {"memory_bandwidth": 0.0}])
def test_bad_cost_options_are_usage_errors(bad):
    with pytest.raises(UsageError, match="cpu_share|memory_bandwidth"):
        Rig(**bad)


def test_first_writes_cost_more_than_clearing_blocks_that_held_data():
    """init_on_alloc counts the captured pages that were never written (the host backs them on
    that first write): a round over untouched memory costs ``hint_first_write_cost`` per such
    page on top of the clearing; blocks that held data cost the clearing alone."""
    def round_end(first_write_cost: float, dirty_first: bool) -> tuple[float, int, int]:
        r = Rig(ram=256 << 20, hint_batch=4, hint_cost_per_block=None,
                memory_bandwidth=10e9, hint_first_write_cost=first_write_cost).probe()
        assert r.alloc.init_on_alloc
        if dirty_first:
            free = np.flatnonzero(r.alloc.state == PG_BUDDY)
            r.pages.write_pfns(free)  # every free page held data once
        c0 = r.alloc.counters.get("zeroed_first_write_pages", 0)
        t0 = r.sched.now
        r.host(r.dev.free_page_start)
        ends = []
        r.t.add_host_listener(lambda e: ends.append(r.sched.now)
                              if isinstance(e, HintRoundStopped) else None)
        r.run(5.0)
        assert ends, "the round did not end"
        first = r.alloc.counters.get("zeroed_first_write_pages", 0) - c0
        return ends[0] - t0, r.drv.counters["hints_sent"], first

    t_free, n, first = round_end(20e-6, dirty_first=False)
    assert n > 20 and first == n * (BLOCK >> 12)  # every captured page was still untouched
    t_none, _, first_none = round_end(20e-6, dirty_first=True)
    assert first_none == 0
    t_nocost, _, _ = round_end(0.0, dirty_first=False)
    assert t_none == pytest.approx(t_nocost, rel=0.05)
    assert t_free - t_nocost == pytest.approx(first * 20e-6, rel=0.1)
