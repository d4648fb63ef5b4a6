"""Device conformance, balloon queues: D-3, D-4, D-6, D-14, D-15 (protocol.md 4.6)."""
from __future__ import annotations

import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, DeviceConfig
from balloon_dev.effects import Deflated, Inflated, PagesReported, StatsReceived
from protocol.balloon import (
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from protocol.virtio import feature_mask
from tests.balloon_dev.devharness import Harness, pfn_bytes, stats_bytes

Q = BalloonQueue
ALL = DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_REPORTING,
                                              VIRTIO_BALLOON_F_MUST_TELL_HOST)


class SinkRecorder:
    """A host sink that notes, for each effect, whether the guest could already see the buffer
    used (the used index of its queue had moved)."""

    def __init__(self, h: Harness, q: BalloonQueue) -> None:
        self.h, self.q = h, q
        self.seen: list[tuple[object, int]] = []
        h.dev.host_sink = self

    def __call__(self, effects) -> None:
        for e in effects:
            self.seen.append((e, self.h.rings[self.q].used_idx()))


def live(**kw) -> Harness:
    h = Harness(DeviceConfig(offered_features=ALL, **kw))
    h.init()
    return h


@pytest.mark.spec("D-3")
def test_inflated_pages_reach_host_before_buffer_is_used():
    """the host learns inflated pfns before the inflate buffer is used"""
    h = live()
    rec = SinkRecorder(h, Q.INFLATE)
    h.post_out(Q.INFLATE, pfn_bytes(10, 11, 12))
    h.kick(Q.INFLATE)
    assert rec.seen == [(Inflated((10, 11, 12)), 0)]
    assert h.rings[Q.INFLATE].used_idx() == 1


@pytest.mark.spec("D-4")
def test_deflate_acknowledged_only_after_host_saw_it():
    """with MUST_TELL_HOST the deflate is acknowledged (buffer used) after the host saw it"""
    h = live()
    assert h.dev.driver_features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    h.post_out(Q.INFLATE, pfn_bytes(20, 21))
    h.kick(Q.INFLATE)
    rec = SinkRecorder(h, Q.DEFLATE)
    h.post_out(Q.DEFLATE, pfn_bytes(21))
    h.kick(Q.DEFLATE)
    assert rec.seen == [(Deflated((21,)), 0)]
    assert h.used(Q.DEFLATE) == [(0, 0)]  # the acknowledgement


@pytest.mark.spec("D-6")
def test_stats_unknown_tags_ignored_any_order():
    """unknown stats tags are ignored; entries may come in any order"""
    h = live()
    h.post_out(Q.STATS, stats_bytes((7, 70), (200, 1), (4, 40), (15, 150), (0, 5)))
    eff = h.kick(Q.STATS)
    assert eff == [StatsReceived({"CACHES": 70, "MEMFREE": 40, "DIRECT_RECLAIM": 150,
                                  "SWAP_IN": 5})]
    assert h.dev.dr_violations == {}
    h.dev.request_stats()
    h.post_out(Q.STATS, stats_bytes((0, 6), (15, 151), (4, 41), (200, 2), (7, 71)))
    eff = h.kick(Q.STATS)
    assert eff == [StatsReceived({"CACHES": 71, "MEMFREE": 41, "DIRECT_RECLAIM": 151,
                                  "SWAP_IN": 6})]
    assert h.dev.dr_violations == {}  # same tag set, other order: fine


@pytest.mark.spec("D-14")
def test_poison_val_is_only_a_hint():
    """poison_val changes nothing the device does to guest memory or to reports"""
    results = []
    for poison in (0, 0xAAAAAAAA):
        h = Harness(DeviceConfig(offered_features=ALL))
        h.init(poison=poison)
        assert h.dev.read_config(CFG_POISON_VAL, 4) == poison.to_bytes(4, "little")
        before = bytes(h.ram[0x600000:0xA00000])
        h.post_in(Q.REPORTING, [(0x600000, 0x200000), (0x800000, 0x200000)])
        results.append(h.kick(Q.REPORTING))
        assert bytes(h.ram[0x600000:0xA00000]) == before  # never fills pages with it
    assert results[0] == results[1]


@pytest.mark.spec("D-15")
def test_reported_pages_reach_host_before_use_and_are_not_written():
    """reported ranges reach the host before the buffer is used; the device writes none of them"""
    h = live()
    rec = SinkRecorder(h, Q.REPORTING)
    h.ram[0x600000:0x600010] = b"\x5a" * 16
    ranges = [(0x600000, 0x200000), (0xA00000, 0x200000)]
    h.post_in(Q.REPORTING, ranges)
    h.kick(Q.REPORTING)
    assert rec.seen == [(PagesReported(tuple(ranges)), 0)]
    assert h.rings[Q.REPORTING].used_idx() == 1
    assert h.ram[0x600000:0x600010] == b"\x5a" * 16
