"""guest_model.balloon: inflating, deflating and deflate on OOM, through the real device core."""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.device import DEFAULT_OFFERED_FEATURES
from balloon_dev.effects import Deflated, Inflated
from guest_model.buddy import PG_ALLOC, PG_BALLOON
from protocol.balloon import VIRTIO_BALLOON_F_MUST_TELL_HOST, BalloonQueue
from protocol.virtio import feature_mask
from tests.guest_model.driver_rig import OOM, Rig


@pytest.mark.spec("DR-7")
def test_inflate_then_deflate_updates_actual() -> None:
    r = Rig().probe()
    free0 = r.alloc.nr_free_pages()
    r.host(r.dev.set_target, 1000)
    r.run(0.1)
    assert r.drv.s.num_pages == 1000 == r.dev.actual
    infl = r.of(Inflated)
    assert all(len(e.pfns) <= 256 for e in infl) and sum(len(e.pfns) for e in infl) == 1000
    pfns = np.array([p for e in infl for p in e.pfns])
    assert (r.alloc.state[pfns] == PG_BALLOON).all() and np.unique(pfns).size == 1000
    r.host(r.dev.set_target, 100)
    r.run(0.1)
    assert r.drv.s.num_pages == 100 == r.dev.actual
    defl = np.array([p for e in r.of(Deflated) for p in e.pfns])
    assert defl.size == 900 and np.isin(defl, pfns).all()
    assert r.alloc.state[defl].tolist().count(PG_BALLOON) == 0
    r.host(r.dev.set_target, 0)
    r.run(0.1)
    r.alloc.drain_pcp()
    assert r.alloc.nr_free_pages() == free0
    assert r.dev.dr_violations == {}


@pytest.mark.spec("DR-5")
def test_deflated_pages_wait_for_ack_with_must_tell_host() -> None:
    r = Rig(offered=DEFAULT_OFFERED_FEATURES | feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST))
    r.probe()
    assert r.dev.driver_features >> VIRTIO_BALLOON_F_MUST_TELL_HOST & 1
    r.host(r.dev.set_target, 10)
    r.run(0.01)
    pfns = list(r.drv.s.balloon_pfns)
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)
    r.host(r.dev.set_target, 0)
    r.run(0.01)
    # Posted, not acknowledged: the pages are still the balloon's, actual unchanged.
    assert (r.alloc.state[pfns] == PG_BALLOON).all() and r.dev.actual == 10
    r.t.release(dq)
    r.run(0.01)
    assert not (r.alloc.state[pfns] == PG_BALLOON).any() and r.dev.actual == 0


def test_one_balloon_buffer_in_flight() -> None:
    r = Rig().probe()
    iq = r.drv.qindex[BalloonQueue.INFLATE]
    r.t.stalled.add(iq)
    r.host(r.dev.set_target, 2000)
    r.run(0.5)
    assert r.drv.vqs[BalloonQueue.INFLATE].in_flight == 1
    assert r.drv.counters["balloon_buffers"] == 1
    r.t.release(iq)
    r.run(0.5)
    assert r.dev.actual == 2000 and r.drv.counters["balloon_buffers"] == 8


def test_inflate_out_of_memory_retries_later() -> None:
    r = Rig(ram=16 << 20).probe()
    r.host(r.dev.set_target, (16 << 20) >> 12)  # more than the guest can give
    r.run(1.0)
    assert r.drv.counters["inflate_alloc_failed"] >= 1
    assert 0 < r.dev.actual < (16 << 20) >> 12
    r.alloc.check()


def test_inflated_pages_are_not_guest_in_use() -> None:
    r = Rig().probe()
    r.host(r.dev.set_target, 300)
    r.run(0.01)
    pfns = np.array(r.drv.s.balloon_pfns)
    assert not r.alloc.in_use_mask()[pfns].any()
    assert (r.alloc.state[pfns] != PG_ALLOC).all()


def exhaust(r: Rig) -> list[int]:
    """Take every page a guest can get without reclaim or OOM (noretry)."""
    held = r.alloc.alloc_pages_bulk(1 << 30, noretry=True).tolist()
    while (p := r.alloc.alloc_pages(0, noretry=True)) is not None:
        held.append(p)
    return held


def balloon_of(r: Rig, pages: int) -> set[int]:
    r.host(r.dev.set_target, pages)
    r.run(0.05)
    assert r.drv.s.num_pages == pages == r.dev.actual
    return set(r.drv.s.balloon_pfns)


def told(r: Rig, since: int = 0) -> list[int]:
    return [q for e in r.effects[since:] if isinstance(e, Deflated) for q in e.pfns]


def test_oom_deflates_256_pages_telling_the_host_first() -> None:
    r = Rig(offered=OOM).probe()
    balloon = balloon_of(r, 2048)
    exhaust(r)
    mark = len(r.effects)
    p = r.alloc.alloc_pages(0)  # fails after reclaim: the OOM notifier deflates
    assert p is not None and r.alloc.counters["oom_runs"] == 1
    c = r.drv.counters
    assert c["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 2048 - 256
    # Linux's order even without MUST_TELL_HOST: the device heard of them (it answers inside
    # the kick) before they were freed; actual follows at once.
    gone = told(r, mark)
    assert len(gone) == 256 and set(gone) <= balloon and r.dev.actual == 2048 - 256
    assert set(gone).isdisjoint(r.drv.s.balloon_pfns)
    r.run(0.05)
    # Linux does not re-inflate on its own after an OOM deflate.
    assert r.drv.s.num_pages == 2048 - 256 and r.dev.actual == 2048 - 256
    assert c["deflate_told_late_pages"] == 0 and r.dev.dr_violations == {}
    # A new target is followed again.
    r.host(r.dev.set_target, 1000)
    r.run(0.05)
    assert r.drv.s.num_pages == 1000 == r.dev.actual
    r.alloc.check()


def test_oom_without_must_tell_host_does_not_wait_for_a_slow_device() -> None:
    r = Rig(offered=OOM).probe()
    balloon_of(r, 2048)
    exhaust(r)
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)  # the device has not looked at the deflate buffer yet
    assert r.alloc.alloc_pages(0) is not None
    c = r.drv.counters
    assert c["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 2048 - 256 and not told(r)
    # The buffer in flight names pages that are the guest's already: not held.
    assert sum(n for _, n in r.drv.held_pfn_ranges()) == 2048 - 256
    # Another OOM while that buffer is in flight: freed too, told once the queue is free.
    exhaust(r)
    assert r.alloc.alloc_pages(0) is not None
    assert c["oom_deflated_pages"] == 512 and r.drv.s.num_pages == 2048 - 512
    assert r.dev.actual == 2048 - 512 and c["oom_deflate_blocked"] == 0
    r.t.release(dq)
    r.run(0.05)
    assert len(told(r)) == 512 and c["deflate_told_late_pages"] == 512
    assert r.drv.s.num_pages == 2048 - 512 == r.dev.actual  # and no re-inflation
    assert r.dev.dr_violations == {}
    r.alloc.check()


@pytest.mark.spec("DR-5")
def test_oom_with_must_tell_host_frees_only_acknowledged_pages() -> None:
    r = Rig(offered=OOM | feature_mask(VIRTIO_BALLOON_F_MUST_TELL_HOST)).probe()
    r.host(r.dev.set_target, 1024)
    r.run(0.05)
    exhaust(r)
    # The in-process device uses the deflate buffer inside the kick: like Linux waiting for
    # the ack, the pages are freed within the OOM call, after the host was told.
    n_effects = len(r.effects)
    p = r.alloc.alloc_pages(0)
    assert p is not None and r.drv.counters["oom_deflated_pages"] == 256
    told = [q for e in r.effects[n_effects:] if isinstance(e, Deflated) for q in e.pfns]
    assert len(told) == 256
    # A device that does not answer at once: nothing is freed until it does.
    dq = r.drv.qindex[BalloonQueue.DEFLATE]
    r.t.stalled.add(dq)
    exhaust(r)
    assert r.alloc.alloc_pages(0) is None
    assert r.drv.counters["oom_deflated_pages"] == 256 and r.drv.s.num_pages == 768
    # Further OOM calls wait for that buffer (one in flight) instead of posting another.
    assert r.alloc.alloc_pages(0) is None and r.drv.counters["oom_deflate_blocked"] >= 1
    r.t.release(dq)
    r.run(0.01)
    # The late ack frees them (counted as deflated, not as freed by the OOM call).
    assert r.drv.s.num_pages == 512 and r.drv.counters["deflated_pages"] == 512
    assert r.drv.counters["oom_deflated_pages"] == 256
    assert r.alloc.alloc_pages(0) is not None
    assert r.dev.dr_violations == {}
    r.alloc.check()


def test_no_oom_deflate_without_the_feature() -> None:
    r = Rig().probe()
    r.host(r.dev.set_target, 1024)
    r.run(0.05)
    exhaust(r)
    assert r.alloc.alloc_pages(0) is None
    assert r.drv.s.num_pages == 1024 and r.alloc.oom_notifiers == []


def test_inflating_never_reclaims_or_deflates() -> None:
    r = Rig(offered=OOM).probe()
    r.host(r.dev.free_page_start)
    r.run(0.05)
    held = r.drv.shrink_count()
    assert held > 0
    r.host(r.dev.set_target, 1 << 20)  # far more than the guest has
    r.run(0.5)
    # balloon_page_alloc is __GFP_NORETRY: no shrinker, no OOM notifier.
    assert r.drv.shrink_count() == held and r.alloc.counters["oom_runs"] == 0
    assert r.drv.counters["inflate_alloc_failed"] >= 1
