"""Absurd scenarios finish or are refused quickly (issue 15 item 8).

A workload rate no machine reaches (more than ``MAX_RATE_PER_RAM`` times guest RAM per second)
is refused when the file is loaded, with the reason. Below that, a run whose work grows past
its bound (a pre-copy that never converges under a heavy workload, with a day of simulated
time allowed) stops with ``SimulationTooLong``, a usage error naming the file and the workload;
the bound counts events and pages, not wall time, so the same file always stops at the same
point. The tests lower the bound (``max_cost``) to keep them short; the default's calibration
is in ``vmsim.vm.MAX_SIM_COST``.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol.errors import UsageError
from vmsim.cli import main
from vmsim.scenario import MAX_RATE_PER_RAM, ScenarioError, load_builtin, loads
from vmsim.vm import (
    COST_UNITS_PER,
    MAX_SIM_COST,
    WORK_KINDS,
    SimulationTooLong,
    SimVM,
    VMOptions,
    run_scenario,
)

ISSUE = """[guest]
ram = "256MiB"
[[workload]]
kind = "churn"
during = true
rate = "1TiB/s"
"""

# Below the rate cap, but a pre-copy at 1 Gbit/s with a 1 ms downtime limit never converges
# under GiB/s of rewrites, and a day of simulated time and 10,000 rounds are allowed: without a
# bound this runs for hours.
HEAVY = """[guest]
ram = "64MiB"
[[workload]]
kind = "fill"
size = "48MiB"
[[workload]]
kind = "dirty"
during = true
rate = "{rate}"
[migration]
bandwidth = "1Gbit/s"
downtime_limit = "1ms"
max_rounds = 10000
time_limit = "24h"
"""


def test_the_issues_scenario_is_refused_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tib.toml"
    path.write_text(ISSUE, encoding="utf-8")
    t0 = time.perf_counter()
    assert main(["migrate", str(path)]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert f"{path}:6: key 'workload[1].rate'" in err
    assert f"more than {MAX_RATE_PER_RAM} times the guest's RAM (256.0 MiB)" in err


@pytest.mark.parametrize("kind", ["churn", "dirty"])
def test_rate_cap_is_relative_to_guest_ram(kind: str) -> None:
    base = '[guest]\nram = "64MiB"\n[[workload]]\nkind = "%s"\nduring = true\nrate = "%s"\n'
    loads(base % (kind, "6400MiB/s"), "ok.toml")  # exactly 100 x RAM: allowed
    with pytest.raises(ScenarioError, match="no machine touches memory that fast"):
        loads(base % (kind, "6401MiB/s"), "bad.toml")


def test_idle_phase_longer_than_a_day_is_refused() -> None:
    with pytest.raises(ScenarioError, match="idle|duration"):
        loads('[guest]\nram = "64MiB"\n[[workload]]\nkind = "idle"\nduration = "1e9h"\n',
              "f.toml")


def test_a_run_past_its_bound_stops_naming_the_workload() -> None:
    scn = loads(HEAVY.format(rate="6GiB/s"), "heavy.toml")
    t0 = time.perf_counter()
    with pytest.raises(SimulationTooLong) as ei:
        run_scenario(scn, "walk", max_cost=200_000)
    assert time.perf_counter() - t0 < 30
    msg = str(ei.value)
    assert isinstance(ei.value, UsageError)
    assert msg.startswith("heavy.toml: workload[2] (dirty at 6.0 GiB/s)"), msg
    assert "200,000 units" in msg and "\n" not in msg
    # deterministic: the same file stops at the same simulated time
    with pytest.raises(SimulationTooLong) as again:
        run_scenario(scn, "walk", max_cost=200_000)
    assert str(again.value) == msg


def test_a_light_scenario_stays_far_below_the_bound() -> None:
    """The bound does not refuse ordinary runs: a small churn uses a sliver of it."""
    scn = loads(HEAVY.format(rate="1MiB/s").replace('downtime_limit = "1ms"', ""), "light.toml")
    r = run_scenario(scn, "capture", max_cost=MAX_SIM_COST / 20)
    assert r.error is None and r.verified


def test_the_work_is_counted_by_kind() -> None:
    """The bound's cost is the weighted sum of the work by kind (the kinds
    scripts/calibrate_work.py fits), and each kind counts what it says: a walk with a churn
    and a dirty workload does every kind but the memory-pressure ones."""
    scn = load_builtin("small-churn")
    vm = SimVM(scn, VMOptions(mode="walk", seed=scn.guest.seed))
    vm.prepare()
    vm.migrate()
    work = vm.work()
    assert set(work) == set(WORK_KINDS) == set(COST_UNITS_PER)
    assert vm.cost() == pytest.approx(sum(COST_UNITS_PER[k] * n for k, n in work.items()))
    churn = [w for w in vm.guest.workloads if w.name == "churn"]
    assert len(churn) == 1 and work["churn_ticks"] == churn[0].stats["ticks"] > 0
    assert work["events"] > sum(w.stats.get("ticks", 0) for w in vm.guest.workloads)
    for k in ("alloc_pages", "freed_pages", "written_pages"):
        assert work[k] == sum(w.stats[k] for w in vm.guest.workloads) > 0, k
    st = vm.migration.stats
    assert work["hints"] == vm.guest.driver.counters["hints_sent"] > 0
    assert work["migration_pages"] == st.pages_sent + st.zero_pages > 0
    assert work["scanned_pages"] == vm.pages.ram_pages * (st.rounds + 1)
    assert work["alloc_failures"] == work["reclaim_runs"] == 0


def test_cli_reports_the_bound_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import vmsim.vm
    monkeypatch.setattr(vmsim.vm.VMOptions, "__init__", _small_budget_init(
        vmsim.vm.VMOptions.__init__))
    path = tmp_path / "heavy.toml"
    path.write_text(HEAVY.format(rate="6GiB/s"), encoding="utf-8")
    assert main(["migrate", str(path), "--mode", "off"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"balloon-hint migrate: {path}: workload[2] (dirty"), err


def _small_budget_init(init):  # type: ignore[no-untyped-def]
    def small(self, *args, **kw):  # type: ignore[no-untyped-def]
        init(self, *args, **kw)
        self.max_cost = 200_000
    return small


def test_cli_max_work_sets_and_lifts_the_bound(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``migrate --max-work`` is the bound the run obeys: a light scenario that finishes by itself
    is stopped by a tiny bound and runs to the end with ``none`` (how a 1 TiB churn is run)."""
    path = tmp_path / "light.toml"
    path.write_text(HEAVY.format(rate="1MiB/s").replace('downtime_limit = "1ms"', ""),
                    encoding="utf-8")
    assert main(["migrate", str(path), "--mode", "capture", "--max-work", "50"]) == 2
    err = capsys.readouterr().err
    assert "50 units" in err and "--max-work none" in err, err
    assert main(["migrate", str(path), "--mode", "capture", "--max-work", "none"]) == 0


@pytest.mark.parametrize("bad", ["0", "-5", "lots", "inf5"])
def test_cli_max_work_refuses_nonsense(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["migrate", "--builtin", "idle-8g", "--max-work", bad])
    assert ei.value.code == 2
    assert "--max-work" in capsys.readouterr().err
