"""Driver conformance, free page hinting: DR-9, DR-10, DR-11 (protocol.md 4.6).

Our guest driver against the device core (driver_harness.py), in both hint strategies
("capture", Linux >= 4.20, and "walk", the 2017 seed). Everything on free_page_vq is read from
the ring at each kick, with the ``free_page_hint_cmd_id`` the device published at that moment:
readable buffers are control buffers (start ids and STOP), writable ones hints.
"""
from __future__ import annotations

import numpy as np
import pytest

from balloon_dev.effects import PagesHinted, PrecopyEvent
from guestmem.pages import POISON
from protocol.balloon import VIRTIO_BALLOON_CMD_ID_STOP, BalloonQueue
from tests.conformance.driver_harness import ALL_FEATURES, DriverVM, Posted

Q = BalloonQueue
SLOW = {"hint_batch": 1, "hint_cost_per_block": 1e-3}  # ~1 ms per block: rounds take a while


def control_value(p: Posted) -> int:
    return int.from_bytes(p.data[:4], "little")


def rounds(posts: list[Posted]) -> list[tuple[Posted, list[Posted], Posted | None]]:
    """Split free_page_vq traffic into (start, hints, stop or None); hints outside any round
    make the check fail."""
    out: list[tuple[Posted, list[Posted], Posted | None]] = []
    cur: tuple[Posted, list[Posted]] | None = None
    for p in posts:
        assert not p.error, p
        if p.out and p.in_:
            raise AssertionError(f"free_page_vq buffer mixes readable and writable parts: {p}")
        if p.in_:
            assert cur is not None, f"hint outside a round (no start before it, or after STOP): {p}"
            cur[1].append(p)
        elif control_value(p) == VIRTIO_BALLOON_CMD_ID_STOP:
            assert cur is not None, f"STOP with no round running: {p}"
            out.append((cur[0], cur[1], p))
            cur = None
        else:
            if cur is not None:
                raise AssertionError(f"start {control_value(p):#x} before the STOP of round "
                                     f"{control_value(cur[0]):#x}")
            cur = (p, [])
    if cur is not None:
        out.append((cur[0], cur[1], None))
    return out


def migrate(vm: DriverVM, iterations: int, dt: float) -> list[int]:
    """A precopy migration's hint traffic: SETUP, then per iteration STOP-sync-new id, run
    ``dt``; the ids the device published."""
    ids = []
    vm.host(vm.dev.precopy_notify, PrecopyEvent.SETUP, True)
    for _ in range(iterations):
        vm.host(vm.dev.precopy_notify, PrecopyEvent.BEFORE_BITMAP_SYNC, True)
        vm.host(vm.dev.precopy_notify, PrecopyEvent.AFTER_BITMAP_SYNC, True)
        ids.append(vm.dev.hint.cmd_id)
        vm.run(dt)
    return ids


def hinted_mask(vm: DriverVM) -> np.ndarray:
    m = np.zeros(vm.pages.ram_pages, bool)
    for e in vm.effects(PagesHinted):
        for a, n in e.ranges:
            m[a >> 12:(a + n) >> 12] = True
    return m


# -- DR-9 ------------------------------------------------------------------------------------

@pytest.mark.spec("DR-9")
@pytest.mark.parametrize("strategy", ["capture", "walk"])
def test_control_buffers_are_4_bytes_and_one_start_per_id(strategy: str) -> None:
    """every readable free_page_vq buffer is one 4-byte element; each id gets one start, the id
    the device published"""
    vm = DriverVM(ALL_FEATURES, strategy=strategy, driver=SLOW)
    ids = migrate(vm, 5, 0.02)  # 20 ms per iteration: some rounds are cut short by the host
    vm.host(vm.dev.free_page_done)
    vm.run(0.5)
    posts = vm.posted(Q.FREE_PAGE)
    control = [p for p in posts if p.out]
    assert control
    assert all(len(p.out) == 1 and p.out[0][1] == 4 and not p.in_ for p in control), control
    starts = [control_value(p) for p in control if control_value(p) != 0]
    assert len(starts) == len(set(starts)), f"an id started twice: {starts}"
    assert set(starts) <= set(ids) and starts
    assert all(p.cmd_id == control_value(p) for p in control if control_value(p) != 0)
    assert "DR-9" not in vm.dev.dr_violations


# -- DR-10 -----------------------------------------------------------------------------------

@pytest.mark.spec("DR-10")
@pytest.mark.parametrize("strategy", ["capture", "walk"])
def test_hints_free_memory_and_sends_stop_when_out_of_pages(strategy: str) -> None:
    """given an id >= 2 the driver hints (free memory in large blocks) and, out of pages, sends
    STOP on its own"""
    vm = DriverVM(ALL_FEATURES, strategy=strategy)
    big_free = int((vm.alloc.free_counts()[:, 10:].sum(axis=(0, 2))
                    * (1 << np.arange(10, vm.alloc.free_counts().shape[1]))).sum())
    vm.host(vm.dev.free_page_start)
    cid = vm.dev.hint.cmd_id
    vm.run(0.5)
    (start, hints, stop), = rounds(vm.posted(Q.FREE_PAGE))
    assert control_value(start) == cid
    assert stop is not None, "the driver ran out of pages and never sent STOP"
    assert vm.dev.hint.cmd_id == cid  # the host never published STOP: the driver's own
    hinted = sum(n for p in hints for _, n in p.in_) >> 12
    # All of it but what the zone watermarks keep back (capture allocates, as Linux does).
    assert hinted >= 0.95 * big_free, (hinted, big_free)
    assert not (hinted_mask(vm) & vm.guest.in_use_mask()).any()
    assert "DR-10" not in vm.dev.dr_violations


@pytest.mark.spec("DR-10")
@pytest.mark.parametrize("strategy", ["capture", "walk"])
@pytest.mark.parametrize("event", ["stop", "done"])
def test_stops_hinting_on_stop_or_done(strategy: str, event: str) -> None:
    """after the device publishes STOP or DONE the driver posts no more hints and sends STOP"""
    vm = DriverVM(ALL_FEATURES, strategy=strategy, driver=SLOW)
    vm.host(vm.dev.free_page_start)
    vm.run(0.01)
    assert vm.drv.hinting
    t = vm.sched.now
    vm.host(vm.dev.free_page_stop if event == "stop" else vm.dev.free_page_done)
    vm.run(0.2)
    (start, hints, stop), = rounds(vm.posted(Q.FREE_PAGE))
    assert hints and all(p.time <= t for p in hints), [p.time for p in hints][-3:]
    assert stop is not None and t <= stop.time <= t + 0.002
    assert "DR-10" not in vm.dev.dr_violations


@pytest.mark.spec("DR-10")
@pytest.mark.parametrize("strategy", ["capture", "walk"])
def test_hints_only_inside_rounds_over_a_migration(strategy: str) -> None:
    """over a migration's rounds every hint lies between its round's start and STOP, and is
    posted while that round's id is the published one"""
    vm = DriverVM(ALL_FEATURES, strategy=strategy, driver=SLOW)
    migrate(vm, 5, 0.02)
    vm.host(vm.dev.free_page_done)
    vm.run(0.5)
    rs = rounds(vm.posted(Q.FREE_PAGE))
    assert len(rs) >= 5 and all(stop is not None for _, _, stop in rs)
    for start, hints, _ in rs:
        assert all(h.cmd_id == control_value(start) for h in hints)
    assert sum(len(h) for _, h, _ in rs) > 0
    assert "DR-10" not in vm.dev.dr_violations


# -- DR-11 -----------------------------------------------------------------------------------

@pytest.mark.spec("DR-11")
def test_done_releases_every_hinted_page() -> None:
    """pages the driver holds for hinting go back to the guest on DONE"""
    vm = DriverVM(ALL_FEATURES, strategy="capture")
    vm.host(vm.dev.free_page_start)
    vm.run(0.5)
    hinted = np.flatnonzero(hinted_mask(vm))
    assert hinted.size > 0 and not vm.guest_uses(hinted).any()  # held while the round is on
    vm.host(vm.dev.free_page_done)
    vm.run(0.1)
    assert vm.balloon_pages().size == 0
    assert vm.guest_uses(hinted).all()


@pytest.mark.spec("DR-11")
@pytest.mark.parametrize("how", ["shrink", "pressure"])
def test_hinted_pages_reused_before_done_are_initialised(how: str) -> None:
    """hinted pages the guest takes back before DONE are written (re-poisoned when freed,
    initialised when allocated) after the hint: their old content is not relied on"""
    vm = DriverVM(ALL_FEATURES, strategy="capture", page_poisoning=True)
    vm.host(vm.dev.free_page_start)
    vm.run(0.5)  # the round ends: out of pages, blocks held
    hinted = np.flatnonzero(hinted_mask(vm))
    assert hinted.size > 0
    vm.dirty.start()  # what is written from now on (a migration would resend it)
    if how == "shrink":
        assert vm.guest.reclaim(8 * 1024) == 8 * 1024
    else:
        got = vm.alloc.alloc_pages_bulk(vm.alloc.nr_free_pages() + 8 * 1024)
        assert np.intersect1d(got, hinted).size > 0  # it needed hinted blocks
    back = hinted[vm.guest_uses(hinted)]
    assert back.size >= 8 * 1024
    assert vm.dirty.peek()[back].all(), "hinted pages reused without being written"
    free = back[vm.alloc.free_mask()[back]]
    assert (vm.pages.version[free] == POISON).all()
