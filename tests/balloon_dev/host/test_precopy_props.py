"""Property: whatever a guest does during pre-copy (allocate and write, rewrite, free) and whatever
free pages it hints whenever it likes, a correct host ends with every in-use page right on the
destination (protocol.md 5.7). Hints come from a hinter that only reports pages free at that
instant, as the seed's walk does; they may then be reallocated before the host applies them."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloon_dev.effects import PrecopyEvent
from balloon_dev.host.precopy import (
    CostModel,
    MigrationParams,
    PrecopyMigration,
)
from guestmem import DirtyLog, PageVersions
from guestmem.clock import Scheduler
from guestmem.units import PAGE_SIZE

N = 512
COST = CostModel(check_period_s=0.0, switchover_s=1e-5, setup_s=1e-5)

# one guest action: (time in us, kind, first page, count)
actions = st.lists(
    st.tuples(st.integers(0, 1500), st.sampled_from(["alloc", "write", "free", "hint"]),
              st.integers(0, N - 1), st.integers(1, 64)),
    min_size=1, max_size=60)


def _run(acts, accept_stale: bool, chunk: int) -> PrecopyMigration:
    sched = Scheduler()
    log = DirtyLog(N)
    pv = PageVersions(N, log)
    in_use = np.zeros(N, dtype=bool)
    in_use[:64] = True
    pv.write_range(0, 64, "data")
    state = {"cmd": 0x80000000, "open": False}

    def notify(event: PrecopyEvent, running: bool) -> None:
        if event == PrecopyEvent.BEFORE_BITMAP_SYNC:
            state["open"] = False
            mig.round_stopped(state["cmd"])  # the device's HintRoundStopped
        elif event == PrecopyEvent.AFTER_BITMAP_SYNC and running:
            state["cmd"] += 1
            state["open"] = True

    params = MigrationParams(chunk_pages=chunk, downtime_limit_s=2e-4, max_rounds=6,
                             accept_stale_hints=accept_stale)
    mig = PrecopyMigration(pv, log, sched, params, COST, notify=notify)
    stopped = {"v": False}

    def act(kind: str, first: int, count: int) -> None:
        if stopped["v"]:
            return  # the VM is stopped at switchover
        sl = slice(first, min(N, first + count))
        if kind == "alloc":
            in_use[sl] = True
            pv.write_range(sl.start, sl.stop - sl.start, "data")
        elif kind == "write":
            idx = np.flatnonzero(in_use[sl]) + sl.start
            pv.write_pfns(idx, "data")
        elif kind == "free":
            in_use[sl] = False
        elif kind == "hint" and state["open"]:
            free = np.flatnonzero(~in_use[sl]) + sl.start
            # report each free run as one range, as a walk reports free blocks
            if free.size:
                breaks = np.flatnonzero(np.diff(free) != 1) + 1
                ranges = [(int(r[0]) * PAGE_SIZE, int(r.size) * PAGE_SIZE)
                          for r in np.split(free, breaks)]
                mig.hint(state["cmd"], ranges)

    for t_us, kind, first, count in acts:
        sched.at(t_us * 1e-6, act, kind, first, count)

    def switch(m: PrecopyMigration) -> None:
        stopped["v"] = True
        m.verify(in_use.copy())
    mig.on_switchover = switch
    mig.run(max_events=100_000)
    return mig


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions, st.sampled_from([16, 128, N]))
def test_any_guest_activity_and_hints_verify(acts, chunk) -> None:
    mig = _run(acts, accept_stale=False, chunk=chunk)
    vr = mig.verify_result
    assert vr is not None and vr.verified, (vr, mig.stats)
    # hints never erase the dirty log: the engine only ever reads it
    assert mig.stats.pages_sent >= 64


def test_the_same_activity_can_break_a_host_that_accepts_stale_hints() -> None:
    """A concrete counterexample for the faulty host: the hint comes while the one batch of the
    round holds bitmap_mutex, the page is reallocated and written, the sync runs, then the stale
    hint lands on the new bitmap."""
    # the round's one batch is sent at ~57 us and holds the mutex until ~750 us
    acts = [(100, "hint", 100, 8), (200, "alloc", 100, 8)]
    good = _run(acts, accept_stale=False, chunk=N)
    bad = _run(acts, accept_stale=True, chunk=N)
    assert good.verify_result is not None and good.verify_result.verified
    assert bad.verify_result is not None and not bad.verify_result.verified
    assert bad.verify_result.mismatched_pages == 8
