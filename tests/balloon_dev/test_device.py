"""Unit tests of the device core: features, status, config space, queues, each queue."""
from __future__ import annotations

import struct

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.effects import (
    ActualChanged,
    ConfigChanged,
    Deflated,
    HintRoundStopped,
    Inflated,
    NeedsReset,
    NotifyQueue,
    PagesHinted,
    PagesReported,
    PrecopyEvent,
    StatsReceived,
)
from balloon_dev.hint import DONE, REQUESTED, STOP
from guestmem import GuestMemory
from protocol.balloon import (
    BALLOON_FEATURE_NAMES,
    CFG_ACTUAL,
    CFG_FREE_PAGE_HINT_CMD_ID,
    CFG_NUM_PAGES,
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonQueue,
)
from protocol.errors import UsageError
from protocol.virtio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, feature_mask
from tests.balloon_dev.devharness import (
    ACK,
    DOK,
    DRV,
    FOK,
    NEEDS_RESET,
    Harness,
    cmd,
    pfn_bytes,
    stats_bytes,
)

Q = BalloonQueue
ALL = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING,
                                              VIRTIO_BALLOON_F_MUST_TELL_HOST)
NO_EVENT_IDX = ALL & ~feature_mask(VIRTIO_F_RING_EVENT_IDX)


def live(features: int = NO_EVENT_IDX, **cfg) -> Harness:
    """A driven device; EVENT_IDX off by default so every used buffer notifies."""
    h = Harness(DeviceConfig(offered_features=ALL, **cfg))
    h.init(features)
    return h


# -- construction -------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="VERSION_1"):
        DeviceConfig(offered_features=feature_mask(VIRTIO_BALLOON_F_STATS_VQ))
    with pytest.raises(ValueError, match="queue_sizes"):
        DeviceConfig(queue_sizes=(128, 128, 100, 1024, 32))


def test_hint_wait_on_ack_is_not_offered():
    """Bit 6 is an RFC's, with no specification: the device does not implement it, so a host
    cannot offer it (a usage error), and ``serve --features`` has no name for it."""
    with pytest.raises(UsageError, match="HINT_WAIT_ON_ACK"):
        DeviceConfig(offered_features=DEFAULT_OFFERED_FEATURES
                     | 1 << VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL)
    assert VIRTIO_BALLOON_F_HINT_WAIT_ON_ACK_EXPERIMENTAL not in BALLOON_FEATURE_NAMES


@pytest.mark.parametrize("features,size", [
    (feature_mask(VIRTIO_F_VERSION_1), 8),
    (feature_mask(VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_FREE_PAGE_HINT), 12),
    (feature_mask(VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_PAGE_POISON), 16),
])
def test_config_size_from_offered(features, size):
    dev = BalloonDevice(GuestMemory(), DeviceConfig(offered_features=features))
    assert dev.config_size == size
    assert dev.read_config(0, size) == bytes(size)
    assert dev.read_config(size - 2, 4) == b"\xff" * 4
    assert dev.counters["config_read_out_of_range"] == 1


def test_queue_numbering_compacted_and_fixed():
    f = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_BALLOON_F_FREE_PAGE_HINT,
                     VIRTIO_BALLOON_F_REPORTING)
    dev = BalloonDevice(GuestMemory(), DeviceConfig(offered_features=f))
    assert dev.num_queues == 4
    assert dev.queue_layout() == {Q.INFLATE: 0, Q.DEFLATE: 1, Q.FREE_PAGE: 2, Q.REPORTING: 3}
    assert [dev.queue_max_size(i) for i in range(5)] == [128, 128, 1024, 32, 0]
    fixed = BalloonDevice(GuestMemory(), DeviceConfig(offered_features=f,
                                                      fixed_queue_numbering=True))
    assert fixed.num_queues == 5
    assert [fixed.queue_max_size(i) for i in range(5)] == [128, 128, 0, 1024, 32]


# -- features and status ------------------------------------------------------------------------
def test_features_ok_accepts_subset():
    h = Harness()
    assert h.negotiate()
    assert h.dev.driver_features == DEFAULT_OFFERED_FEATURES


@pytest.mark.parametrize("features,counter", [
    (DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING), "features_not_offered"),
    (DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_F_VERSION_1), "features_no_version_1"),
    # declining stats while accepting free page hint: queue numbers would differ
    (DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_STATS_VQ),
     "features_queue_layout_mismatch"),
])
def test_features_ok_refused(features, counter):
    h = Harness()
    assert not h.negotiate(features)
    assert h.dev.status == ACK | DRV
    assert h.dev.counters[counter] == 1


def test_declining_last_queue_is_fine_and_fixed_numbering_allows_holes():
    h = Harness()
    assert h.negotiate(DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_FREE_PAGE_HINT))
    h = Harness(DeviceConfig(fixed_queue_numbering=True))
    assert h.negotiate(DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_STATS_VQ))


def test_features_frozen_after_features_ok():
    h = Harness()
    h.negotiate()
    h.dev.write_driver_features(feature_mask(VIRTIO_F_VERSION_1))
    assert h.dev.driver_features == DEFAULT_OFFERED_FEATURES
    assert h.dev.counters["features_write_after_features_ok"] == 1


def test_driver_ok_without_features_ok_needs_reset():
    h = Harness()
    h.dev.write_status(ACK)
    h.dev.write_status(ACK | DRV)
    h.dev.write_driver_features(DEFAULT_OFFERED_FEATURES)
    eff = h.dev.write_status(ACK | DRV | DOK)
    assert h.dev.status & NEEDS_RESET
    assert any(isinstance(e, NeedsReset) for e in eff)
    # DRIVER_OK is set (the driver wrote it), so the change is notified (protocol.md 2.2).
    assert ConfigChanged() in eff
    assert h.dev.counters["status_bad_sequence"] == 1


def test_status_clearing_bits_needs_reset_and_zero_resets():
    h = live()
    h.dev.write_status(ACK | DRV)
    assert h.dev.status & NEEDS_RESET
    h.dev.write_status(0)
    assert h.dev.status == 0
    assert not any(h.dev.queue_enabled(i) for i in range(h.dev.num_queues))


def test_driver_cannot_set_needs_reset():
    h = Harness()
    h.dev.write_status(ACK | NEEDS_RESET)
    assert h.dev.status == ACK
    assert h.dev.counters["status_write_needs_reset_bit"] == 1


# -- config space -------------------------------------------------------------------------------
def test_config_writes():
    h = live()
    d = h.dev
    eff = d.write_config(CFG_ACTUAL, struct.pack("<I", 77))
    assert eff == [ActualChanged(77)] and d.actual == 77
    assert d.write_config(CFG_ACTUAL, struct.pack("<I", 77)) == []
    gen = d.config_generation
    d.write_config(CFG_NUM_PAGES, struct.pack("<I", 5))
    d.write_config(CFG_FREE_PAGE_HINT_CMD_ID, struct.pack("<I", 5))
    assert d.num_pages == 0 and h.read_cmd_id() == 0
    assert d.counters["config_write_readonly"] == 2
    d.write_config(14, b"\x00" * 6)  # 2 bytes of poison_val, 4 past the end
    assert d.counters["config_write_out_of_range"] == 1
    assert d.config_generation == gen  # driver writes are not device-side changes


def test_config_write_before_features_ok_ignored():
    h = Harness()
    h.dev.write_status(ACK | DRV)
    assert h.dev.write_config(CFG_ACTUAL, struct.pack("<I", 3)) == []
    assert h.dev.actual == 0
    assert h.dev.counters["config_write_before_features_ok"] == 1


def test_poison_val_before_and_after_driver_ok():
    h = Harness()
    h.init(poison=0xAAAAAAAA, driver_ok=False)
    assert h.dev.read_config(CFG_POISON_VAL, 4) == b"\xaa" * 4
    h.dev.write_status(ACK | DRV | FOK | DOK)
    h.dev.write_config(CFG_POISON_VAL, struct.pack("<I", 0))
    assert h.dev.poison_val == 0xAAAAAAAA
    assert h.dev.dr_violations == {"DR-12": 1}


def test_poison_val_not_written_is_dr12():
    h = Harness()
    h.init(poison=None)
    assert h.dev.dr_violations == {"DR-12": 1}


def test_poison_val_ignored_without_page_poison():
    h = Harness()
    h.init(DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_PAGE_POISON), poison=None,
           driver_ok=False)
    h.dev.write_config(CFG_POISON_VAL, b"\x01\x02\x03\x04")
    assert h.dev.poison_val == 0
    assert h.dev.counters["config_write_poison_not_negotiated"] == 1


def test_set_target_bumps_generation_and_notifies_only_after_driver_ok():
    h = Harness()
    h.negotiate()
    gen = h.dev.config_generation
    assert h.dev.set_target(10) == []
    assert h.dev.config_generation == gen + 1
    assert h.dev.read_config(CFG_NUM_PAGES, 4) == struct.pack("<I", 10)
    h.setup_queues()
    h.dev.write_status(ACK | DRV | FOK | DOK)
    assert h.dev.set_target(20) == [ConfigChanged()]
    assert h.dev.set_target(20) == []
    assert h.dev.config_generation == gen + 2
    with pytest.raises(ValueError, match="num_pages"):
        h.dev.set_target(1 << 32)


# -- queues -------------------------------------------------------------------------------------
def test_queue_setup_errors_are_counted():
    h = Harness()
    h.negotiate()
    d = h.dev
    d.set_queue(9, 128, 0x100000, 0x101000, 0x102000)
    d.set_queue(0, 100, 0x100000, 0x101000, 0x102000)
    d.set_queue(1, 128, 0x100008, 0x101000, 0x102000)
    assert d.enable_queue(0) == [] and not d.queue_enabled(0)
    c = d.counters
    assert c["queue_bad_index"] == 1 and c["queue_bad_size"] == 1 and c["queue_misaligned"] == 1
    assert c["queue_enable_unconfigured"] == 1


def test_notify_on_unknown_or_disabled_queue():
    h = Harness()
    assert h.dev.notify(7) == [] and h.dev.notify(0) == []
    assert h.dev.counters["queue_bad_index"] == 1
    assert h.dev.counters["notify_queue_not_enabled"] == 1


def test_ring_broken_sets_needs_reset_and_then_ignores_kicks():
    h = live()
    ring = h.rings[Q.INFLATE]
    ring.set_avail_idx(ring.size + 1)  # V-1: more pending than the queue holds
    eff = h.kick(Q.INFLATE)
    assert h.dev.status & NEEDS_RESET
    assert any(isinstance(e, NeedsReset) for e in eff) and ConfigChanged() in eff
    assert h.kick(Q.INFLATE) == []
    assert h.dev.counters["notify_while_needs_reset"] == 1
    assert h.dev.counters["inflate.avail_idx_jump"] == 1
    h.dev.reset()
    assert h.dev.counters["inflate.avail_idx_jump"] == 1  # kept across reset


# -- inflate / deflate --------------------------------------------------------------------------
def test_inflate_deflate_roundtrip():
    h = live()
    h.post_out(Q.INFLATE, pfn_bytes(1, 2, 3))
    h.post_out(Q.INFLATE, pfn_bytes(4))
    eff = h.kick(Q.INFLATE)
    assert eff == [Inflated((1, 2, 3, 4)), NotifyQueue(0)]
    assert [n for _, n in h.used(Q.INFLATE)] == [0, 0]
    eff = h.kick(Q.INFLATE)
    assert eff == []  # nothing new
    h.post_out(Q.DEFLATE, pfn_bytes(2, 3, 99))
    eff = h.kick(Q.DEFLATE)
    assert eff == [Deflated((2, 3)), NotifyQueue(1)]
    assert h.dev.dr_violations == {"DR-6": 1}


def test_inflate_odd_length_and_non_ram():
    h = live(ram_pages=100)
    h.post_out(Q.INFLATE, pfn_bytes(1, 500) + b"\x07\x00")
    eff = h.kick(Q.INFLATE)
    assert eff[0] == Inflated((1,))
    assert h.dev.counters["inflate_len_not_multiple_of_4"] == 1
    assert h.dev.counters["inflate_pfn_not_ram"] == 1


def test_bitmap_tracking_with_ram_pages():
    h = live(ram_pages=64)
    h.post_out(Q.INFLATE, pfn_bytes(8, 9, 10, 63))
    h.kick(Q.INFLATE)
    h.post_out(Q.DEFLATE, pfn_bytes(9, 63, 11))
    assert h.kick(Q.DEFLATE)[0] == Deflated((9, 63))
    h.post_out(Q.DEFLATE, pfn_bytes(9))
    h.kick(Q.DEFLATE)
    assert h.dev.dr_violations["DR-6"] == 2


def test_malformed_chain_used_with_len_zero():
    h = live()
    ring = h.rings[Q.INFLATE]
    ring.set_desc(0, 0x7000000_0000, 8)  # outside guest memory (V-8)
    ring.publish(0)
    eff = h.kick(Q.INFLATE)
    assert eff == [NotifyQueue(0)]
    assert h.used(Q.INFLATE) == [(0, 0)]
    assert h.dev.counters["malformed_chain"] == 1


# -- statistics ---------------------------------------------------------------------------------
def test_stats_buffer_kept_until_requested():
    h = live()
    h.post_out(Q.STATS, stats_bytes((4, 1000), (5, 2000)))
    eff = h.kick(Q.STATS)
    assert eff == [StatsReceived({"MEMFREE": 1000, "MEMTOT": 2000})]
    assert h.used(Q.STATS) == []
    assert h.dev.request_stats() == [NotifyQueue(2)]
    assert h.used(Q.STATS) == [(0, 0)]
    assert h.dev.request_stats() == []


def test_second_stats_buffer_returns_old_one():
    h = live()
    first = h.post_out(Q.STATS, stats_bytes((4, 1)))
    h.kick(Q.STATS)
    h.post_out(Q.STATS, stats_bytes((4, 2)))
    eff = h.kick(Q.STATS)
    assert eff == [StatsReceived({"MEMFREE": 2}), NotifyQueue(2)]
    assert h.used(Q.STATS) == [(first, 0)]
    assert h.dev.dr_violations == {"DR-8": 1}


def test_stats_tag_set_change_and_duplicates_are_dr8():
    h = live()
    h.post_out(Q.STATS, stats_bytes((4, 1), (4, 2)))
    h.kick(Q.STATS)
    h.dev.request_stats()
    h.post_out(Q.STATS, stats_bytes((5, 1)))
    h.kick(Q.STATS)
    assert h.dev.dr_violations == {"DR-8": 2}


# -- reporting ----------------------------------------------------------------------------------
def test_reporting_chain():
    h = live()
    h.post_in(Q.REPORTING, [(0x800000, 0x200000), (0xA00000, 0x200000)])
    eff = h.kick(Q.REPORTING)
    assert eff == [PagesReported(((0x800000, 0x200000), (0xA00000, 0x200000))),
                   NotifyQueue(h.tq(Q.REPORTING))]


# -- free page hinting --------------------------------------------------------------------------
def test_hint_round():
    h = live()
    fq = h.tq(Q.FREE_PAGE)
    eff = h.dev.free_page_start()
    assert eff == [ConfigChanged()]
    cid = h.read_cmd_id()
    assert cid == 0x80000001 and h.dev.hint.status == REQUESTED
    h.post_in(Q.FREE_PAGE, [(0x400000, 0x400000)])  # before the start: not a hint
    h.post_out(Q.FREE_PAGE, cmd(cid))
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x400000)])
    h.post_in(Q.FREE_PAGE, [(0xC00000, 0x400000)])
    eff = h.kick(Q.FREE_PAGE)
    assert eff == [PagesHinted.from_ranges(cid, ((0x800000, 0x400000), (0xC00000, 0x400000))),
                   NotifyQueue(fq)]
    assert h.read_cmd_id() == cid  # still the id while START
    gen = h.dev.config_generation
    h.post_out(Q.FREE_PAGE, cmd(0))
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x400000)])  # after the driver's STOP: DR-10
    eff = h.kick(Q.FREE_PAGE)
    assert eff == [HintRoundStopped(cid), NotifyQueue(fq)]
    assert h.dev.hint.status == STOP and h.read_cmd_id() == 0
    assert h.dev.config_generation == gen + 1
    assert h.dev.dr_violations == {"DR-10": 2}
    assert all(n == 0 for _, n in h.used(Q.FREE_PAGE))


def test_host_stop_races_with_hints_not_a_violation():
    h = live()
    cid = h.open_hint_round()
    assert h.dev.free_page_stop() == [HintRoundStopped(cid), ConfigChanged()]
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x400000)])
    h.post_out(Q.FREE_PAGE, cmd(0))
    eff = h.kick(Q.FREE_PAGE)
    assert not any(isinstance(e, PagesHinted) for e in eff)
    assert h.dev.dr_violations == {}
    assert h.dev.counters["hint_outside_round"] == 1


def test_bad_cmd_length_is_dr9_and_changes_nothing():
    h = live()
    h.dev.free_page_start()
    cid = h.read_cmd_id()
    h.post_out(Q.FREE_PAGE, cmd(cid) + b"\x00\x00\x00\x00")
    h.kick(Q.FREE_PAGE)
    assert h.dev.hint.status == REQUESTED
    assert h.dev.dr_violations == {"DR-9": 1}


def test_second_start_is_dr9_and_ends_round():
    h = live()
    cid = h.open_hint_round()
    h.post_out(Q.FREE_PAGE, cmd(cid))
    eff = h.kick(Q.FREE_PAGE)
    assert HintRoundStopped(cid) in eff and h.dev.hint.status == STOP
    assert h.dev.dr_violations == {"DR-9": 1}


def test_stale_start_ignored():
    h = live()
    h.dev.free_page_start()
    old = h.read_cmd_id()
    h.dev.free_page_start()
    h.post_out(Q.FREE_PAGE, cmd(old))
    h.kick(Q.FREE_PAGE)
    assert h.dev.hint.status == REQUESTED
    assert h.dev.counters["free_page_cmd_stale"] == 1


def test_host_start_supersedes_round():
    h = live()
    cid = h.open_hint_round()
    eff = h.dev.free_page_start()
    assert eff == [HintRoundStopped(cid), ConfigChanged()]
    assert h.read_cmd_id() == cid + 1


def test_qemu_cmd_id_read():
    h = live(qemu_cmd_id_read=True)
    h.open_hint_round()
    assert h.read_cmd_id() == 0


def test_precopy_notifier():
    h = live()
    d = h.dev
    assert d.precopy_notify(PrecopyEvent.SETUP, True) == []
    d.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, True)
    assert d.hint.status == REQUESTED
    d.precopy_notify(PrecopyEvent.BEFORE_BITMAP_SYNC, True)
    assert d.hint.status == STOP
    d.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, False)
    assert d.hint.status == DONE and h.read_cmd_id() == 1
    d.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, True)
    assert d.precopy_notify(PrecopyEvent.COMPLETE, True) == []
    d.precopy_notify(PrecopyEvent.CLEANUP, True)
    assert d.hint.status == DONE


def test_hinting_not_negotiated_or_not_offered():
    h = Harness()
    h.init(DEFAULT_OFFERED_FEATURES & ~feature_mask(VIRTIO_BALLOON_F_FREE_PAGE_HINT,
                                                    VIRTIO_BALLOON_F_PAGE_POISON))
    assert h.dev.free_page_start() == []
    assert h.dev.precopy_notify(PrecopyEvent.AFTER_BITMAP_SYNC, True) == []
    dev = BalloonDevice(GuestMemory(), DeviceConfig(offered_features=feature_mask(
        VIRTIO_F_VERSION_1)))
    with pytest.raises(ValueError, match="FREE_PAGE_HINT"):
        dev.free_page_start()


def test_hint_ranges_beyond_ram_dropped():
    h = live(ram_pages=4096)  # 16 MiB
    cid = h.open_hint_round()
    h.post_in(Q.FREE_PAGE, [(0x800000, 0x400000)])
    h.post_chain(Q.FREE_PAGE, [(0xC00000, 0x400000, True)])
    eff = h.kick(Q.FREE_PAGE)
    assert eff[0] == PagesHinted.from_ranges(cid, ((0x800000, 0x400000), (0xC00000, 0x400000)))


# -- reset --------------------------------------------------------------------------------------
def test_reset_returns_to_power_on_but_keeps_target_and_counter():
    h = live()
    d = h.dev
    d.set_target(50)
    d.write_config(CFG_ACTUAL, struct.pack("<I", 5))
    cid = h.open_hint_round()
    h.post_out(Q.STATS, stats_bytes((4, 1)))
    h.kick(Q.STATS)
    gen = d.config_generation
    eff = d.reset()
    assert eff == [HintRoundStopped(cid), ActualChanged(0)]
    assert d.status == 0 and d.driver_features == 0 and d.actual == 0 and d.poison_val == 0
    assert d.num_pages == 50 and d.config_generation > gen
    assert not any(d.queue_enabled(i) for i in range(d.num_queues))
    assert d.request_stats() == []
    h.init()
    d.free_page_start()
    assert h.read_cmd_id() == cid + 1


def test_reporting_before_driver_ok_is_dr13():
    h = Harness(DeviceConfig(offered_features=ALL))
    h.init(NO_EVENT_IDX, driver_ok=False)
    h.post_in(Q.REPORTING, [(0x800000, 0x200000)])
    assert h.kick(Q.REPORTING) == []
    assert h.dev.dr_violations == {"DR-13": 1}


def test_kicks_before_driver_ok_deferred():
    h = Harness(DeviceConfig(offered_features=ALL))
    h.init(NO_EVENT_IDX, driver_ok=False)
    h.post_out(Q.INFLATE, pfn_bytes(1))
    assert h.kick(Q.INFLATE) == []
    assert h.used(Q.INFLATE) == []
    eff = h.dev.write_status(ACK | DRV | FOK | DOK)
    assert eff == [Inflated((1,)), NotifyQueue(0)]
