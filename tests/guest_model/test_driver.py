"""The guest balloon driver (guest_model/driver.py) against the real device core, through the
in-process transport, over a real buddy allocator. Edge cases the device never produces on its
own (a stalled queue, a config generation that never settles, a ring the device corrupts) are
made by wrapping the transport or poking ring memory.
"""
from __future__ import annotations

import itertools
import mmap
import struct
from typing import Any

import numpy as np
import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import (
    Deflated,
    HintRoundStopped,
    Inflated,
    PagesHinted,
    PagesReported,
    StatsReceived,
)
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import PG_ALLOC, PG_BALLOON, PG_ISOLATED, BuddyAllocator
from guest_model.driver import (
    HINT_BLOCK_PAGES,
    PAGE_POISON_VAL,
    BalloonDriver,
    DriverOptions,
    ProbeError,
)
from guest_model.vring import DriverArea
from guest_model.walk import FreeBlockWalker
from guestmem import DirtyLog, GuestMemory, PageVersions
from guestmem.clock import Scheduler
from guestmem.pages import POISON
from protocol.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.errors import UsageError
from protocol.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceStatus, feature_mask

RAM = 64 << 20
AREA_GPA = 0x100000
AREA_SIZE = 4 << 20


class StallableTransport(InProcessTransport):
    """The in-process transport, with kicks of chosen queues held back (a device that is slow
    to look at a queue) until ``release(q)``."""

    def __init__(self, dev: BalloonDevice) -> None:
        super().__init__(dev)
        self.stalled: set[int] = set()
        self.held_kicks: list[int] = []
        self.gen_bump = False

    def notify(self, q: int) -> None:
        if q in self.stalled:
            self.held_kicks.append(q)
            return
        super().notify(q)

    def release(self, q: int) -> None:
        self.stalled.discard(q)
        super().notify(q)

    def config_generation(self) -> int:
        g = super().config_generation()
        if self.gen_bump:
            self._bump = getattr(self, "_bump", 0) + 1
            return g + self._bump
        return g


class Rig:
    def __init__(self, *, offered: int = DEFAULT_OFFERED_FEATURES, strategy: str = "capture",
                 ram: int = RAM, queue_sizes: tuple[int, ...] | None = None,
                 qemu_cmd_id_read: bool = False, **opts: Any) -> None:
        self.mem = GuestMemory()
        # Big guests: a sparse mapping (only the driver area is ever touched).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.mem.add_region(0, bytearray(ram) if ram <= RAM else mmap.mmap(-1, ram, flags=flags),
                            "ram")
        self.pages = PageVersions(ram >> 12)
        poisoning = opts.get("page_poisoning", False)
        self.alloc = BuddyAllocator(ram, pages=self.pages, reserved=[(AREA_GPA, AREA_SIZE)],
                                    page_poisoning=poisoning,
                                    init_on_free=opts.get("init_on_free", False))
        kw: dict[str, Any] = {"offered_features": offered, "ram_pages": ram >> 12,
                              "qemu_cmd_id_read": qemu_cmd_id_read}
        if queue_sizes is not None:
            kw["queue_sizes"] = queue_sizes
        self.dev = BalloonDevice(self.mem, DeviceConfig(**kw))
        self.t = StallableTransport(self.dev)
        self.effects: list[Any] = []
        self.t.add_host_listener(self.effects.append)
        self.sched = Scheduler()
        self.area = DriverArea(self.mem, AREA_GPA, AREA_SIZE)
        self.drv = BalloonDriver(self.t, self.mem, self.alloc, self.sched, self.area,
                                 DriverOptions(hint_strategy=strategy, **opts))

    def probe(self) -> Rig:
        self.drv.probe()
        self.run(0.001)
        return self

    def host(self, fn: Any, *args: Any) -> None:
        self.t.host_call(fn, *args)

    def run(self, dt: float) -> None:
        self.sched.run_until(self.sched.now + dt)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def hinted_blocks(self) -> list[tuple[int, int]]:
        return [r for e in self.of(PagesHinted) for r in e.ranges]


# -- probe and negotiation ---------------------------------------------------------------------

def test_probe_reaches_driver_ok_with_expected_features() -> None:
    r = Rig().probe()
    st = r.dev.status
    assert st & DeviceStatus.DRIVER_OK and st & DeviceStatus.FEATURES_OK
    assert not st & DeviceStatus.FAILED
    f = r.dev.driver_features
    assert f >> VIRTIO_F_VERSION_1 & 1 and f >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1
    # DR-2: no poisoning and no init_on_free -> PAGE_POISON declined.
    assert not f >> VIRTIO_BALLOON_F_PAGE_POISON & 1
    assert r.dev.dr_violations == {}
    assert r.drv.qindex == r.dev.queue_layout()


def test_access_platform_is_never_accepted() -> None:
    r = Rig(offered=DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_F_ACCESS_PLATFORM)).probe()
    assert not r.dev.driver_features >> VIRTIO_F_ACCESS_PLATFORM & 1


@pytest.mark.spec("DR-12")
@pytest.mark.parametrize(("poisoning", "init_on_free", "expect"), [
    (True, False, PAGE_POISON_VAL), (False, True, 0), (True, True, PAGE_POISON_VAL)])
def test_poison_val_written_before_driver_ok(poisoning: bool, init_on_free: bool,
                                             expect: int) -> None:
    r = Rig(page_poisoning=poisoning, init_on_free=init_on_free).probe()
    assert r.dev.driver_features >> VIRTIO_BALLOON_F_PAGE_POISON & 1
    assert r.dev.poison_val == expect
    assert r.dev.dr_violations == {}  # the device checks DR-12 at DRIVER_OK


@pytest.mark.spec("DR-2")
def test_reporting_dropped_when_poisoning_without_page_poison() -> None:
    offered = (DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_PAGE_POISON)) \
        | feature_mask(VIRTIO_BALLOON_F_REPORTING)
    r = Rig(offered=offered, page_poisoning=True).probe()
    assert not r.dev.driver_features >> VIRTIO_BALLOON_F_REPORTING & 1
    r2 = Rig(offered=offered).probe()
    assert r2.dev.driver_features >> VIRTIO_BALLOON_F_REPORTING & 1


@pytest.mark.spec("D-17")
def test_compacted_queue_numbering_without_stats() -> None:
    offered = DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_STATS_VQ)
    r = Rig(offered=offered).probe()
    assert r.drv.qindex[BalloonQueue.FREE_PAGE] == 2
    assert BalloonQueue.STATS not in r.drv.qindex
    r.host(r.dev.free_page_start)
    r.run(0.01)
    assert r.hinted_blocks()  # hints reached the device on transport queue 2


def test_probe_fails_without_version_1() -> None:
    r = Rig()
    r.t.get_device_features = lambda: DEFAULT_OFFERED_FEATURES & ~(1 << VIRTIO_F_VERSION_1)  # type: ignore[method-assign]
    with pytest.raises(ProbeError):
        r.drv.probe()
    assert r.dev.status & DeviceStatus.FAILED


def test_probe_fails_when_reporting_queue_too_small() -> None:
    r = Rig(offered=DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING),
            queue_sizes=(128, 128, 128, 1024, 16))
    with pytest.raises(ProbeError, match="reporting_vq"):
        r.drv.probe()
    assert r.dev.status & DeviceStatus.FAILED


# -- hinting -----------------------------------------------------------------------------------

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


# -- inflate / deflate ---------------------------------------------------------------------------

@pytest.mark.spec("DR-7")
def test_inflate_then_deflate_updates_actual() -> None:
    r = Rig().probe()
    free0 = r.alloc.nr_free_pages()
    r.host(r.dev.set_target, 1000)
    r.run(0.1)
    assert r.drv.s.num_pages == 1000 == r.dev.actual
    infl = r.of(Inflated)
    assert all(len(e.pfns) <= 256 for e in infl) and sum(len(e.pfns) for e in infl) == 1000
    pfns = np.array([p for e in infl for p in e.pfns])
    assert (r.alloc.state[pfns] == PG_BALLOON).all() and np.unique(pfns).size == 1000
    r.host(r.dev.set_target, 100)
    r.run(0.1)
    assert r.drv.s.num_pages == 100 == r.dev.actual
    defl = np.array([p for e in r.of(Deflated) for p in e.pfns])
    assert defl.size == 900 and np.isin(defl, pfns).all()
    assert r.alloc.state[defl].tolist().count(PG_BALLOON) == 0
    r.host(r.dev.set_target, 0)
    r.run(0.1)
    r.alloc.drain_pcp()
    assert r.alloc.nr_free_pages() == free0
    assert r.dev.dr_violations == {}


@pytest.mark.spec("DR-5")
def test_deflated_pages_wait_for_ack_with_must_tell_host() -> None:
    r = Rig(offered=DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST))
    r.probe()
    assert r.dev.driver_features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    r.host(r.dev.set_target, 10)
    r.run(0.01)
    pfns = list(r.drv.s.balloon_pfns)
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)
    r.host(r.dev.set_target, 0)
    r.run(0.01)
    # Posted, not acknowledged: the pages are still the balloon's, actual unchanged.
    assert (r.alloc.state[pfns] == PG_BALLOON).all() and r.dev.actual == 10
    r.t.release(dq)
    r.run(0.01)
    assert not (r.alloc.state[pfns] == PG_BALLOON).any() and r.dev.actual == 0


def test_one_balloon_buffer_in_flight() -> None:
    r = Rig().probe()
    iq = r.drv.qindex[BalloonQueue.INFLATE]
    r.t.stalled.add(iq)
    r.host(r.dev.set_target, 2000)
    r.run(0.5)
    assert r.drv.vqs[BalloonQueue.INFLATE].in_flight == 1
    assert r.drv.counters["balloon_buffers"] == 1
    r.t.release(iq)
    r.run(0.5)
    assert r.dev.actual == 2000 and r.drv.counters["balloon_buffers"] == 8


def test_inflate_out_of_memory_retries_later() -> None:
    r = Rig(ram=16 << 20).probe()
    r.host(r.dev.set_target, (16 << 20) >> 12)  # more than the guest can give
    r.run(1.0)
    assert r.drv.counters["inflate_alloc_failed"] >= 1
    assert 0 < r.dev.actual < (16 << 20) >> 12
    r.alloc.check()


# -- stats ----------------------------------------------------------------------------------------

@pytest.mark.spec("DR-8")
def test_stats_buffer_refilled_on_request() -> None:
    r = Rig().probe()
    r.host(r.dev.request_stats)
    r.run(0.001)
    r.host(r.dev.set_target, 256)
    r.run(0.01)
    r.host(r.dev.request_stats)
    r.run(0.001)
    stats = [e.stats for e in r.of(StatsReceived)]
    assert len(stats) >= 2
    assert stats[-1]["MEMTOT"] == RAM
    assert stats[-1]["MEMFREE"] == r.alloc.nr_free_pages() << 12
    assert set(stats[0]) == set(stats[-1])
    assert r.drv.vqs[BalloonQueue.STATS].in_flight == 1
    assert r.dev.dr_violations == {}


# -- free page reporting ---------------------------------------------------------------------------

REPORTING = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING)


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


# -- device faults ---------------------------------------------------------------------------------

def test_corrupted_used_ring_is_survived() -> None:
    r = Rig(queue_sizes=(128, 128, 128, 8, 32)).probe()
    fq = r.drv.qindex[BalloonQueue.FREE_PAGE]
    r.t.stalled.add(fq)
    r.host(r.dev.free_page_start)
    r.run(0.002)
    vq = r.drv.vqs[BalloonQueue.FREE_PAGE]
    # The "device" writes a used element naming a head that was never posted.
    r.mem.write(vq.used_gpa + 4, struct.pack("<II", 7, 0))
    r.mem.write_u16(vq.used_gpa + 2, 1)
    r.run(0.002)
    assert vq.broken and r.drv.counters["vring_broken"] == 1
    # The rest of the driver keeps working.
    r.host(r.dev.set_target, 10)
    r.run(0.01)
    assert r.dev.actual == 10


def test_unstable_config_generation_is_counted() -> None:
    r = Rig().probe()
    r.t.gen_bump = True
    r.host(r.dev.set_target, 10)
    r.run(0.01)
    assert r.drv.counters["config_read_unstable"] >= 1
    assert r.dev.actual == 0
    r.t.gen_bump = False
    r.host(r.dev.set_target, 20)
    r.run(0.01)
    assert r.dev.actual == 20


def test_inflated_pages_are_not_guest_in_use() -> None:
    r = Rig().probe()
    r.host(r.dev.set_target, 300)
    r.run(0.01)
    pfns = np.array(r.drv.s.balloon_pfns)
    assert not r.alloc.in_use_mask()[pfns].any()
    assert (r.alloc.state[pfns] != PG_ALLOC).all()


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


def test_walk_safety_option_reaches_the_walker_and_bad_strategy_is_refused() -> None:
    walk = Rig(strategy="walk").drv.walker_factory
    assert walk is not None and isinstance(w := walk(10), FreeBlockWalker) and w.safe is True
    seed = Rig(strategy="walk", walk_safe=False)
    walk = seed.drv.walker_factory
    assert walk is not None and isinstance(w := walk(10), FreeBlockWalker) and w.safe is False
    seed.probe()
    seed.host(seed.dev.free_page_start)
    seed.run(0.01)
    assert seed.drv.counters["hints_sent"] > 0 and seed.drv.counters["stop_sent"] == 1
    with pytest.raises(UsageError, match="hint_strategy"):
        Rig(strategy="greedy")


def test_golden_control_and_stats_buffers() -> None:
    r = Rig().probe()
    raw = r.mem.read(r.drv._stats_buf, 100)
    entries = [struct.unpack_from("<HQ", raw, 10 * i) for i in range(10)]  # packed 10-byte entries
    assert [t for t, _ in entries] == list(range(10))
    assert entries[5] == (5, RAM)  # MEMTOT in bytes
    assert entries[4][1] == r.alloc.nr_free_pages() << 12  # MEMFREE
    r.host(r.dev.free_page_start)
    r.run(0.01)
    assert r.mem.read(r.drv.hint.start_buf, 4) == struct.pack("<I", r.dev.hint.cmd_id)
    assert r.mem.read(r.drv.hint.stop_buf, 4) == b"\0\0\0\0"


# -- deflate on OOM ----------------------------------------------------------------------------

OOM = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)


def exhaust(r: Rig) -> list[int]:
    """Take every page a guest can get without reclaim or OOM (noretry)."""
    held = r.alloc.alloc_pages_bulk(1 << 30, noretry=True).tolist()
    while (p := r.alloc.alloc_pages(0, noretry=True)) is not None:
        held.append(p)
    return held


def balloon_of(r: Rig, pages: int) -> set[int]:
    r.host(r.dev.set_target, pages)
    r.run(0.05)
    assert r.drv.s.num_pages == pages == r.dev.actual
    return set(r.drv.s.balloon_pfns)


def told(r: Rig, since: int = 0) -> list[int]:
    return [q for e in r.effects[since:] if isinstance(e, Deflated) for q in e.pfns]


def test_oom_deflates_256_pages_telling_the_host_first() -> None:
    r = Rig(offered=OOM).probe()
    balloon = balloon_of(r, 2048)
    exhaust(r)
    mark = len(r.effects)
    p = r.alloc.alloc_pages(0)  # fails after reclaim: the OOM notifier deflates
    assert p is not None and r.alloc.counters["oom_runs"] == 1
    c = r.drv.counters
    assert c["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 2048 - 256
    # Linux's order even without MUST_TELL_HOST: the device heard of them (it answers inside
    # the kick) before they were freed; actual follows at once.
    gone = told(r, mark)
    assert len(gone) == 256 and set(gone) <= balloon and r.dev.actual == 2048 - 256
    assert set(gone).isdisjoint(r.drv.s.balloon_pfns)
    r.run(0.05)
    # Linux does not re-inflate on its own after an OOM deflate.
    assert r.drv.s.num_pages == 2048 - 256 and r.dev.actual == 2048 - 256
    assert c["deflate_told_late_pages"] == 0 and r.dev.dr_violations == {}
    # A new target is followed again.
    r.host(r.dev.set_target, 1000)
    r.run(0.05)
    assert r.drv.s.num_pages == 1000 == r.dev.actual
    r.alloc.check()


def test_oom_without_must_tell_host_does_not_wait_for_a_slow_device() -> None:
    r = Rig(offered=OOM).probe()
    balloon_of(r, 2048)
    exhaust(r)
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)  # the device has not looked at the deflate buffer yet
    assert r.alloc.alloc_pages(0) is not None
    c = r.drv.counters
    assert c["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 2048 - 256 and not told(r)
    # The buffer in flight names pages that are the guest's already: not held.
    assert sum(n for _, n in r.drv.held_pfn_ranges()) == 2048 - 256
    # Another OOM while that buffer is in flight: freed too, told once the queue is free.
    exhaust(r)
    assert r.alloc.alloc_pages(0) is not None
    assert c["oom_deflated_pages"] == 512 and r.drv.s.num_pages == 2048 - 512
    assert r.dev.actual == 2048 - 512 and c["oom_deflate_blocked"] == 0
    r.t.release(dq)
    r.run(0.05)
    assert len(told(r)) == 512 and c["deflate_told_late_pages"] == 512
    assert r.drv.s.num_pages == 2048 - 512 == r.dev.actual  # and no re-inflation
    assert r.dev.dr_violations == {}
    r.alloc.check()


@pytest.mark.spec("DR-5")
def test_oom_with_must_tell_host_frees_only_acknowledged_pages() -> None:
    r = Rig(offered=OOM | feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)).probe()
    r.host(r.dev.set_target, 1024)
    r.run(0.05)
    exhaust(r)
    # The in-process device uses the deflate buffer inside the kick: like Linux waiting for
    # the ack, the pages are freed within the OOM call, after the host was told.
    n_effects = len(r.effects)
    p = r.alloc.alloc_pages(0)
    assert p is not None and r.drv.counters["oom_deflated_pages"] == 256
    told = [q for e in r.effects[n_effects:] if isinstance(e, Deflated) for q in e.pfns]
    assert len(told) == 256
    # A device that does not answer at once: nothing is freed until it does.
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)
    exhaust(r)
    assert r.alloc.alloc_pages(0) is None
    assert r.drv.counters["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 768
    # Further OOM calls wait for that buffer (one in flight) instead of posting another.
    assert r.alloc.alloc_pages(0) is None and r.drv.counters["oom_deflate_blocked"] >= 1
    r.t.release(dq)
    r.run(0.01)
    # The late ack frees them (counted as deflated, not as freed by the OOM call).
    assert r.drv.s.num_pages == 512 and r.drv.counters["deflated_pages"] == 512
    assert r.drv.counters["oom_deflated_pages"] == 256
    assert r.alloc.alloc_pages(0) is not None
    assert r.dev.dr_violations == {}
    r.alloc.check()


def test_no_oom_deflate_without_the_feature() -> None:
    r = Rig().probe()
    r.host(r.dev.set_target, 1024)
    r.run(0.05)
    exhaust(r)
    assert r.alloc.alloc_pages(0) is None
    assert r.drv.s.num_pages == 1024 and r.alloc.oom_notifiers == []


def test_inflating_never_reclaims_or_deflates() -> None:
    r = Rig(offered=OOM).probe()
    r.host(r.dev.free_page_start)
    r.run(0.05)
    held = r.drv.shrink_count()
    assert held > 0
    r.host(r.dev.set_target, 1 << 20)  # far more than the guest has
    r.run(0.5)
    # balloon_page_alloc is __GFP_NORETRY: no shrinker, no OOM notifier.
    assert r.drv.shrink_count() == held and r.alloc.counters["oom_runs"] == 0
    assert r.drv.counters["inflate_alloc_failed"] >= 1


# -- DEVICE_NEEDS_RESET --------------------------------------------------------------------------

def break_inflateq(r: Rig) -> None:
    """Corrupt our own avail.idx so the device sees a jump past the queue size (V-1)."""
    vq = r.drv.vqs[BalloonQueue.INFLATE]
    r.mem.write_u16(vq.avail_gpa + 2, 500)
    r.t.notify(r.drv.qindex[BalloonQueue.INFLATE])


def test_device_needs_reset_stops_device_work_and_keeps_what_linux_keeps() -> None:
    r = Rig(offered=OOM | feature_mask(VIRTIO_BALLOON_F_REPORTING), ram=256 << 20,
            hint_batch=1).probe()
    r.host(r.dev.set_target, 512)
    r.run(0.05)
    r.host(r.dev.free_page_start)
    r.run(50e-6)  # a capture round under way
    assert r.drv.hinting and r.drv.s.held_blocks
    hints = r.drv.counters["hints_sent"]
    break_inflateq(r)
    r.run(0.001)
    assert r.dev.status & DeviceStatus.DEVICE_NEEDS_RESET
    c = r.drv.counters
    assert c["device_needs_reset"] == 1 and r.drv.needs_reset and not r.drv.ready
    # Linux does not reset the device itself: no more buffers, nothing scheduled.
    assert not r.drv.hinting and c["hints_sent"] == hints
    avail = {q: vq.avail_idx for q, vq in r.drv.vqs.items()}
    r.host(r.dev.set_target, 10)
    r.run(5.0)  # past a reporting interval, with a resize asked for
    assert {q: vq.avail_idx for q, vq in r.drv.vqs.items()} == avail
    assert r.drv.s.num_pages == 512 and c["reports"] == 0
    assert r.sched.pending() == 0
    # The balloon stays (deflating needs the device); the OOM notifier gives nothing back
    # (Linux would wait for an ack that never comes).
    assert r.drv.oom_notify() == 0 and c["oom_deflate_blocked"] == 1
    assert r.drv.s.num_pages == 512
    # Held hint blocks: the shrinker still frees them, and DONE (config space only) the rest.
    held = len(r.drv.s.held_blocks)
    assert held >= 2 and r.drv.shrink(1) == HINT_BLOCK_PAGES
    assert len(r.drv.s.held_blocks) == held - 1
    r.host(r.dev.free_page_done)
    r.run(0.01)
    assert r.drv.s.held_blocks == [] and c["device_needs_reset"] == 1
    r.alloc.check()


# -- walk granularity ----------------------------------------------------------------------------

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


def test_hint_batch_must_be_positive() -> None:
    with pytest.raises(UsageError, match="hint_batch"):
        Rig(hint_batch=0)


def test_needs_reset_leaves_an_unanswered_report_isolated() -> None:
    r = Rig(offered=REPORTING, ram=256 << 20).probe()
    rq = r.drv.qindex[BalloonQueue.REPORTING]
    r.t.stalled.add(rq)  # the device never gets to the report
    r.run(2.1)
    iso = r.drv.isolated_pfn_ranges()
    assert iso and all((r.alloc.state[p:p + n] == PG_ISOLATED).all() for p, n in iso)
    break_inflateq(r)
    r.run(5.0)
    assert r.drv.needs_reset
    # Linux's reporting worker waits for the used buffer forever: the blocks stay isolated,
    # free memory the guest cannot use, never written.
    assert r.drv.isolated_pfn_ranges() == iso and r.drv.counters["reports"] == 0
    assert (r.alloc.state == PG_ISOLATED).sum() == sum(n for _, n in iso)
    r.alloc.check()


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
