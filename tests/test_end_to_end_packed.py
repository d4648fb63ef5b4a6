"""End to end in one process with packed virtqueues (RING_PACKED negotiated): SimGuest's driver on
guest_model/packed_vring.py, the device on balloon_dev/packed_virtqueue.py, agreeing only
through guest memory. A full precopy hint round, inflate / deflate / stats and free page
reporting, with and without EVENT_IDX and indirect descriptors."""
from __future__ import annotations

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES
from balloon_dev.effects import (
    Deflated,
    HintRoundStopped,
    Inflated,
    PagesReported,
    PrecopyEvent,
    StatsReceived,
)
from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue
from guest_model.buddy import PG_BALLOON
from guest_model.packed_vring import PackedDriverVring
from protocol.balloon import VIRTIO_BALLOON_F_REPORTING, BalloonQueue
from protocol.virtio import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    feature_mask,
)
from tests.test_end_to_end_inprocess import RAM, VM

PACKED = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_F_RING_PACKED, VIRTIO_BALLOON_F_REPORTING)
RING_OPTS = {
    "event_idx+indirect": PACKED,
    "plain": PACKED & ~feature_mask(VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC),
}


def _packed_vm(strategy: str, offered: int) -> VM:
    vm = VM(strategy, offered=offered)
    assert vm.dev.driver_features >> VIRTIO_F_RING_PACKED & 1
    for q in range(vm.dev.num_queues):
        assert isinstance(vm.dev._slots[q].vq, PackedDeviceVirtqueue)
    assert all(isinstance(v, PackedDriverVring) for v in vm.guest.driver.vqs.values())
    return vm


def _ring_faults(vm: VM) -> int:
    return sum(v for k, v in vm.dev.counters.items() if "." in k)


def test_packed_not_offered_by_default() -> None:
    vm = VM("capture")
    assert not vm.dev.device_features >> VIRTIO_F_RING_PACKED & 1
    assert not any(isinstance(v, PackedDriverVring) for v in vm.guest.driver.vqs.values())


@pytest.mark.parametrize("rings", sorted(RING_OPTS))
@pytest.mark.parametrize("strategy", ["capture", "walk"])
def test_packed_precopy_round_trip(strategy: str, rings: str) -> None:
    vm = _packed_vm(strategy, RING_OPTS[rings])
    drv = vm.guest.driver
    used = vm.guest.allocator.alloc_pages_bulk(8192)
    vm.pages.write_pfns(used)
    for ev in (PrecopyEvent.SETUP, PrecopyEvent.BEFORE_BITMAP_SYNC,
               PrecopyEvent.AFTER_BITMAP_SYNC):
        vm.host(vm.dev.precopy_notify, ev, True)
    vm.run(0.05)
    ranges, hinted = vm.hinted()
    assert len(ranges) == drv.counters["hints_sent"] > 0
    assert not (hinted & vm.guest.in_use_mask()).any()
    assert hinted.sum() == drv.counters["hinted_pages"]
    assert len(vm.of(HintRoundStopped)) == 1 and drv.counters["stop_sent"] == 1
    vm.host(vm.dev.precopy_notify, PrecopyEvent.BEFORE_BITMAP_SYNC, True)
    vm.host(vm.dev.precopy_notify, PrecopyEvent.AFTER_BITMAP_SYNC, True)
    vm.run(0.05)
    assert drv.counters["rounds"] == 2 and drv.s.cmd_id_active == vm.dev.hint.cmd_id
    vm.host(vm.dev.precopy_notify, PrecopyEvent.CLEANUP, True)
    vm.run(0.01)
    assert not vm.guest.held_by_driver_mask().any()
    vm.guest.allocator.check()
    assert vm.dev.dr_violations == {} and _ring_faults(vm) == 0
    assert not any(v.broken for v in drv.vqs.values())


@pytest.mark.parametrize("rings", sorted(RING_OPTS))
def test_packed_inflate_deflate_stats_and_reporting(rings: str) -> None:
    vm = _packed_vm("off", RING_OPTS[rings])
    vm.host(vm.dev.set_target, 5000)
    vm.run(0.5)
    assert vm.dev.actual == 5000 == vm.guest.driver.s.num_pages
    inflated = {p for e in vm.of(Inflated) for p in e.pfns}
    assert len(inflated) == 5000 and vm.guest.held_by_driver_mask().sum() == 5000
    # 300 stats exchanges over the 128-entry stats queue: both wrap counters flip twice.
    before = len(vm.of(StatsReceived))
    for _ in range(300):
        vm.host(vm.dev.request_stats)
        vm.run(0.001)
    assert len(vm.of(StatsReceived)) - before == 300
    assert vm.of(StatsReceived)[-1].stats["MEMTOT"] == RAM
    stats_vq = vm.dev._slots[vm.dev.queue_layout()[BalloonQueue.STATS]].vq
    # One-slot chains; the device holds the latest buffer until the next request.
    used = before + 300 - 1
    assert isinstance(stats_vq, PackedDeviceVirtqueue) and used > 2 * stats_vq.size
    assert (stats_vq.used_idx, stats_vq.used_wrap) == (used % stats_vq.size,
                                                       1 ^ (used // stats_vq.size) & 1)
    assert stats_vq.in_flight == 1
    vm.host(vm.dev.set_target, 1000)
    vm.run(0.5)
    assert vm.dev.actual == 1000
    deflated = {p for e in vm.of(Deflated) for p in e.pfns}
    assert len(deflated) == 4000 and deflated <= inflated
    assert (vm.guest.allocator.state == PG_BALLOON).sum() == 1000
    vm.run(6.0)  # reporting passes (32-entry chains: indirect tables when negotiated)
    assert vm.of(PagesReported) and vm.guest.driver.counters["reports"] >= 1
    assert vm.dev.dr_violations == {} and _ring_faults(vm) == 0
    vm.guest.allocator.check()
