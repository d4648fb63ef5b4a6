"""Driver conformance, negotiation and poison: DR-1, DR-2, DR-12 (protocol.md 4.6).

Our guest driver against the device core, judged by the harness (driver_harness.py): the
features the device saw accepted, the config writes it saw and when, and what the guest's
pages hold when it takes them back."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import Inflated
from guestmem.pages import POISON, ZERO
from protocol.balloon import (
    CFG_POISON_VAL,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from tests.conformance.driver_harness import (
    ALL_FEATURES,
    DriverVM,
    cfg_writes,
    had_driver_ok,
    without,
)

#: Linux's PAGE_POISON byte, four times: what a poisoning guest fills freed pages with.
POISON_PATTERN = 0xAAAAAAAA


@pytest.mark.spec("DR-1")
@pytest.mark.parametrize("poisoning", [False, True])
def test_must_tell_host_accepted_when_offered(poisoning: bool) -> None:
    """the driver accepts MUST_TELL_HOST whenever the device offers it"""
    vm = DriverVM(ALL_FEATURES, page_poisoning=poisoning)
    assert vm.driver_ok
    assert vm.negotiated(VIRTIO_BALLOON_F_MUST_TELL_HOST)
    assert "DR-1" not in vm.dev.dr_violations


@pytest.mark.spec("DR-2")
@pytest.mark.parametrize("offered", [ALL_FEATURES, without(ALL_FEATURES,
                                                           VIRTIO_BALLOON_F_REPORTING)],
                         ids=["all", "no-reporting"])
def test_page_poison_declined_by_a_guest_that_does_not_poison(offered: int) -> None:
    """a guest that neither poisons nor zeroes freed pages declines PAGE_POISON and writes no
    poison_val"""
    vm = DriverVM(offered)
    assert vm.driver_ok
    assert not vm.negotiated(VIRTIO_BALLOON_F_PAGE_POISON)
    assert cfg_writes(vm, CFG_POISON_VAL) == []


@pytest.mark.spec("DR-2")
@pytest.mark.parametrize("poisoning,init_on_free", [(True, False), (False, True)],
                         ids=["poisoning", "init_on_free"])
def test_page_poison_taken_only_by_a_guest_that_fills_freed_pages(poisoning: bool,
                                                                  init_on_free: bool) -> None:
    """a guest that poisons or zeroes freed pages accepts PAGE_POISON"""
    vm = DriverVM(ALL_FEATURES, page_poisoning=poisoning, init_on_free=init_on_free)
    assert vm.negotiated(VIRTIO_BALLOON_F_PAGE_POISON)
    assert vm.negotiated(VIRTIO_BALLOON_F_REPORTING)


@pytest.mark.spec("DR-2")
def test_poisoning_guest_refuses_reporting_without_page_poison() -> None:
    """a poisoning guest (free pages must keep the pattern) does not take REPORTING without
    PAGE_POISON, and reports nothing"""
    vm = DriverVM(without(ALL_FEATURES, VIRTIO_BALLOON_F_PAGE_POISON), page_poisoning=True)
    assert vm.driver_ok
    assert not vm.negotiated(VIRTIO_BALLOON_F_REPORTING)
    vm.run(5.0)  # two reporting intervals
    assert vm.posted(BalloonQueue.REPORTING) == []


@pytest.mark.spec("DR-12")
@pytest.mark.parametrize("poisoning,init_on_free,value", [
    (True, False, POISON_PATTERN), (False, True, 0), (True, True, POISON_PATTERN)],
    ids=["poisoning", "init_on_free", "both"])
def test_poison_val_written_before_driver_ok_and_never_changed(poisoning: bool,
                                                               init_on_free: bool,
                                                               value: int) -> None:
    """poison_val is written (the guest's fill value) before DRIVER_OK and never again, through
    inflate, deflate, hint rounds and reports"""
    vm = DriverVM(ALL_FEATURES, strategy="capture", page_poisoning=poisoning,
                  init_on_free=init_on_free)
    vm.host(vm.dev.set_target, 3000)
    vm.run(2.5)  # the first reporting pass runs 2 s after probe
    vm.host(vm.dev.free_page_start)
    vm.run(0.5)
    vm.host(vm.dev.free_page_done)
    vm.host(vm.dev.set_target, 0)
    vm.run(3.0)
    assert vm.dev.actual == 0 and vm.drv.counters["reports"] > 0  # the activity happened
    writes = cfg_writes(vm, CFG_POISON_VAL)
    assert writes, "PAGE_POISON negotiated but poison_val never written"
    assert all(not had_driver_ok(w.status) for w in writes), \
        [(hex(w.status), w.data.hex()) for w in writes]
    assert {int.from_bytes(w.data, "little") for w in writes} == {value}
    assert vm.dev.poison_val == value
    assert "DR-12" not in vm.dev.dr_violations


@pytest.mark.spec("DR-12")
@pytest.mark.parametrize("poisoning,init_on_free,fill", [(True, False, POISON),
                                                          (False, True, ZERO)],
                         ids=["poisoning", "init_on_free"])
def test_deflated_pages_are_refilled_with_poison_val(poisoning: bool, init_on_free: bool,
                                                     fill: int) -> None:
    """pages taken back from the balloon hold poison_val again before the guest may use them,
    even though the host changed them while they were in the balloon"""
    vm = DriverVM(without(ALL_FEATURES, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
                  page_poisoning=poisoning, init_on_free=init_on_free)
    # The host may change inflated pages (D-3): it scribbles data over each one it is told of.
    scribble = np.uint32(0x7777)
    vm.t.add_host_listener(lambda e: vm.pages.version.__setitem__(
        np.asarray(e.pfns, np.int64), scribble) if isinstance(e, Inflated) else None)
    vm.host(vm.dev.set_target, 2000)
    vm.run(1.0)
    inflated = np.array(sorted({p for e in vm.effects(Inflated) for p in e.pfns}))
    assert inflated.size == 2000 and (vm.pages.version[inflated] == scribble).all()
    vm.host(vm.dev.set_target, 0)
    vm.run(1.0)
    assert vm.dev.actual == 0
    assert vm.guest_uses(inflated).all()  # back with the guest
    assert (vm.pages.version[inflated] == fill).all(), \
        np.unique(vm.pages.version[inflated], return_counts=True)
