"""The pre-copy engine's safety budget on simulated time (``MigrationParams.time_budget_s``): a
migration that cannot be over within it is cancelled with an error instead of running on."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from balloon_dev.effects import PrecopyEvent
from balloon_dev.host.precopy import (
    MigrationError,
    MigrationParams,
    PrecopyMigration,
)
from guestmem import DirtyLog, PageVersions
from guestmem.clock import Scheduler
from tests.balloon_dev.host.test_precopy import make


def test_default_budget_is_one_hour_simulated() -> None:
    assert MigrationParams().time_budget_s == 3600.0


def test_a_link_of_one_bit_per_second_is_cancelled_at_once() -> None:
    # The bug this guards against: every chunk of the bulk pass costs ~5e8 s simulated, and a
    # caller driving background workloads on the same clock would run them for ever.
    params = MigrationParams(bandwidth_Bps=1 / 8, chunk_pages=256)
    sched, g, hinter, mig = make(params=params, hinter_blocks=[])
    g.churn(period=0.005, pages=4)  # background activity on the shared clock
    st = mig.run(max_events=10_000)  # raises if it does not end within that many events
    assert mig.done and mig.phase == "cancelled"
    assert st.timed_out and not st.converged
    assert mig.error is not None
    assert mig.error.startswith("did not converge within 3600 s simulated")
    assert "round 1" in mig.error
    assert mig.verify_result is None  # no switchover, nothing to verify
    assert st.total_time_s <= params.time_budget_s
    assert sched.now <= params.time_budget_s
    # Cancelled, not completed: CLEANUP with the VM running, never COMPLETE.
    assert hinter is not None
    assert hinter.events[-1] == (PrecopyEvent.CLEANUP, True)
    assert (PrecopyEvent.COMPLETE, False) not in hinter.events
    assert not mig.dirty_log.enabled  # dirty logging off again


def test_non_converging_rounds_are_cancelled_within_the_budget() -> None:
    params = MigrationParams(chunk_pages=256, downtime_limit_s=1e-7, max_rounds=10_000,
                             time_budget_s=0.05)
    sched, g, _, mig = make(n=4096, used=4096, params=params)
    g.churn(period=1e-4, pages=200)
    st = mig.run()
    assert st.timed_out and len(mig.rounds) > 3, len(mig.rounds)  # rounds of ~8 ms each
    assert st.total_time_s <= 0.05 and sched.now <= 0.05
    assert mig.rounds[-1].end_s == pytest.approx(st.total_time_s)  # the round cut short
    assert "did not converge within 0.05 s simulated" in (mig.error or "")
    # Hints arriving after the cancel are ignored, as with no migration running.
    before = st.hints_received
    mig.hint(0x80000001, [(0, 4096)])
    assert st.hints_received == before


def test_the_budget_covers_the_switchover_too() -> None:
    _, _, _, ref = make(params=MigrationParams(chunk_pages=256))
    total = ref.run().total_time_s
    assert ref.verify_result is not None and ref.verify_result.verified
    # A budget just above the whole migration changes nothing ...
    _, _, _, ok = make(params=MigrationParams(chunk_pages=256, time_budget_s=total * 1.001))
    st = ok.run()
    assert not st.timed_out and ok.error is None and st.total_time_s == pytest.approx(total)
    assert ok.verify_result is not None and ok.verify_result.verified
    # ... one just below it cancels in the stop-and-copy: no verification, an error instead.
    _, _, hinter, late = make(params=MigrationParams(chunk_pages=256,
                                                     time_budget_s=total * 0.999),
                              hinter_blocks=[])
    st = late.run()
    assert st.timed_out and late.verify_result is None
    assert "stop-and-copy would end" in (late.error or "")
    assert hinter is not None and (PrecopyEvent.AFTER_BITMAP_SYNC, False) in hinter.events
    assert hinter.events[-1] == (PrecopyEvent.CLEANUP, True)


@pytest.mark.parametrize("budget", [0.0, -1.0, math.nan])
def test_a_budget_that_is_not_positive_is_refused(budget: float) -> None:
    sched = Scheduler()
    log = DirtyLog(16)
    with pytest.raises(MigrationError, match="budget"):
        PrecopyMigration(PageVersions(16, log), log, sched,
                         replace(MigrationParams(), time_budget_s=budget))
