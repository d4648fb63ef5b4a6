"""Device conformance, legacy interface: D-2, D-5, D-7 (protocol.md 4.6).

The device is built with ``DeviceConfig(legacy=True)`` and driven the way a virtio 0.9.5 driver
does it: ACKNOWLEDGE, DRIVER, one 32-bit feature word, each ring given as one page frame number
(protocol.md 1.7), DRIVER_OK, with no FEATURES_OK step anywhere.
"""
from __future__ import annotations

import struct

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, DeviceConfig
from balloon_dev.effects import ActualChanged, Deflated, Inflated, NotifyQueue, StatsReceived
from protocol.balloon import (
    CFG_ACTUAL,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from protocol.virtio import feature_mask
from tests.balloon_dev.devharness import ACK, DOK, DRV, Harness, pfn_bytes, stats_bytes

Q = BalloonQueue
MTH = feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)
ALL = DEFAULT_OFFERED_FEATURES | MTH | feature_mask(VIRTIO_BALLOON_F_REPORTING)
LOW32 = 0xFFFFFFFF


def legacy(**kw) -> Harness:
    h = Harness(DeviceConfig(offered_features=ALL, legacy=True, **kw))
    h.init_legacy()
    return h


@pytest.mark.spec("D-2")
def test_legacy_driver_without_must_tell_host_is_served():
    """a legacy driver that declines MUST_TELL_HOST gets a working balloon, even from a device
    that refuses such drivers on its modern interface"""
    cfg = dict(offered_features=ALL, refuse_without_must_tell_host=True)
    modern = Harness(DeviceConfig(**cfg))
    assert not modern.negotiate(ALL & ~MTH)  # the option is really on
    h = Harness(DeviceConfig(legacy=True, **cfg))
    assert h.dev.device_features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    h.init_legacy(features=h.dev.device_features & ~MTH)
    assert h.dev.status == ACK | DRV | DOK
    assert h.dev.driver_features == ALL & LOW32 & ~MTH
    inf = h.tq(Q.INFLATE)
    h.post_out(Q.INFLATE, pfn_bytes(0x300, 0x301, 0x302))
    assert h.kick(Q.INFLATE) == [Inflated((0x300, 0x301, 0x302)), NotifyQueue(inf)]
    # Without MUST_TELL_HOST the guest may already use 0x301 again; it tells the host later.
    h.ram[0x301000:0x301008] = b"reused!!"
    h.post_out(Q.DEFLATE, pfn_bytes(0x301))
    assert h.kick(Q.DEFLATE) == [Deflated((0x301,)), NotifyQueue(h.tq(Q.DEFLATE))]
    assert h.used(Q.INFLATE) == [(0, 0)] and h.used(Q.DEFLATE) == [(0, 0)]
    assert h.dev.status == ACK | DRV | DOK  # still live: nothing was held against the driver
    assert h.dev.dr_violations == {"DR-1": 1}  # a "should" for the driver, noted only
    assert "needs_reset" not in h.dev.counters


@pytest.mark.spec("D-2")
def test_legacy_feature_word_has_no_version_1_and_no_refusal():
    """the legacy interface shows 32 feature bits (no VERSION_1) and takes the driver's word
    without a FEATURES_OK step"""
    h = Harness(DeviceConfig(offered_features=ALL, legacy=True))
    d = h.dev
    assert d.device_features == ALL & LOW32
    d.write_status(ACK)
    d.write_status(ACK | DRV)
    d.write_driver_features(ALL)  # bit 32 does not exist here: dropped, counted
    assert d.driver_features == ALL & LOW32
    assert d.counters["features_write_out_of_range"] == 1
    d.write_status(ACK | DRV | 8)  # FEATURES_OK means nothing to a legacy device
    assert d.status == ACK | DRV
    assert d.counters["status_not_legacy_bit"] == 1
    d.write_status(ACK | DRV | DOK)
    assert d.status == ACK | DRV | DOK


def write_actual_bytewise(h: Harness, value: int) -> list[list[object]]:
    """The old legacy Linux way: one byte at a time, least significant first."""
    raw = struct.pack("<I", value)
    return [h.dev.write_config(CFG_ACTUAL + i, raw[i:i + 1]) for i in range(4)]


@pytest.mark.spec("D-5")
def test_actual_acted_on_only_after_most_significant_byte():
    """a legacy driver writing `actual` byte by byte: the device acts on it only when the most
    significant byte arrives, never on the half-written values in between"""
    h = legacy()
    assert h.dev.write_config(CFG_ACTUAL, struct.pack("<I", 0x000100FF)) == \
        [ActualChanged(0x000100FF)]
    # 0x000100FF -> 0x00020100: the half-written values would be 0x00010000, 0x00010100, ...
    effects = write_actual_bytewise(h, 0x00020100)
    assert effects[:3] == [[], [], []]
    assert effects[3] == [ActualChanged(0x00020100)]
    assert h.dev.actual == 0x00020100
    assert h.dev.dr_violations.get("DR-7") == 4  # not one 4-byte write (DR-7, legacy)


@pytest.mark.spec("D-5")
def test_half_written_actual_is_visible_but_not_used():
    """between the bytes, config reads show what was written while the device keeps acting on
    the last complete value; a whole 4-byte write is taken at once"""
    h = legacy()
    h.dev.write_config(CFG_ACTUAL, struct.pack("<I", 500))
    assert h.dev.write_config(CFG_ACTUAL, b"\x10") == []
    assert h.dev.read_config(CFG_ACTUAL, 4) == struct.pack("<I", 0x110)
    assert h.dev.actual == 500
    assert h.dev.write_config(CFG_ACTUAL + 2, b"\x00\x00") == [ActualChanged(0x110)]
    assert h.dev.actual == 0x110
    assert h.dev.write_config(CFG_ACTUAL, struct.pack("<I", 7)) == [ActualChanged(7)]
    assert h.dev.dr_violations.get("DR-7") == 2  # only the two partial writes


@pytest.mark.spec("D-7")
def test_first_stats_buffer_values_ignored():
    """a legacy driver's first stats buffer is held but its (uninitialised) values are not
    used; the next buffer's values are"""
    h = legacy()
    garbage = stats_bytes((4, 0xDEADBEEF), (4, 1), (0x5A5A, 3))  # duplicate and unknown tags
    head = h.post_out(Q.STATS, garbage)
    assert h.kick(Q.STATS) == []  # no StatsReceived from the first buffer
    assert h.dev.request_stats() == [NotifyQueue(h.tq(Q.STATS))]
    assert h.used(Q.STATS) == [(head, 0)]  # it was held, and is the one given back
    h.post_out(Q.STATS, stats_bytes((4, 4096), (5, 8192)))
    assert h.kick(Q.STATS) == [StatsReceived({"MEMFREE": 4096, "MEMTOT": 8192})]
    assert h.dev.dr_violations == {}  # the first buffer's tags say nothing about the driver


@pytest.mark.spec("D-7")
def test_first_stats_buffer_ignored_again_after_reset():
    """"first" counts from each initialisation; the modern interface uses the first buffer"""
    h = legacy()
    h.post_out(Q.STATS, stats_bytes((4, 1)))
    h.kick(Q.STATS)
    h.dev.request_stats()
    h.post_out(Q.STATS, stats_bytes((4, 2)))
    assert h.kick(Q.STATS) == [StatsReceived({"MEMFREE": 2})]
    h.init_legacy()  # reset and initialise again
    h.post_out(Q.STATS, stats_bytes((4, 3)))
    assert h.kick(Q.STATS) == []
    modern = Harness(DeviceConfig(offered_features=ALL))
    modern.init()
    modern.post_out(Q.STATS, stats_bytes((4, 3)))
    assert modern.kick(Q.STATS) == [StatsReceived({"MEMFREE": 3})]
