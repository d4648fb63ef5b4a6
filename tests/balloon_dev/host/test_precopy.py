"""The pre-copy engine against a synthetic guest: a page-state array the test controls, writes on
the shared scheduler, and a fake hint source that behaves like the device + driver pair (a new
command id after each sync, hints only while its round is open)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from balloon_dev.effects import PrecopyEvent
from balloon_dev.host.precopy import (
    CostModel,
    MigrationError,
    MigrationParams,
    PrecopyMigration,
    verify_pages,
)
from guestmem import POISON, ZERO, DirtyLog, PageVersions
from guestmem.clock import Scheduler
from guestmem.units import PAGE_SIZE

MiB = 1 << 20
# Small guests: no BUFFER_DELAY pacing and a short switchover, so the tests reason in microseconds.
TEST_COST = CostModel(check_period_s=0.0, switchover_s=1e-4)


class SyntheticGuest:
    """RAM of ``n`` pages: the first ``used`` pages hold data, the rest are free (zero or poison).
    ``churn`` writes random used pages every ``period`` seconds while the guest runs."""

    def __init__(self, n: int, used: int, sched: Scheduler, *, poison: bool = False,
                 seed: int = 1) -> None:
        self.log = DirtyLog(n)
        self.pv = PageVersions(n, self.log)
        self.sched = sched
        self.in_use = np.zeros(n, dtype=np.bool_)
        self.in_use[:used] = True
        self.pv.write_range(0, used, "data")
        if poison:
            self.pv.write_range(used, n - used, "poison")
        self.rng = np.random.default_rng(seed)
        self.running = True

    def churn(self, period: float, pages: int) -> None:
        def tick() -> None:
            if not self.running:
                return
            used = np.flatnonzero(self.in_use)
            self.pv.write_pfns(self.rng.choice(used, size=min(pages, used.size), replace=False))
            self.sched.after(period, tick)
        self.sched.after(period, tick)


class FakeHinter:
    """Stands in for device + driver: on AFTER_BITMAP_SYNC with the VM running it opens a round
    with a fresh id and hints ``blocks`` (first_pfn, npages) one every ``gap`` seconds; it stops
    on BEFORE_BITMAP_SYNC (the device's STOP and HintRoundStopped); hints are ranges in bytes as
    PagesHinted carries."""

    def __init__(self, sched: Scheduler, blocks: list[tuple[int, int]], gap: float) -> None:
        self.sched = sched
        self.blocks = blocks
        self.gap = gap
        self.events: list[tuple[PrecopyEvent, bool]] = []
        self.cmd_id = 0x80000000
        self.active = False
        self.mig: PrecopyMigration | None = None
        self.sent = 0

    def __call__(self, event: PrecopyEvent, running: bool) -> None:
        self.events.append((event, running))
        if event == PrecopyEvent.BEFORE_BITMAP_SYNC:
            self.active = False
            if self.mig is not None:
                self.mig.round_stopped(self.cmd_id)  # the device's HintRoundStopped
        elif event == PrecopyEvent.AFTER_BITMAP_SYNC and running:
            self.cmd_id += 1
            self.active = True
            cid = self.cmd_id
            for i, (first, n) in enumerate(self.blocks):
                self.sched.after(self.gap * (i + 1), self._send, cid, first, n)

    def _send(self, cid: int, first: int, n: int) -> None:
        if self.active and cid == self.cmd_id and self.mig is not None:
            self.sent += 1
            self.mig.hint(cid, [(first * PAGE_SIZE, n * PAGE_SIZE)])


def make(n: int = 4096, used: int = 512, *, params: MigrationParams | None = None,
         hinter_blocks: list[tuple[int, int]] | None = None, gap: float = 1e-5,
         cost: CostModel | None = None, poison: bool = False):
    sched = Scheduler()
    g = SyntheticGuest(n, used, sched, poison=poison)
    hinter = FakeHinter(sched, hinter_blocks, gap) if hinter_blocks is not None else None
    mig = PrecopyMigration(g.pv, g.log, sched, params or MigrationParams(chunk_pages=256),
                           cost or TEST_COST, notify=hinter)
    if hinter is not None:
        hinter.mig = mig

    def stop(m: PrecopyMigration) -> None:
        g.running = False
        m.verify(g.in_use, page_poison=poison)
    mig.on_switchover = stop
    return sched, g, hinter, mig


def test_idle_no_hints_sends_every_page_once_and_verifies() -> None:
    sched, g, _, mig = make()
    st = mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified
    assert st.pages_sent == 4096
    assert st.zero_pages == 4096 - 512
    assert st.pages_skipped_hint == 0
    z, nrm = TEST_COST.page_cost(MigrationParams().bandwidth_Bps)
    assert st.bytes_sent == (4096 - 512) * 9 + 512 * (PAGE_SIZE + 8)
    # one pre-copy round, then a stop-and-copy with nothing left
    assert st.rounds == 2 and mig.rounds[-1].pages_sent == 0
    assert st.total_time_s >= 3584 * z + 512 * nrm
    assert st.converged


def test_precopy_events_follow_qemu_order() -> None:
    _, _, hinter, mig = make(hinter_blocks=[])
    mig.run()
    assert hinter is not None
    ev = hinter.events
    assert ev[0] == (PrecopyEvent.SETUP, True)
    assert ev[1:3] == [(PrecopyEvent.BEFORE_BITMAP_SYNC, True),
                       (PrecopyEvent.AFTER_BITMAP_SYNC, True)]
    # the final sync happens with the VM stopped, then COMPLETE and CLEANUP
    assert ev[-4:] == [(PrecopyEvent.BEFORE_BITMAP_SYNC, False),
                       (PrecopyEvent.AFTER_BITMAP_SYNC, False),
                       (PrecopyEvent.COMPLETE, False), (PrecopyEvent.CLEANUP, False)]


def test_hints_skip_free_pages_and_still_verify() -> None:
    free_blocks = [(p, 256) for p in range(512, 4096, 256)]
    _, g, hinter, mig = make(hinter_blocks=free_blocks, gap=1e-7)
    st = mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified
    assert st.pages_skipped_hint > 3000
    assert st.pages_sent < 4096 - 3000
    assert st.hint_rounds >= 1 and st.hints_received == hinter.sent
    assert st.hinted_pages == 256 * hinter.sent


def test_guest_writes_during_precopy_are_resent() -> None:
    sched, g, _, mig = make(n=8192, used=4096,
                            params=MigrationParams(chunk_pages=256, downtime_limit_s=1e-4))
    g.churn(period=5e-4, pages=64)
    st = mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified
    assert st.pages_sent > 8192  # the dirtied pages went again
    assert sum(r.dirty_at_sync for r in mig.rounds[1:]) > 0


def test_hint_never_clears_the_dirty_log() -> None:
    sched, g, _, mig = make(hinter_blocks=None)
    mig.start()
    g.pv.write_range(1000, 4, "data")  # written after the set-up sync
    before = g.log.peek().copy()
    mig.hint(0x80000001, [(1000 * PAGE_SIZE, 4 * PAGE_SIZE)])
    sched.run_until(sched.now + 1e-3)
    assert np.array_equal(g.log.peek()[1000:1004], before[1000:1004])
    assert g.log.peek()[1000:1004].all()


def test_hint_ranges_outside_ram_are_counted_not_raised() -> None:
    sched, g, _, mig = make()
    mig.start()
    mig.hint(0x80000001, [(4096 * PAGE_SIZE, PAGE_SIZE), (-PAGE_SIZE, PAGE_SIZE), (0, 0)])
    assert mig.stats.bad_hints == 3
    mig.hint(0x80000001, [(10, 100)])  # no whole page inside: nothing to skip, not an error
    assert mig.stats.bad_hints == 3
    mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified


def _stale_race(accept: bool):
    """A hint for free pages arrives while the migration thread holds bitmap_mutex for the last
    (here: only) batch of the round; the guest then allocates and writes those pages; the round
    ends (sync) before the hint thread gets the mutex."""
    params = MigrationParams(chunk_pages=2048, accept_stale_hints=accept, downtime_limit_s=1.0)
    sched, g, _, mig = make(n=2048, used=256, params=params)
    mig.start()
    # set-up takes ~5.2 ms; the one batch of 2048 pages is sent at 5.2 ms and holds the mutex
    # for its ~2.6 ms; the hint comes at 5.5 ms, the write at 6 ms, the sync at ~7.8 ms.
    sched.at(0.0055, mig.hint, 0x80000001, [(300 * PAGE_SIZE, 64 * PAGE_SIZE)])

    def allocate_and_write() -> None:
        g.in_use[300:364] = True
        g.pv.write_range(300, 64, "data")
    sched.at(0.006, allocate_and_write)
    mig.run()
    return mig


def test_stale_hints_are_dropped_at_sync() -> None:
    mig = _stale_race(accept=False)
    assert mig.stats.stale_hints_dropped == 1
    assert mig.verify_result is not None and mig.verify_result.verified


def test_fault_accept_stale_hints_is_caught_by_the_verifier() -> None:
    mig = _stale_race(accept=True)
    assert mig.stats.stale_hints_applied == 1
    vr = mig.verify_result
    assert vr is not None and not vr.verified
    assert vr.mismatched_pages == 64
    assert vr.first_mismatches[0] == 300


def test_max_rounds_stops_a_migration_that_cannot_converge() -> None:
    params = MigrationParams(chunk_pages=256, downtime_limit_s=1e-7, max_rounds=4)
    sched, g, _, mig = make(n=4096, used=4096, params=params)
    g.churn(period=1e-4, pages=200)
    st = mig.run()
    assert not st.converged
    assert st.rounds == 5  # 4 pre-copy rounds + stop-and-copy
    assert mig.verify_result is not None and mig.verify_result.verified


def test_downtime_respects_the_limit_when_converged() -> None:
    params = MigrationParams(chunk_pages=256, downtime_limit_s=3e-3)
    sched, g, _, mig = make(n=8192, used=2048, params=params)
    g.churn(period=1e-3, pages=16)
    st = mig.run()
    assert st.converged
    # the estimate prices every page left as a normal page, so it bounds the real downtime
    assert 0 < st.downtime_s <= 3e-3
    assert mig.rounds[-1].pages_sent > 0


def test_verifier_counts_mismatches_held_and_poison() -> None:
    src = np.array([5, 6, POISON, POISON, 7, ZERO], dtype=np.uint32)
    dest = np.array([5, 9, POISON, ZERO, 0, ZERO], dtype=np.uint32)
    in_use = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    held = np.array([0, 0, 0, 0, 1, 0], dtype=bool)
    r = verify_pages(src, dest, in_use, held, page_poison=True)
    assert not r.verified and r.mismatched_pages == 1 and r.first_mismatches == [1]
    # pfn 3 and 5 are free but do not read as poison on the destination
    assert r.poison_violations == 2 and r.first_poison == [3, 5]
    r2 = verify_pages(src, dest, in_use, held, page_poison=False)
    assert r2.poison_violations == 0 and r2.mismatched_pages == 1


def test_byte_backed_pages_are_compared_by_content() -> None:
    sched = Scheduler()
    log = DirtyLog(64)
    pv = PageVersions(64, log)
    area = bytearray(4 * PAGE_SIZE)
    area[5] = 1
    mig = PrecopyMigration(pv, log, sched, MigrationParams(chunk_pages=16),
                           byte_regions=[(8, memoryview(area))])
    in_use = np.zeros(64, dtype=bool)
    in_use[8:12] = True
    seen = {}

    def at_switch(m: PrecopyMigration) -> None:
        seen["ok"] = m.verify(in_use)
        area[PAGE_SIZE + 7] = 3  # a change the destination never got
        seen["bad"] = m.verify(in_use)
    mig.on_switchover = at_switch
    st = mig.run()
    assert seen["ok"].verified
    assert not seen["bad"].verified and seen["bad"].first_mismatches == [9]
    assert st.zero_pages == 63  # the area's first page holds a non-zero byte


def test_engine_rejects_mismatched_arrays() -> None:
    with pytest.raises(MigrationError):
        PrecopyMigration(PageVersions(8), DirtyLog(16), Scheduler())


def test_a_pass_over_before_the_first_window_completes_at_once() -> None:
    """QEMU's threshold is 0 until its first 100 ms bandwidth window is over, and with nothing
    left in the bitmap it completes without a sync of its own: the pages written during the
    pass go in the downtime (the stop-and-copy's sync)."""
    cost = CostModel(check_period_s=0.1, switchover_s=1e-3)
    sched, g, hinter, mig = make(cost=cost, hinter_blocks=[])
    g.churn(1e-3, 4)
    st = mig.run()
    assert mig.rounds[0].end_s < 0.02
    assert len(mig.rounds) == 2 and mig.rounds[-1].stop_and_copy
    assert mig.rounds[-1].start_s == pytest.approx(mig.rounds[0].end_s)
    assert mig.rounds[-1].pages_sent > 0  # the churn of the pass, sent with the VM stopped
    assert hinter is not None
    syncs = [e for e in hinter.events if e[0] == PrecopyEvent.BEFORE_BITMAP_SYNC]
    assert syncs == [(PrecopyEvent.BEFORE_BITMAP_SYNC, True),   # set-up
                     (PrecopyEvent.BEFORE_BITMAP_SYNC, False)]  # stop-and-copy
    assert st.converged


def _hinted_pass(downtime_limit_s: float) -> PrecopyMigration:
    """64 Ki pages, the first 8 Ki data, the rest hinted at once; short iterations."""
    cost = CostModel(check_period_s=0.0, switchover_s=1e-4, iteration_s=1e-3)
    params = MigrationParams(chunk_pages=256, downtime_limit_s=downtime_limit_s)
    _, _, _, mig = make(n=65536, used=8192, params=params, cost=cost,
                        hinter_blocks=[(8192, 65536 - 8192)])
    mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified
    return mig


def test_switchover_in_the_middle_of_a_pass_once_the_rest_fits() -> None:
    """QEMU checks pending vs bandwidth x downtime limit before every iteration, not at the end
    of a pass: once hints have taken the free memory out of the bitmap, the rest of the pass
    fits the threshold and is sent with the VM stopped (migration_iteration_run)."""
    mig = _hinted_pass(0.3)  # ~2 GB/s x 0.3 s: far more than the 32 MiB of data
    pre, stop = mig.rounds[0], mig.rounds[-1]
    assert len(mig.rounds) == 2 and stop.stop_and_copy
    assert 0 < pre.pages_sent < 8192
    assert stop.pages_sent == 8192 - pre.pages_sent
    assert mig.stats.downtime_s > stop.pages_sent * mig.cost.zero_page_s
    # a limit too small for any iteration's bandwidth: the whole pass runs before the stop
    tight = _hinted_pass(1e-6)
    assert tight.rounds[0].pages_sent == 8192
    assert tight.rounds[-1].pages_sent == 0


def test_the_threshold_is_measured_bytes_not_pages() -> None:
    """QEMU's bandwidth is bytes sent over the window's time: a window of zero pages (9 bytes
    each) measures a low bandwidth, so a zero-page pass does not switch over early although
    the pending pages, priced at 4 KiB each, would be few seconds of work."""
    cost = CostModel(check_period_s=0.0, switchover_s=1e-4, iteration_s=1e-3)
    params = MigrationParams(chunk_pages=256, downtime_limit_s=0.3)
    _, _, _, mig = make(n=65536, used=0, params=params, cost=cost)
    mig.run()
    # 9 B per ~1.3 us is ~7 MB/s: a threshold of ~2 MB, ~500 pages: the pass runs to its end
    assert mig.rounds[0].pages_sent > 65536 - 1000
    assert mig.rounds[-1].pages_sent < 1000


def test_a_hint_waits_for_the_batch_holding_bitmap_mutex() -> None:
    """QEMU's migration thread holds bitmap_mutex while it sends a batch: a hint that arrives
    meanwhile is applied when the batch is over, never in the middle of it."""
    params = MigrationParams(chunk_pages=1024)
    sched, g, _, mig = make(n=4096, used=0, params=params)
    mig.start()
    sched.run_until(mig.rounds[0].start_s + 1e-7)  # the first batch (pfns 0..1023) is out
    assert mig._cursor == 1024
    t_hint = sched.now
    mig.hint(0x80000001, [(2048 * PAGE_SIZE, 1024 * PAGE_SIZE)])
    sched.run_until(t_hint + 1e-6)
    assert mig.to_send[2048:3072].all()  # still waiting: the batch holds the mutex
    while mig._cursor < 2048:
        sched.run_next()
    assert not mig.to_send[2048:3072].any()  # applied before the batch that covers it
    mig.run()
    assert mig.stats.pages_skipped_hint == 1024
    assert mig.verify_result is not None and mig.verify_result.verified


def test_hints_of_a_stopped_round_are_stale_queued_ones_still_apply() -> None:
    """HintRoundStopped (``round_stopped``) makes later hints of that round stale; hints that
    arrived before it are applied (QEMU applies a hint when it arrives)."""
    sched, g, _, mig = make(hinter_blocks=None)
    mig.start()  # the set-up sync opened a round; its id is whatever the device drew
    free = np.flatnonzero(~g.in_use)
    a, b = int(free[-1]), int(free[-2])  # the bitmap walk reaches them last
    mig.hint(0x80000001, [(a * PAGE_SIZE, PAGE_SIZE)])  # queued before the stop
    mig.round_stopped(0x80000001)
    mig.hint(0x80000001, [(b * PAGE_SIZE, PAGE_SIZE)])  # after it: stale
    sched.run_until(sched.now + 1e-4)
    assert mig.stats.stale_hints_dropped == 1 and mig.stats.pages_skipped_hint == 1


@pytest.mark.parametrize("piece", [7, 256, 1 << 22])
def test_send_and_verify_pieces_do_not_change_the_result(monkeypatch, piece) -> None:
    """The sender and the verifier work in pieces of SEND_PIECE pages (and the sender takes a
    fully marked piece with slices only); any piece size gives the same migration and the
    same verdict, mismatches included."""
    import balloon_dev.host.precopy as precopy
    import balloon_dev.host.verify as verify

    def one(piece_size: int):
        monkeypatch.setattr(precopy, "SEND_PIECE", piece_size)
        monkeypatch.setattr(verify, "VERIFY_PIECE", piece_size)
        sched, g, _, mig = make(hinter_blocks=[(600, 64), (1200, 300)], poison=True)
        g.churn(0.05, 32)
        st = mig.run()
        dest = mig.dest_version.copy()
        dest[[5, 700, 4000]] += 1  # planted mismatches and a poison violation
        res = verify.verify_pages(g.pv.version, dest, g.in_use, page_poison=True,
                                   byte_regions=mig._byte_regions)
        return (st.pages_sent, st.zero_pages, st.bytes_sent, st.total_time_s, res)

    got = one(piece)
    assert got == one(1 << 22)
    res = got[-1]
    assert res.mismatched_pages >= 1 and res.poison_violations >= 1 and 5 in res.first_mismatches


def test_host_cores_shared_with_the_polling_iothread_and_busy_vcpus() -> None:
    """On a host with few CPUs the migration thread shares them with the vCPUs the guest keeps
    busy and, while a hint round runs, with the vCPU running the driver and QEMU's iothread
    polling the free page queue: its CPU work stretches by 1 / share, and not after the
    round is reported over or with the VM stopped."""
    cost = dataclasses.replace(TEST_COST, host_cores=2)
    params = MigrationParams(chunk_pages=256, vcpus=2, busy_vcpus=1.0)
    sched, g, hinter, mig = make(n=4096, used=512, params=params, cost=cost, hinter_blocks=[])
    assert mig.cpu_share() == 1.0  # not started: nothing runs
    mig.start()
    # the set-up sync opened hint round 1: driver vCPU + busy vCPU + iothread + this thread
    assert mig.busy_threads() == 3.0 and mig.cpu_share() == pytest.approx(0.5)
    assert hinter is not None
    mig.round_stopped(hinter.cmd_id)  # the driver's STOP: the iothread sleeps, its vCPU too
    assert mig.busy_threads() == 1.0 and mig.cpu_share() == 1.0
    # the same batch costs twice its CPU time at half a CPU (not rate limited: plus the wire)
    mig._polling = True
    cpu, wire = mig._cpu_and_wire(256, 200, 56)
    assert mig._batch_cost(256, 200, 56) == pytest.approx(cpu / 0.5 + wire)
    mig.run()
    assert mig.verify_result is not None and mig.verify_result.verified
    # dedicated CPUs (the default): no contention whatever runs
    _, _, _, free = make(params=params, hinter_blocks=[])
    free.start()
    assert free.cpu_share() == 1.0
