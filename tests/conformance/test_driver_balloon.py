"""Driver conformance, inflate and deflate: DR-3 .. DR-7 (protocol.md 4.6).

Our guest driver against the device core (driver_harness.py). Page use is judged from the
guest allocator's page states and the page versions: a page in the balloon is ``PG_BALLOON``
(neither allocated to the guest nor free for it), and any write to it changes its version.
Kicks of the inflate or deflate queue are held back to play a device slow to acknowledge.

The "may" parts are not checked (DR-3: may deflate below / inflate above the target; DR-4 with
DEFLATE_ON_OOM: may use balloon pages); DR-7's legacy part (one 4-byte write) applies to the
legacy interface, which neither side implements: modern writes are checked to be 4 bytes too.
"""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import Deflated, Inflated
from protocol.balloon import (
    CFG_ACTUAL,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    BalloonQueue,
)
from tests.conformance.driver_harness import (
    ALL_FEATURES,
    DriverVM,
    cfg_writes,
    had_driver_ok,
    without,
)

Q = BalloonQueue
#: Balloon checks need no hinting; without it the only PG_BALLOON pages are balloon pages.
BALLOON = without(ALL_FEATURES, VIRTIO_BALLOON_F_FREE_PAGE_HINT)


def inflated_pfns(vm: DriverVM) -> np.ndarray:
    return np.array(sorted({p for e in vm.effects(Inflated) for p in e.pfns}), dtype=np.int64)


def deflated_pfns(vm: DriverVM) -> np.ndarray:
    return np.array(sorted({p for e in vm.effects(Deflated) for p in e.pfns}), dtype=np.int64)


def pressure(vm: DriverVM, extra: int = 4096) -> np.ndarray:
    """The guest asks for more memory than is free and writes every page it gets."""
    got = vm.alloc.alloc_pages_bulk(vm.alloc.nr_free_pages() + extra)
    vm.pages.write_pfns(got)
    return np.asarray(got, dtype=np.int64)


# -- DR-3 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-3")
def test_inflates_until_actual_reaches_the_target() -> None:
    """while num_pages > actual the driver inflates, until actual reaches num_pages"""
    vm = DriverVM(BALLOON)
    vm.host(vm.dev.set_target, 3000)
    vm.run(1.0)
    pfns = vm.pfns_of(Q.INFLATE)
    assert pfns.size == 3000 and np.unique(pfns).size == 3000
    assert vm.dev.actual == 3000
    assert vm.posted(Q.DEFLATE) == []
    assert (vm.balloon_pages() == np.sort(pfns)).all()


@pytest.mark.spec("DR-3")
def test_keeps_inflating_when_memory_comes_back() -> None:
    """a guest short of memory inflates what it can and keeps trying until the target is met"""
    vm = DriverVM(BALLOON)
    held = pressure(vm, extra=0)  # the guest holds (nearly) everything
    vm.host(vm.dev.set_target, 3000)
    vm.run(1.0)
    short = vm.dev.actual
    assert short < 3000
    vm.alloc.free_pages_bulk(held[:8192])
    vm.run(1.0)
    assert vm.dev.actual == 3000
    assert vm.posted(Q.DEFLATE) == []


@pytest.mark.spec("DR-3")
def test_inflates_again_after_an_oom_deflate_when_the_host_asks() -> None:
    """after an OOM deflate (which may leave actual below num_pages: Linux does not refill a
    balloon it just gave back for stability) the next target is inflated to again"""
    vm = DriverVM(BALLOON)
    vm.host(vm.dev.set_target, 2000)
    vm.run(1.0)
    got = pressure(vm)
    vm.run(1.0)
    assert vm.dev.actual < 2000
    vm.alloc.free_pages_bulk(got)
    vm.host(vm.dev.set_target, 2100)
    vm.run(1.0)
    assert vm.dev.actual == 2100 == vm.balloon_pages().size


# -- DR-4 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-4")
@pytest.mark.parametrize("must_tell", [True, False])
def test_balloon_pages_never_used_without_deflate_on_oom(must_tell: bool) -> None:
    """without DEFLATE_ON_OOM, memory pressure never gets the guest a balloon page: they stay in
    the balloon, unwritten, and actual does not move"""
    offered = without(BALLOON, VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    if not must_tell:
        offered = without(offered, VIRTIO_BALLOON_F_MUST_TELL_HOST)
    vm = DriverVM(offered)
    assert not vm.negotiated(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    vm.host(vm.dev.set_target, 4000)
    vm.run(1.0)
    balloon = inflated_pfns(vm)
    assert balloon.size == 4000
    versions = vm.pages.version[balloon].copy()
    got = pressure(vm)
    singles = []  # single allocations too (they try harder than bulk ones), until they fail
    for _ in range(4096):
        pfn = vm.alloc.alloc_pages(0)
        if pfn is None:
            break
        singles.append(pfn)
    assert pfn is None
    got = np.concatenate([got, np.array(singles, dtype=np.int64)])
    vm.run(1.0)
    assert np.intersect1d(got, balloon).size == 0
    assert (vm.balloon_pages() == balloon).all()
    assert (vm.pages.version[balloon] == versions).all()
    assert vm.dev.actual == 4000 and vm.posted(Q.DEFLATE) == []


# -- DR-5 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-5")
def test_deflated_pages_wait_for_the_acknowledgement() -> None:
    """with MUST_TELL_HOST, pages posted on deflateq stay out of the guest's hands (not free,
    not written) until the device used the buffer; then they are the guest's"""
    vm = DriverVM(BALLOON)
    assert vm.negotiated(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    vm.host(vm.dev.set_target, 1000)
    vm.run(1.0)
    vm.stall(Q.DEFLATE)
    vm.host(vm.dev.set_target, 0)
    vm.run(1.0)
    told = vm.pfns_of(Q.DEFLATE)
    assert told.size > 0
    versions = vm.pages.version[told].copy()
    got = pressure(vm)
    vm.run(0.5)
    assert not vm.guest_uses(told).any() and np.intersect1d(got, told).size == 0
    assert (vm.pages.version[told] == versions).all()
    vm.alloc.free_pages_bulk(got)
    vm.release(Q.DEFLATE)
    vm.run(1.0)
    assert vm.dev.actual == 0
    assert (deflated_pfns(vm) == inflated_pfns(vm)).all()
    assert vm.guest_uses(inflated_pfns(vm)).all()


@pytest.mark.spec("DR-5")
def test_oom_deflate_waits_for_the_acknowledgement() -> None:
    """with MUST_TELL_HOST and DEFLATE_ON_OOM, an OOM deflate tells the device first and hands
    no page to the guest before the device used the buffer"""
    vm = DriverVM(BALLOON)
    assert vm.negotiated(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    vm.host(vm.dev.set_target, 1000)
    vm.run(1.0)
    balloon = inflated_pfns(vm)
    vm.stall(Q.DEFLATE)
    got = pressure(vm)
    told = vm.pfns_of(Q.DEFLATE)
    assert told.size > 0, "the OOM notifier did not deflate"
    assert np.intersect1d(got, balloon).size == 0
    assert not vm.guest_uses(balloon).any()
    vm.alloc.free_pages_bulk(got)
    vm.release(Q.DEFLATE)
    vm.run(1.0)
    assert vm.guest_uses(told).all()
    assert set(told.tolist()) <= set(deflated_pfns(vm).tolist())


@pytest.mark.spec("DR-5")
def test_pages_taken_back_on_oom_are_reported_on_deflateq() -> None:
    """without MUST_TELL_HOST an OOM deflate may free pages at once, but every page that left
    the balloon is reported on deflateq"""
    vm = DriverVM(without(BALLOON, VIRTIO_BALLOON_F_MUST_TELL_HOST))
    vm.host(vm.dev.set_target, 1500)
    vm.run(1.0)
    balloon = inflated_pfns(vm)
    vm.stall(Q.DEFLATE)  # a slow device: two OOM rounds before it looks at the queue
    got = pressure(vm)
    got2 = pressure(vm)
    left = np.setdiff1d(balloon, vm.balloon_pages())
    assert left.size >= 512, "two OOM rounds should each take 256 pages"
    vm.alloc.free_pages_bulk(np.concatenate([got, got2]))
    vm.release(Q.DEFLATE)
    vm.run(1.0)
    left = np.setdiff1d(balloon, vm.balloon_pages())
    assert set(left.tolist()) <= set(vm.pfns_of(Q.DEFLATE).tolist())
    assert set(left.tolist()) <= set(deflated_pfns(vm).tolist())
    assert "DR-6" not in vm.dev.dr_violations


# -- DR-6 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-6")
@pytest.mark.parametrize("must_tell", [True, False])
def test_pages_on_inflateq_unused_and_not_deflated_before_the_ack(must_tell: bool) -> None:
    """pages posted on inflateq are not used (not the guest's, not written, not taken on OOM)
    and not deflated until the device used the inflate buffer"""
    offered = BALLOON if must_tell else without(BALLOON, VIRTIO_BALLOON_F_MUST_TELL_HOST)
    vm = DriverVM(offered)
    vm.host(vm.dev.set_target, 512)
    vm.run(1.0)  # acknowledged balloon pages, which an OOM deflate may take
    vm.stall(Q.INFLATE)
    vm.host(vm.dev.set_target, 1024)
    vm.run(0.5)
    pending = vm.pfns_of(Q.INFLATE)[512:]
    assert pending.size > 0
    versions = vm.pages.version[pending].copy()
    got = pressure(vm)
    vm.host(vm.dev.set_target, 0)  # the host changes its mind while the inflate is pending
    vm.run(0.5)
    assert np.intersect1d(got, pending).size == 0
    assert not vm.guest_uses(pending).any()
    assert (vm.pages.version[pending] == versions).all()
    assert np.intersect1d(vm.pfns_of(Q.DEFLATE), pending).size == 0
    vm.alloc.free_pages_bulk(got)
    vm.release(Q.INFLATE)
    vm.run(2.0)
    assert vm.dev.actual == 0
    assert "DR-6" not in vm.dev.dr_violations
    assert set(deflated_pfns(vm).tolist()) <= set(inflated_pfns(vm).tolist())


# -- DR-7 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-7")
def test_actual_follows_every_change() -> None:
    """after each resize (and an OOM deflate) actual is the number of pages in the balloon;
    every write of it is one 4-byte write after DRIVER_OK"""
    vm = DriverVM(BALLOON)
    for target in (700, 300, 1200, 0, 900):
        vm.host(vm.dev.set_target, target)
        vm.run(1.0)
        assert vm.dev.actual == target == vm.balloon_pages().size
    got = pressure(vm)  # DEFLATE_ON_OOM: the balloon shrinks, actual must follow
    vm.run(1.0)
    assert vm.balloon_pages().size < 900
    assert vm.dev.actual == vm.balloon_pages().size
    writes = cfg_writes(vm, CFG_ACTUAL)
    assert writes and all(len(w.data) == 4 and had_driver_ok(w.status) for w in writes)
    assert int.from_bytes(writes[-1].data, "little") == vm.balloon_pages().size
    vm.alloc.free_pages_bulk(got)
