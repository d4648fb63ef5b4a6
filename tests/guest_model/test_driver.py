"""guest_model.driver: probe, config changes, stats, device faults and DEVICE_NEEDS_RESET,
against the real device core through the in-process transport. Edge cases the device never
produces on its own (a config generation that never settles, a ring the device corrupts) are
made by wrapping the transport or poking ring memory.
"""
from __future__ import annotations

import struct

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES
from balloon_dev.effects import StatsReceived
from guest_model.buddy import PG_ISOLATED
from guest_model.driver import HINT_BLOCK_PAGES, PAGE_POISON_VAL, ProbeError
from guest_model.walk import FreeBlockWalker
from protocol.balloon import (
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.errors import UsageError
from protocol.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceStatus, feature_mask
from tests.guest_model.driver_rig import OOM, RAM, REPORTING, Rig, break_inflateq


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
