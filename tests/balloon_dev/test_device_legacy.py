"""The device core's legacy mode (DeviceConfig(legacy=True)) beyond the conformance items D-2,
D-5, D-7 (tests/conformance/test_device_legacy.py): the one-address ring layout, feature and
status writes a legacy driver may get wrong, and the missing DEVICE_NEEDS_RESET bit."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import ActualChanged, Inflated, NeedsReset, NotifyQueue
from balloon_dev.legacy import legacy_ring_layout
from protocol.balloon import CFG_ACTUAL, CFG_POISON_VAL, BalloonQueue
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, feature_mask
from protocol.virtqueue import legacy_vring_size, used_ring_size
from tests.balloon_dev.devharness import ACK, DOK, DRV, FOK, RING_BASE, Harness, pfn_bytes

Q = BalloonQueue
LEGACY = DeviceConfig(legacy=True)


def test_legacy_ring_layout_is_one_block():
    """desc table, avail ring right after it, used ring on the next 4 KiB boundary, all inside
    the legacy ring size of protocol.md 1.7"""
    assert legacy_ring_layout(0x10000, 128) == (0x10000, 0x10800, 0x11000)
    assert legacy_ring_layout(0x10000, 1024) == (0x10000, 0x14000, 0x15000)
    # The used ring starts right after the avail ring when that end is already aligned.
    assert legacy_ring_layout(0x1000, 4, align=2) == (0x1000, 0x1040, 0x104E)
    for n in (1, 32, 128, 1024, 32768):
        base, _, used = legacy_ring_layout(0, n)
        assert used % 4096 == 0
        assert used + used_ring_size(n) <= legacy_vring_size(n)


def test_set_queue_legacy_places_rings_where_the_driver_expects():
    """a ring set up from one pfn is used where a legacy driver reads its used ring"""
    h = Harness(LEGACY)
    h.init_legacy()
    tq = h.tq(Q.INFLATE)
    ring = h.rings[Q.INFLATE]
    assert (ring.desc, ring.driver, ring.device) == legacy_ring_layout(RING_BASE, 128)
    h.post_out(Q.INFLATE, pfn_bytes(0x400))
    assert h.kick(Q.INFLATE) == [Inflated((0x400,)), NotifyQueue(tq)]
    assert h.used(Q.INFLATE) == [(0, 0)]


def test_set_queue_legacy_needs_legacy_mode_and_a_pfn():
    """a modern device has no one-address set-up (our caller's mistake: ValueError); pfn 0
    sets nothing up"""
    modern = Harness()
    with pytest.raises(ValueError, match="modern interface"):
        modern.dev.set_queue_legacy(0, RING_BASE >> 12)
    h = Harness(LEGACY)
    h.dev.write_status(ACK)
    h.dev.write_status(ACK | DRV)
    assert h.dev.set_queue_legacy(0, 0) == []
    assert not h.dev.queue_enabled(0)
    h.dev.set_queue_legacy(0, RING_BASE >> 12)
    assert h.dev.queue_enabled(0)


def test_legacy_config_may_omit_version_1_modern_may_not():
    """DeviceConfig: VERSION_1 is required only of the modern interface"""
    no_v1 = DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_F_VERSION_1)
    with pytest.raises(ValueError, match="legacy=True"):
        DeviceConfig(offered_features=no_v1)
    dev = BalloonDevice(Harness().mem, DeviceConfig(offered_features=no_v1, legacy=True))
    assert dev.device_features == no_v1
    assert dev.legacy


def test_legacy_features_not_offered_are_dropped_and_fixed_once_rings_exist():
    """bits not offered are dropped (no FEATURES_OK to refuse with); a feature write after a
    ring was set up is ignored: the ring was built for the features before it"""
    h = Harness(LEGACY)
    d = h.dev
    d.write_status(ACK)
    d.write_status(ACK | DRV)
    d.write_driver_features(d.device_features | 1 << 31)
    assert d.driver_features == d.device_features
    assert d.counters["features_not_offered"] == 1
    d.set_queue_legacy(0, RING_BASE >> 12)
    d.write_driver_features(d.device_features & ~feature_mask(VIRTIO_F_RING_EVENT_IDX))
    assert d.driver_features == d.device_features
    assert d.counters["features_write_after_queue_setup"] == 1


def test_legacy_status_needs_no_features_ok_and_has_no_needs_reset_bit():
    """DRIVER_OK right after DRIVER is fine for a legacy driver (a modern one breaks the
    device); a broken ring stops the device without a status bit or config interrupt"""
    modern = Harness()
    modern.negotiate()
    modern.dev.write_status(0)
    modern.dev.write_status(ACK)
    modern.dev.write_status(ACK | DRV)
    modern.dev.write_status(ACK | DRV | DOK)
    assert modern.dev.status & 0x40  # DEVICE_NEEDS_RESET
    h = Harness(LEGACY)
    h.init_legacy()
    assert h.dev.status == ACK | DRV | DOK
    ring = h.rings[Q.INFLATE]
    ring.set_avail_idx(ring.size + 1)  # V-1: more pending than the ring holds
    effects = h.kick(Q.INFLATE)
    assert len(effects) == 1 and isinstance(effects[0], NeedsReset)  # for the host only
    assert h.dev.status == ACK | DRV | DOK
    h.post_out(Q.DEFLATE, pfn_bytes(1))
    assert h.kick(Q.DEFLATE) == []  # quiet until reset
    assert h.dev.counters["notify_while_needs_reset"] == 1
    h.init_legacy()  # a reset brings it back
    h.post_out(Q.INFLATE, pfn_bytes(2))
    assert h.kick(Q.INFLATE)[0] == Inflated((2,))


def test_legacy_config_writable_without_features_ok_and_reset_clears_actual():
    """legacy config writes need no FEATURES_OK; reset forgets both the acted-on and the
    half-written actual"""
    h = Harness(LEGACY)
    d = h.dev
    d.write_status(ACK)
    d.write_status(ACK | DRV)
    d.write_driver_features(d.device_features)
    assert d.write_config(CFG_POISON_VAL, struct.pack("<I", 0xAAAAAAAA)) == []
    assert d.poison_val == 0xAAAAAAAA
    assert d.write_config(CFG_ACTUAL, struct.pack("<I", 9)) == [ActualChanged(9)]
    d.write_config(CFG_ACTUAL, b"\x05")
    assert d.write_status(0) == [ActualChanged(0)]
    assert d.read_config(CFG_ACTUAL, 4) == b"\0\0\0\0" and d.actual == 0
    assert FOK & d.status == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4), st.binary(min_size=4,
                                                                         max_size=4)),
                max_size=12))
def test_actual_changes_only_on_writes_covering_its_top_byte(writes):
    """any sequence of narrow writes into `actual`: the acted-on value moves only on a write
    that covers byte 3 of the field, and then equals the field's bytes as read back (D-5)"""
    h = Harness(LEGACY)
    h.init_legacy()
    d = h.dev
    for start, width, data in writes:
        width = min(width, 4 - start)
        before = d.actual
        effects = d.write_config(CFG_ACTUAL + start, data[:width])
        shown = int.from_bytes(d.read_config(CFG_ACTUAL, 4), "little")
        if start + width == 4:
            assert d.actual == shown
            assert effects == ([ActualChanged(shown)] if shown != before else [])
        else:
            assert d.actual == before and effects == []
