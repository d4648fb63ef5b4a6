"""The host evacuation model: the list schedule and the grouping of a sweep's rows."""
from __future__ import annotations

import pytest

from vmsim.sweep.evacuation import evacuations, makespan


@pytest.mark.parametrize("durations, k, expected", [
    ([], 1, 0.0),
    ([3.0], 4, 3.0),
    ([1.0, 2.0, 3.0], 1, 6.0),          # one at a time: the sum
    ([1.0, 2.0, 3.0], 3, 3.0),          # all at once: the longest
    ([4.0, 1.0, 1.0, 1.0], 2, 4.0),     # slot 2 runs the three short ones meanwhile
    ([1.0, 1.0, 4.0, 1.0], 2, 5.0),     # in fleet order: the long one starts at 1
])
def test_makespan(durations, k, expected) -> None:
    assert makespan(durations, k) == expected


def test_makespan_refuses_no_slot() -> None:
    with pytest.raises(ValueError):
        makespan([1.0], 0)


def _row(vm, mode, k, t, b, status="ok", converged=True):
    return {"fleet.vm": vm, "hinting.mode": mode, "evacuation.concurrency": k, "sweep_seed": 1,
            "status": status, "failure": None if status == "ok" else "boom",
            "converged": converged, "total_time_s": t, "bytes_sent": b, "downtime_s": t / 10,
            "mode": mode}


def test_evacuations_group_by_mode_and_k() -> None:
    rows = [_row(vm, m, k, t * k, 100 * (vm + 1)) for vm, t in enumerate([1.0, 2.0, 3.0])
            for m in ("off", "capture") for k in (1, 3)]
    evs = {(e.mode, e.k): e for e in evacuations(rows, 3)}
    assert evs[("off", 1)].time_s == 6.0          # 1 + 2 + 3 one after another
    assert evs[("off", 3)].time_s == 9.0          # each at a third of the link, all at once
    assert evs[("capture", 1)].bytes_sent == 600
    assert evs[("off", 3)].max_downtime_s == pytest.approx(0.9)


def test_evacuation_with_a_failed_or_missing_vm_has_no_time() -> None:
    rows = [_row(0, "off", 1, 1.0, 1), _row(1, "off", 1, 1.0, 1, status="failed")]
    (e,) = evacuations(rows, 2)
    assert e.time_s is None and "VM 1 failed" in (e.problem or "")
    (e,) = evacuations(rows[:1], 2)
    assert e.time_s is None and "1 VMs have no row" in (e.problem or "")
    (e,) = evacuations([_row(0, "off", 1, 1.0, 1, converged=False)], 1)
    assert e.time_s is None and "did not converge" in (e.problem or "")
