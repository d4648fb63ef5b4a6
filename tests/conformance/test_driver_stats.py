"""Driver conformance, statistics: DR-8 (protocol.md 4.6).

Our guest driver against the device core (driver_harness.py); the stats buffers are read from
the ring as the device would read them, at each kick."""
from __future__ import annotations

import struct

import pytest

from balloon_dev.effects import StatsReceived
from protocol.balloon import STAT_ENTRY_SIZE, BalloonQueue, StatTag
from tests.conformance.driver_harness import ALL_FEATURES, DriverVM, Posted, had_driver_ok

Q = BalloonQueue


def entries(p: Posted) -> list[tuple[int, int]]:
    assert not p.in_ and p.out_len == len(p.data) and len(p.data) % STAT_ENTRY_SIZE == 0, p
    return [struct.unpack_from("<HQ", p.data, off) for off in range(0, len(p.data),
                                                                    STAT_ENTRY_SIZE)]


@pytest.mark.spec("DR-8")
def test_one_buffer_after_init_and_one_after_each_use() -> None:
    """a stats buffer is posted at initialisation and a new one after each use, never more than
    one outstanding"""
    vm = DriverVM(ALL_FEATURES)
    first = vm.posted(Q.STATS)
    assert len(first) == 1 and vm.spy(Q.STATS).outstanding() == 1
    for k in range(1, 6):
        vm.host(vm.dev.request_stats)
        vm.run(0.01)
        assert len(vm.effects(StatsReceived)) == 1 + k  # (the device reads the first one too)
        assert len(vm.posted(Q.STATS)) == 1 + k
        assert vm.spy(Q.STATS).outstanding() == 1
    vm.run(1.0)  # nothing more without a request
    assert len(vm.posted(Q.STATS)) == 6
    assert all(p.in_flight == 1 for p in vm.posted(Q.STATS))
    assert all(had_driver_ok(p.status) for p in vm.posted(Q.STATS))  # kicked after DRIVER_OK
    assert "DR-8" not in vm.dev.dr_violations


@pytest.mark.spec("DR-8")
def test_one_entry_per_stat_and_the_same_set_each_time() -> None:
    """each stats buffer has one entry per supported tag, the same tag set every time, with the
    guest's current values"""
    vm = DriverVM(ALL_FEATURES)
    for _ in range(3):
        vm.host(vm.dev.request_stats)
        vm.run(0.01)
        vm.alloc.alloc_pages_bulk(1000)  # values change between buffers, the set does not
    bufs = [entries(p) for p in vm.posted(Q.STATS)]
    assert len(bufs) == 4
    known = {int(t) for t in StatTag}
    sets = []
    for b in bufs:
        tags = [t for t, _ in b]
        assert len(tags) == len(set(tags)), f"duplicate tags {tags}"
        assert set(tags) <= known
        sets.append(frozenset(tags))
    assert len(set(sets)) == 1
    assert {StatTag.MEMFREE, StatTag.MEMTOT} <= sets[0]
    # Filled when posted: the last one before the last 1000-page allocation.
    assert dict(bufs[-1])[StatTag.MEMFREE] == (vm.alloc.nr_free_pages() + 1000) << 12
    assert "DR-8" not in vm.dev.dr_violations
