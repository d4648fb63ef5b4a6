"""Driver conformance, free page reporting: DR-13 (protocol.md 4.6).

Our guest driver against the device core (driver_harness.py). Reporting chains are read from
the ring at each kick; page contents at the moment the device takes a report are read by a
host listener (the device emits ``PagesReported`` before it uses the buffer, D-15). A pass runs
2 s after it is requested (Linux's delay), so the checks run a few simulated seconds.
"""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import PagesReported
from guestmem.pages import POISON
from protocol.balloon import VIRTIO_BALLOON_F_PAGE_POISON, BalloonQueue
from tests.conformance.driver_harness import ALL_FEATURES, RAM, DriverVM, had_driver_ok, without

Q = BalloonQueue
#: Linux's pageblock order on x86-64 (2 MiB): the smallest block it reports.
MIN_REPORT_BYTES = 2 << 20


def reported_pfns(vm: DriverVM) -> np.ndarray:
    parts = [np.arange(a >> 12, (a + n) >> 12) for p in vm.posted(Q.REPORTING) for a, n in p.in_]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


@pytest.mark.spec("DR-13")
def test_reports_start_after_driver_ok_in_large_blocks() -> None:
    """reports are posted only after DRIVER_OK, as chains of writable large blocks (>= 2 MiB,
    aligned to their size, inside RAM)"""
    vm = DriverVM(ALL_FEATURES)
    vm.run(5.0)
    posts = vm.posted(Q.REPORTING)
    assert posts, "no report in 5 s"
    for p in posts:
        assert had_driver_ok(p.status) and not p.out and p.in_ and not p.error
        for a, n in p.in_:
            assert n >= MIN_REPORT_BYTES and n & (n - 1) == 0 and a % n == 0 and a + n <= RAM
    assert "DR-13" not in vm.dev.dr_violations


@pytest.mark.spec("DR-13")
def test_reported_pages_hold_poison_val_with_page_poison() -> None:
    """with PAGE_POISON every reported page holds poison_val when the device takes the report,
    even pages the guest used and freed since boot"""
    vm = DriverVM(ALL_FEATURES, page_poisoning=True)
    assert vm.negotiated(VIRTIO_BALLOON_F_PAGE_POISON)
    seen: list[bool] = []
    vm.t.add_host_listener(lambda e: seen.extend(
        bool((vm.pages.version[a >> 12:(a + n) >> 12] == POISON).all()) for a, n in e.ranges)
        if isinstance(e, PagesReported) else None)
    got = vm.alloc.alloc_pages_bulk(vm.alloc.nr_free_pages() // 2)
    vm.pages.write_pfns(got)  # the guest used half its memory ...
    vm.alloc.free_pages_bulk(got)  # ... and gave it back
    vm.run(5.0)
    assert seen and all(seen)
    assert np.intersect1d(reported_pfns(vm), got).size > 0


@pytest.mark.spec("DR-13")
@pytest.mark.parametrize("poisoning", [False, True])
def test_reported_pages_unused_until_the_device_used_the_buffer(poisoning: bool) -> None:
    """blocks in a report the device has not used are neither handed out nor written, whatever
    the guest asks for; afterwards they are the guest's again"""
    vm = DriverVM(ALL_FEATURES, page_poisoning=poisoning)
    vm.stall(Q.REPORTING)
    vm.run(2.5)
    pending = reported_pfns(vm)
    assert pending.size > 0
    versions = vm.pages.version[pending].copy()
    got = vm.alloc.alloc_pages_bulk(vm.alloc.nr_free_pages() + 4096)
    vm.pages.write_pfns(got)
    vm.run(1.0)
    assert np.intersect1d(got, pending).size == 0
    assert not vm.guest_uses(pending).any()
    assert (vm.pages.version[pending] == versions).all()
    vm.alloc.free_pages_bulk(got)
    vm.release(Q.REPORTING)
    vm.run(0.1)
    assert vm.guest_uses(pending).all()


@pytest.mark.spec("DR-13")
def test_without_page_poison_reported_pages_are_initialised_before_use() -> None:
    """without PAGE_POISON a reported page's content is garbage to the guest: the host may
    change it (here: it scribbles on every report), and each such page the guest allocates is
    initialised first"""
    vm = DriverVM(without(ALL_FEATURES, VIRTIO_BALLOON_F_PAGE_POISON), init_on_alloc=True)
    scribble = np.uint32(0x5A5A)

    def host_scribbles(e: object) -> None:
        if isinstance(e, PagesReported):
            for a, n in e.ranges:
                vm.pages.version[a >> 12:(a + n) >> 12] = scribble

    vm.t.add_host_listener(host_scribbles)
    vm.run(5.0)
    reported = reported_pfns(vm)
    assert reported.size > 0
    got = vm.alloc.alloc_pages_bulk(vm.alloc.nr_free_pages())
    reused = np.intersect1d(got, reported)
    assert reused.size > 0
    assert not (vm.pages.version[reused] == scribble).any()
