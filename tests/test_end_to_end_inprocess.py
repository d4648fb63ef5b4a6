"""End to end in one process: SimGuest (buddy allocator + balloon driver) <-> InProcessTransport
<-> BalloonDevice, over a VM memory laid out as vmsim lays it out (page contents in
PageVersions, the 4 MiB driver area at 1 MiB backed by bytes, the rest of RAM a sparse mapping).

Covers a full hint round driven by the device's precopy notifier (protocol.md 4.3 / 5.4),
inflate / deflate and statistics, and checks that device and driver agree on every count.
"""
from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import (
    ActualChanged,
    Deflated,
    HintRoundStopped,
    Inflated,
    PagesHinted,
    PagesReported,
    PrecopyEvent,
    StatsReceived,
)
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import PG_BALLOON, PG_ISOLATED, BuddyAllocator
from guest_model.guest import DEFAULT_DRIVER_AREA, GuestOptions, SimGuest
from guestmem import DirtyLog, GuestMemory, PageVersions
from guestmem.clock import Scheduler
from guestmem.pages import POISON
from protocol.balloon import VIRTIO_BALLOON_F_REPORTING
from protocol.errors import UsageError
from protocol.virtio import feature_mask

RAM = 256 << 20


def _sparse(size: int) -> mmap.mmap:
    """Anonymous memory that costs nothing until touched (hint ranges are never touched)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, size, flags=flags)


class VM:
    """``backed=False`` is vmsim's layout: the driver area is a bytearray and the rest of RAM a
    sparse mapping, so the device's V-8 check (buffers inside guest memory) sees all of RAM
    while page contents live in ``PageVersions``. ``backed=True`` backs all of RAM with one
    bytearray, with the driver area inside it."""

    def __init__(self, strategy: str = "capture", *, backed: bool = False,
                 offered: int = DEFAULT_OFFERED_FEATURES, **gopts: Any) -> None:
        pages = RAM >> 12
        self.sched = Scheduler()
        self.dirty = DirtyLog(pages)
        self.pages = PageVersions(pages, self.dirty)
        self.mem = GuestMemory()
        gpa, size = DEFAULT_DRIVER_AREA
        if backed:
            self.mem.add_region(0, bytearray(RAM), "ram")
        else:
            self.mem.add_region(gpa, bytearray(size), "driver-area")
            self.mem.add_region(0, _sparse(gpa), "ram-low")
            self.mem.add_region(gpa + size, _sparse(RAM - gpa - size), "ram")
        self.mem.dirty_log = self.dirty
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=offered,
                                                        ram_pages=pages))
        self.t = InProcessTransport(self.dev)
        self.effects: list[Any] = []
        self.t.add_host_listener(self.effects.append)
        self.guest = SimGuest(self.mem, self.pages, self.sched, self.t,
                              GuestOptions(ram_bytes=RAM, hint_strategy=strategy, **gopts))
        self.run(0.001)

    def run(self, dt: float) -> None:
        self.sched.run_until(self.sched.now + dt)

    def host(self, fn: Any, *args: Any) -> None:
        self.t.host_call(fn, *args)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def hinted(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Every (gpa, len) range the host got in ``PagesHinted`` so far, and the pages they
        cover (a bool per page of RAM)."""
        ranges = [r for e in self.of(PagesHinted) for r in e.ranges]
        mask = np.zeros(RAM >> 12, bool)
        for a, n in ranges:
            mask[a >> 12:(a + n) >> 12] = True
        return ranges, mask


@pytest.mark.spec("DR-10")
@pytest.mark.parametrize("backed", [True, False])
@pytest.mark.parametrize("strategy", ["capture", "walk"])
def test_precopy_round_trip(strategy: str, backed: bool) -> None:
    vm = VM(strategy, backed=backed)
    drv = vm.guest.driver
    # A workload holds some memory so not everything is free.
    used = vm.guest.allocator.alloc_pages_bulk(8192)
    vm.pages.write_pfns(used)
    vm.host(vm.dev.precopy_notify, PrecopyEvent.SETUP, True)
    vm.host(vm.dev.precopy_notify, PrecopyEvent.BEFORE_BITMAP_SYNC, True)
    vm.host(vm.dev.precopy_notify, PrecopyEvent.AFTER_BITMAP_SYNC, True)
    first_id = vm.dev.hint.cmd_id
    vm.run(0.05)
    hints = vm.of(PagesHinted)
    assert hints and {e.cmd_id for e in hints} == {first_id}
    ranges, hinted = vm.hinted()
    assert len(ranges) == drv.counters["hints_sent"]
    # Never a page the guest uses, never the driver area.
    assert not (hinted & vm.guest.in_use_mask()).any()
    assert hinted.sum() == drv.counters["hinted_pages"]
    assert len(vm.of(HintRoundStopped)) == 1 and drv.counters["stop_sent"] == 1
    if strategy == "capture":
        assert (vm.guest.held_by_driver_mask() == hinted).all()
    else:
        assert not vm.guest.held_by_driver_mask().any()
    # Next iteration: STOP, sync, new id; the capture guest has nothing left to hint.
    vm.host(vm.dev.precopy_notify, PrecopyEvent.BEFORE_BITMAP_SYNC, True)
    vm.host(vm.dev.precopy_notify, PrecopyEvent.AFTER_BITMAP_SYNC, True)
    vm.run(0.05)
    assert drv.counters["rounds"] == 2 and drv.s.cmd_id_active == vm.dev.hint.cmd_id
    # Migration over: DONE, the guest gets its memory back.
    vm.host(vm.dev.precopy_notify, PrecopyEvent.CLEANUP, True)
    vm.run(0.01)
    assert not vm.guest.held_by_driver_mask().any()
    vm.guest.allocator.check()
    assert vm.dev.dr_violations == {}
    assert vm.dev.counters.get("hint_outside_round", 0) == 0


def test_inflate_deflate_and_stats() -> None:
    vm = VM("capture")
    vm.host(vm.dev.set_target, 5000)
    vm.run(0.5)
    assert vm.dev.actual == 5000 == vm.guest.driver.s.num_pages
    inflated = {p for e in vm.of(Inflated) for p in e.pfns}
    assert len(inflated) == 5000
    held = vm.guest.held_by_driver_mask()
    assert held.sum() == 5000 and held[list(inflated)].all()
    assert vm.of(ActualChanged)[-1].actual == 5000
    vm.host(vm.dev.request_stats)
    vm.run(0.01)
    st = vm.of(StatsReceived)[-1].stats
    assert st["MEMTOT"] == RAM
    assert st["MEMFREE"] == vm.guest.allocator.nr_free_pages() << 12
    vm.host(vm.dev.set_target, 1000)
    vm.run(0.5)
    assert vm.dev.actual == 1000
    deflated = {p for e in vm.of(Deflated) for p in e.pfns}
    assert len(deflated) == 4000 and deflated <= inflated
    assert (vm.guest.allocator.state == PG_BALLOON).sum() == 1000
    assert vm.dev.dr_violations == {}


def test_shrinker_during_hold_and_poisoned_guest() -> None:
    vm = VM("capture", page_poisoning=True)
    assert vm.dev.poison_val == 0xAAAAAAAA
    vm.host(vm.dev.free_page_start)
    vm.run(0.05)
    held = vm.guest.driver.shrink_count()
    assert held > 0
    assert vm.guest.reclaim(4096) == 4096
    assert vm.guest.driver.shrink_count() == held - 4096
    vm.host(vm.dev.free_page_done)
    vm.run(0.01)
    assert vm.guest.driver.shrink_count() == 0
    # Freed hint blocks were poisoned by the allocator (page_poisoning), as Linux does.
    free = vm.guest.allocator.free_mask()
    assert (vm.pages.version[free] == 1).sum() > 0


def test_simguest_rejects_bad_assembly() -> None:
    mem = GuestMemory()
    gpa, size = DEFAULT_DRIVER_AREA
    mem.add_region(gpa, bytearray(size), "driver-area")
    pages = PageVersions(RAM >> 12)
    dev = BalloonDevice(mem, DeviceConfig(ram_pages=RAM >> 12))
    t = InProcessTransport(dev)
    with pytest.raises(UsageError, match="driver_area"):
        SimGuest(mem, pages, Scheduler(), t, GuestOptions(ram_bytes=2 << 20))
    with pytest.raises(UsageError, match="reserved"):
        SimGuest(mem, pages, Scheduler(), t, GuestOptions(ram_bytes=RAM),
                 allocator=BuddyAllocator(RAM, pages=pages))


def test_allocation_pressure_reaches_the_shrinker() -> None:
    vm = VM("capture")
    vm.host(vm.dev.free_page_start)
    vm.run(0.05)
    alloc = vm.guest.allocator
    held = vm.guest.driver.shrink_count()
    assert held > 0
    # A guest allocation that only fits if the balloon gives back held hint blocks.
    got = alloc.alloc_pages_bulk(alloc.nr_free_pages() + 2048)
    assert got.size > 2048
    assert vm.guest.driver.counters["hint_blocks_shrunk"] > 0
    assert vm.guest.driver.shrink_count() < held
    alloc.check()


def test_workloads_interleave_with_a_walk_round() -> None:
    # 1 ms per block: the round takes ~0.1 s, the churn ticks every 10 ms inside it.
    vm = VM("walk", min_order=9, driver={"hint_batch": 1, "hint_cost_per_block": 1e-3})
    vm.guest.add_workload("fill", size=64 << 20)
    kept = vm.guest.in_use_mask().copy()  # the fill's pages and reserved memory stay in use
    assert kept.sum() >= (64 << 20) >> 12
    w = vm.guest.add_workload("churn", background=True)
    writes = vm.pages.writes
    vm.host(vm.dev.free_page_start)
    mid: list[tuple[bool, int]] = []
    vm.sched.after(0.05, lambda: mid.append((vm.guest.driver.hinting, vm.pages.writes)))
    vm.run(0.5)
    w.stop()
    ranges, hinted = vm.hinted()
    assert ranges and vm.guest.driver.counters["stop_sent"] == 1
    # The walk hints free memory only: never the fill's pages (they stay allocated).
    assert not (hinted & kept).any()
    assert mid[0][0] and mid[0][1] > writes  # the churn wrote while the round was walking
    vm.guest.allocator.check()


@pytest.mark.spec("DR-13")
def test_poisoning_guest_reports_free_memory_without_writing_it() -> None:
    vm = VM("off", page_poisoning=True,
            offered=DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING))
    drv = vm.guest.driver
    assert drv.poison_val == 0xAAAAAAAA and vm.dev.poison_val == 0xAAAAAAAA
    w = vm.guest.add_workload("churn", background=True)
    vm.run(1.0)
    w.stop()
    gpa, size = DEFAULT_DRIVER_AREA
    writes = vm.pages.writes
    vm.dirty.start()
    vm.run(6.0)  # three reporting intervals
    ranges = [r for e in vm.of(PagesReported) for r in e.ranges]
    assert ranges and drv.counters["reports"] >= 1
    # Reporting wrote nothing but its ring (driver area); the pages keep the poison pattern.
    dirty = vm.dirty.peek().copy()
    dirty[gpa >> 12:(gpa + size) >> 12] = False
    assert not dirty.any() and vm.pages.writes == writes
    for a, n in ranges:
        assert (vm.pages.version[a >> 12:(a + n) >> 12] == POISON).all()
    assert not (vm.guest.allocator.state == PG_ISOLATED).any()
    assert not vm.guest.held_by_driver_mask().any()
    assert vm.dev.dr_violations == {}
    vm.guest.allocator.check()
