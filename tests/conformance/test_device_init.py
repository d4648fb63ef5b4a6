"""Device conformance, initialisation and transport-level items: D-1, D-16, D-17, V-10
(protocol.md 4.6). The legacy-interface items D-2, D-5 and D-7 are in test_device_legacy.py."""
from __future__ import annotations

import struct

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import ConfigChanged, NotifyQueue
from guestmem import GuestMemory
from protocol.balloon import (
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, feature_mask
from tests.balloon_dev.devharness import ACK, DOK, DRV, FOK, Harness, cmd, pfn_bytes, stats_bytes

Q = BalloonQueue
MTH = feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)


@pytest.mark.spec("D-1")
def test_may_refuse_features_ok_without_must_tell_host():
    """FEATURES_OK refused when MUST_TELL_HOST is offered and declined (option on)"""
    offered = DEFAULT_OFFERED_FEATURES | MTH
    strict = Harness(DeviceConfig(offered_features=offered, refuse_without_must_tell_host=True))
    assert not strict.negotiate(offered & ~MTH)
    assert strict.dev.status == ACK | DRV  # the bit is gone on re-read (protocol.md 2.3 step 6)
    assert strict.negotiate(offered)
    lenient = Harness(DeviceConfig(offered_features=offered))
    assert lenient.negotiate(offered & ~MTH)
    assert lenient.dev.dr_violations == {"DR-1": 1}  # a "should" for the driver, still noted


@pytest.mark.spec("D-16")
def test_nothing_used_or_notified_before_driver_ok():
    """no used buffer, queue or config notification before DRIVER_OK; config readable early"""
    offered = DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_F_RING_EVENT_IDX)
    h = Harness(DeviceConfig(offered_features=offered))
    d = h.dev
    d.write_status(ACK)
    # Config fields of *offered* features are readable before FEATURES_OK.
    assert d.config_size == 16
    assert d.read_config(CFG_FREE_PAGE_HINT_CMD_ID, 4) == b"\0\0\0\0"
    assert d.read_config(CFG_POISON_VAL, 4) == b"\0\0\0\0"
    h.init(driver_ok=False)
    assert d.set_target(64) == []  # config changed, but no notification yet
    assert d.free_page_start() == []
    h.post_out(Q.INFLATE, pfn_bytes(1, 2))
    h.post_out(Q.STATS, stats_bytes((4, 1)))
    h.post_out(Q.FREE_PAGE, cmd(h.read_cmd_id()))
    for q in h.rings:
        assert h.kick(q) == []
        assert h.rings[q].used_idx() == 0
    eff = d.write_status(ACK | DRV | FOK | DOK)
    assert NotifyQueue(h.tq(Q.INFLATE)) in eff  # acted on once DRIVER_OK is set
    assert h.rings[Q.INFLATE].used_idx() == 1
    assert d.set_target(65) == [ConfigChanged()]


@pytest.mark.spec("V-10")
def test_no_buffer_use_before_driver_ok_device_level():
    """a kick before DRIVER_OK uses nothing; the buffer is used only after DRIVER_OK"""
    h = Harness()
    h.init(driver_ok=False)
    h.post_out(Q.DEFLATE, pfn_bytes(3))
    assert h.kick(Q.DEFLATE) == [] and h.used(Q.DEFLATE) == []
    assert h.dev.counters["notify_before_driver_ok"] == 1
    h.dev.write_status(ACK | DRV | FOK | DOK)
    assert h.rings[Q.DEFLATE].used_idx() == 1


@pytest.mark.spec("D-17")
@pytest.mark.parametrize("bits,expect", [
    ((), {Q.INFLATE: 0, Q.DEFLATE: 1}),
    ((VIRTIO_BALLOON_F_STATS_VQ,), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2}),
    ((VIRTIO_BALLOON_F_FREE_PAGE_HINT,), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.FREE_PAGE: 2}),
    ((VIRTIO_BALLOON_F_REPORTING,), {Q.INFLATE: 0, Q.DEFLATE: 1, Q.REPORTING: 2}),
    ((VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_REPORTING),
     {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2, Q.REPORTING: 3}),
    ((VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_BALLOON_F_REPORTING),
     {Q.INFLATE: 0, Q.DEFLATE: 1, Q.STATS: 2, Q.FREE_PAGE: 3, Q.REPORTING: 4}),
])
def test_queue_indices_compacted_by_offered_features(bits, expect):
    """queue indices: 0 inflate, 1 deflate, then stats/free_page/reporting as offered"""
    dev = BalloonDevice(GuestMemory(), DeviceConfig(
        offered_features=feature_mask(VIRTIO_F_VERSION_1, *bits)))
    assert dev.queue_layout() == expect
    assert dev.num_queues == len(expect)
    assert dev.queue_max_size(len(expect)) == 0


@pytest.mark.spec("D-17")
def test_free_page_out_buffers_are_4_bytes_and_used_len_is_zero():
    """a non-4-byte out buffer on free_page_vq changes nothing; every used len is 0"""
    offered = (DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING)) \
        & ~feature_mask(VIRTIO_BALLOON_F_PAGE_POISON)
    h = Harness(DeviceConfig(offered_features=offered))
    h.init(poison=None)
    h.dev.free_page_start()
    cid = h.read_cmd_id()
    h.post_out(Q.FREE_PAGE, struct.pack("<IB", cid, 0))  # 5 bytes
    h.post_out(Q.FREE_PAGE, struct.pack("<H", cid & 0xFFFF))  # 2 bytes
    h.kick(Q.FREE_PAGE)
    assert h.dev.hint.status.name == "FREE_PAGE_HINT_S_REQUESTED"
    h.post_out(Q.FREE_PAGE, cmd(cid))
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x400000)])
    h.post_out(Q.FREE_PAGE, cmd(0))
    h.kick(Q.FREE_PAGE)
    h.post_out(Q.INFLATE, pfn_bytes(7))
    h.kick(Q.INFLATE)
    h.post_out(Q.DEFLATE, pfn_bytes(7))
    h.kick(Q.DEFLATE)
    h.post_in(Q.REPORTING, [(0x600000, 0x200000)])
    h.kick(Q.REPORTING)
    h.post_out(Q.STATS, stats_bytes((4, 1)))
    h.kick(Q.STATS)
    h.dev.request_stats()
    for q in Q:
        used = h.used(q)
        assert used, f"{q.name}: nothing used"
        assert all(n == 0 for _, n in used), f"{q.name}: {used}"
