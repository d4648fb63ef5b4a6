"""guest_model.hinting: hint rounds of both strategies, driven through the real device core."""
from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest

from balloon_dev.effects import HintRoundStopped, PagesHinted
from guest_model.buddy import PG_BALLOON
from guest_model.driver import HINT_BLOCK_PAGES
from guest_model.walk import FreeBlockWalker
from protocol.balloon import BalloonQueue
from tests.guest_model.driver_rig import Rig


@pytest.mark.spec("DR-9")
def test_capture_round_hints_and_holds_until_done() -> None:
    r = Rig().probe()
    free_before = r.alloc.nr_free_pages()
    r.host(r.dev.free_page_start)
    r.run(0.01)
    c = r.drv.counters
    blocks = r.hinted_blocks()
    assert c["rounds"] == 1 and c["start_sent"] == 1 and c["stop_sent"] == 1  # DR-10
    assert len(blocks) == c["hints_sent"] == len(r.drv.s.held_blocks) > 0
    assert all(n == HINT_BLOCK_PAGES << 12 and a % n == 0 for a, n in blocks)
    held = np.zeros(r.alloc.ram_pages, bool)
    for p in r.drv.s.held_blocks:
        held[p:p + HINT_BLOCK_PAGES] = True
    assert (r.alloc.state[held] == PG_BALLOON).all()
    assert sorted(a >> 12 for a, _ in blocks) == sorted(r.drv.s.held_blocks)
    assert len(r.of(HintRoundStopped)) == 1
    # STOP from the host keeps the pages; DONE releases every one (DR-11).
    r.host(r.dev.free_page_stop)
    r.run(0.001)
    assert r.drv.shrink_count() == len(blocks) * HINT_BLOCK_PAGES
    r.host(r.dev.free_page_done)
    r.run(0.001)
    assert r.drv.s.held_blocks == [] and r.drv.counters["hint_blocks_returned_done"] == len(blocks)
    assert not (r.alloc.state == PG_BALLOON).any()
    assert r.alloc.nr_free_pages() == free_before
    r.alloc.check()
    assert r.dev.dr_violations == {}


def test_walk_round_hints_free_blocks_without_holding() -> None:
    r = Rig(strategy="walk", min_order=9).probe()
    free = r.alloc.free_mask().copy()
    r.host(r.dev.free_page_start)
    r.run(0.01)
    blocks = r.hinted_blocks()
    assert blocks and r.drv.counters["stop_sent"] == 1
    for a, n in blocks:
        assert n in (512 << 12, 1024 << 12)
        assert free[a >> 12:(a + n) >> 12].all()  # every hinted page was free
    assert r.drv.s.held_blocks == [] and r.drv.shrink_count() == 0
    assert not (r.alloc.state == PG_BALLOON).any()


def test_device_stop_mid_round_then_new_round() -> None:
    # 256 MiB with 1 block per step: the round takes ~60 steps of 5 us.
    r = Rig(ram=256 << 20, hint_batch=1).probe()
    r.host(r.dev.free_page_start)
    first = r.dev.hint.cmd_id
    r.run(50e-6)
    mid = r.drv.counters["hints_sent"]
    assert 0 < mid < 40
    r.host(r.dev.free_page_stop)
    r.run(0.001)
    c = r.drv.counters
    assert c["rounds_stopped_by_device"] == 1 and c["stop_sent"] == 1
    assert c["hints_sent"] <= mid + 1
    r.host(r.dev.free_page_start)
    r.run(0.01)
    assert r.dev.hint.cmd_id != first
    assert r.drv.s.cmd_id_active == r.dev.hint.cmd_id
    assert r.drv.counters["rounds"] == 2 and r.drv.counters["stop_sent"] == 2
    # Round 2 only finds what round 1 did not hold: held blocks survive STOP.
    ids = [e.cmd_id for e in r.of(PagesHinted)]
    assert set(ids) == {first, r.dev.hint.cmd_id}
    assert r.dev.dr_violations == {}


def test_done_during_round_stops_and_releases() -> None:
    r = Rig(ram=256 << 20, hint_batch=1).probe()
    r.host(r.dev.free_page_start)
    r.run(30e-6)
    r.host(r.dev.free_page_done)
    r.run(0.001)
    assert r.drv.s.held_blocks == [] and r.drv.counters["stop_sent"] == 1
    assert not (r.alloc.state == PG_BALLOON).any()


def test_round_costs_simulated_time_and_workload_interleaves() -> None:
    r = Rig(ram=256 << 20, hint_batch=4).probe()
    seen: list[int] = []
    t0 = r.sched.now
    r.host(r.dev.free_page_start)
    r.sched.after(20e-6, lambda: seen.append(r.drv.counters["hints_sent"]))
    r.run(0.01)
    n = r.drv.counters["hints_sent"]
    # The workload event ran while the round was under way, not before or after it.
    assert 0 < seen[0] < n
    finished = [e for e in r.of(HintRoundStopped)]
    assert finished and n * 5e-6 * 0.5 <= r.sched.now - t0


@pytest.mark.spec("DR-10")
def test_ring_full_keeps_a_slot_for_stop_and_counts_drops() -> None:
    r = Rig(queue_sizes=(128, 128, 128, 8, 32)).probe()
    fq = r.drv.qindex[BalloonQueue.FREE_PAGE]
    r.t.stalled.add(fq)
    r.host(r.dev.free_page_start)
    r.run(0.005)
    c = r.drv.counters
    # 8 descriptors: start + 6 hints, one kept free for STOP (protocol.md 4.4 rule 9).
    assert c["hints_sent"] == 6 and c["hint_blocks_dropped_ring_full"] >= 1
    assert len(r.drv.s.held_blocks) == 6
    r.host(r.dev.free_page_stop)
    r.run(0.002)
    assert c["stop_sent"] == 1 and c["control_buffer_failed"] == 0
    r.t.release(fq)
    r.run(0.001)
    assert len(r.hinted_blocks()) == 0  # the device saw them after its STOP: not hints
    r.alloc.check()


def test_shrinker_returns_blocks_in_round_up() -> None:
    r = Rig().probe()
    r.host(r.dev.free_page_start)
    r.run(0.01)
    n = len(r.drv.s.held_blocks)
    assert n >= 3
    assert r.drv.shrink(1) == HINT_BLOCK_PAGES  # ceil(1 / 1024) = 1 block
    assert r.drv.shrink(HINT_BLOCK_PAGES + 1) == 2 * HINT_BLOCK_PAGES
    assert len(r.drv.s.held_blocks) == n - 3
    assert r.drv.counters["hint_blocks_shrunk"] == 3
    r.alloc.check()


def test_hint_strategy_off_ignores_rounds() -> None:
    r = Rig(strategy="off").probe()
    r.host(r.dev.free_page_start)
    r.run(0.01)
    assert r.drv.counters["rounds"] == 0 and not r.hinted_blocks()


def test_new_id_during_round_sends_stop_then_starts_again() -> None:
    r = Rig(ram=256 << 20, hint_batch=1).probe()
    r.host(r.dev.free_page_start)
    first = r.dev.hint.cmd_id
    r.run(30e-6)
    r.host(r.dev.free_page_stop)  # the host's usual order: STOP, sync, new ID
    r.host(r.dev.free_page_start)
    second = r.dev.hint.cmd_id
    r.run(0.01)
    c = r.drv.counters
    assert c["rounds"] == 2 and c["stop_sent"] == 2 and c["start_sent"] == 2
    assert c["rounds_stopped_by_device"] == 1
    assert {e.cmd_id for e in r.of(PagesHinted)} == {first, second}
    assert r.dev.dr_violations == {}


def test_qemu_style_cmd_id_read_ends_round_on_unrelated_config_change() -> None:
    # protocol.md 5.2 [ANALYSIS]: QEMU reads free_page_hint_cmd_id as 0 while a round is
    # active, so a balloon resize interrupt makes a Linux-like driver see STOP and end early.
    r = Rig(ram=256 << 20, hint_batch=1, qemu_cmd_id_read=True).probe()
    r.host(r.dev.free_page_start)
    r.run(30e-6)
    r.host(r.dev.set_target, 16)
    r.run(0.01)
    c = r.drv.counters
    assert c["rounds_stopped_by_device"] == 1 and c["stop_sent"] == 1
    assert c["hints_sent"] < 30  # far fewer than the ~60 blocks a full round finds
    assert r.dev.actual == 16


class LoggingWalker:
    """A FreeBlockWalker that notes the simulated time of each block it reports."""

    def __init__(self, r: Rig, min_order: int) -> None:
        self.inner = FreeBlockWalker(r.alloc, min_order)
        self.r = r
        self.log: list[tuple[float, int]] = []

    def step(self) -> tuple[int, int] | None:
        blk = self.inner.step()
        if blk is not None:
            self.log.append((self.r.sched.now, blk[0]))
        return blk


@pytest.mark.parametrize("batch", [1, 16])
def test_walk_batch_sets_where_guest_events_can_land(batch: int) -> None:
    r = Rig(ram=256 << 20, strategy="walk", hint_batch=batch)
    walkers: list[LoggingWalker] = []

    def factory(mo: int) -> LoggingWalker:
        walkers.append(LoggingWalker(r, mo))
        return walkers[-1]

    r.drv.walker_factory = factory
    r.probe()
    r.host(r.dev.free_page_start)
    t0 = r.sched.now
    taken: list[tuple[float, int]] = []

    def guest() -> None:  # another CPU allocates 4 MiB while the walk is under way
        q = r.alloc.alloc_pages(10)
        assert q is not None
        taken.append((r.sched.now, q))

    r.sched.at(t0 + 12e-6, guest)
    r.run(0.01)
    log = walkers[0].log
    assert len(log) > 20 and r.drv.counters["stop_sent"] == 1
    times = [t for t, _ in log]
    when, q = taken[0]
    if batch == 1:
        # One block per event: every report has its own instant, and the guest's event fell
        # between two of them.
        assert len(set(times)) == len(times)
        assert any(a < when < b for a, b in itertools.pairwise(times))
    else:
        # Sixteen blocks share an instant: nothing can happen between them.
        assert len(set(times[:16])) == 1 and times[16] > times[0]
    # The safe walk never reports the block once it is taken.
    assert q not in [p for t, p in log if t > when]


def test_ring_broken_by_the_reap_inside_a_hint_round_ends_the_round() -> None:
    # A 1 GiB guest has enough order-10 blocks for a round of several steps. The device
    # answers none of them, then makes up a used element: the driver's own reap at the next
    # step breaks the ring, and the round must end there (no VringBroken out of the event).
    r = Rig(ram=1 << 30).probe()
    fq = r.drv.qindex[BalloonQueue.FREE_PAGE]
    r.t.stalled.add(fq)
    r.host(r.dev.free_page_start)
    r.run(0.0001)
    vq = r.drv.vqs[BalloonQueue.FREE_PAGE]
    assert r.drv.hinting and vq.in_flight > 1
    held = len(r.drv.s.held_blocks)
    r.mem.write(vq.used_gpa + 4, struct.pack("<II", vq.size - 1, 0))
    r.mem.write_u16(vq.used_gpa + 2, 1)
    r.run(0.002)
    assert vq.broken and r.drv.counters["vring_broken"] == 1 and not r.drv.hinting
    # Nothing was captured after the break: every PG_BALLOON block is one the driver holds.
    assert len(r.drv.s.held_blocks) == held
    assert int((r.alloc.state == PG_BALLOON).sum()) == held * HINT_BLOCK_PAGES
    r.host(r.dev.set_target, 10)  # the rest of the driver keeps working
    r.run(0.01)
    assert r.dev.actual == 10
