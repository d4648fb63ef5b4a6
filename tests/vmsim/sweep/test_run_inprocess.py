"""Sweeps on an in-process Dask cluster (fast): rows, reproducibility, resume, failures, memory.

The workers are threads of this process (Dask's inproc transport), so a test can make one point
fail by patching the simulator, and no process start-up is paid."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
from dask.distributed import Client, LocalCluster

import vmsim.vm
from protocol.errors import UsageError
from vmsim.cli import main
from vmsim.sweep.run import LOOPBACK_HTTP, local_cluster, memory_plan, run_sweep
from vmsim.sweep.spec import loads_sweep
from vmsim.sweep.store import NONDETERMINISTIC, read_results
from vmsim.sweep.task import run_point

SWEEP = """
    name = "t"
    seeds = 2
    [base]
    builtin = "small-idle"
    [axes]
    "hinting.mode" = ["off", "walk", "capture"]
    "migration.bandwidth" = ["10Gbit/s", "40Gbit/s"]
"""


@pytest.fixture(scope="module")
def client():
    cluster, c = local_cluster(2, processes=False)
    yield c
    c.close()
    cluster.close()


def _sweep(body: str = SWEEP):
    return loads_sweep(textwrap.dedent(body), "t.toml")


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in NONDETERMINISTIC}


def test_rows_are_migrate_json_plus_point(client, tmp_path) -> None:
    s = _sweep()
    out = run_sweep(s, tmp_path / "r", client)
    assert out.points == out.ran == 12 and out.failed == 0
    rows, desc = read_results(tmp_path / "r")
    assert [r["point"] for r in rows] == list(range(12))
    assert desc["axes"][0] == {"key": "hinting.mode", "values": ["off", "walk", "capture"]}
    # the point (walk, 10 Gbit/s = the built-in's own, seed 2) is `migrate --json` key for key
    js = tmp_path / "m.json"
    assert main(["migrate", "--builtin", "small-idle", "--mode", "walk", "--seed", "2",
                 "--json", str(js)]) == 0
    (ref,) = json.loads(js.read_text())["results"]
    (row,) = [r for r in rows if r["hinting.mode"] == "walk" and r["sweep_seed"] == 2
              and r["migration.bandwidth"] == "10Gbit/s"]
    for k, v in ref.items():
        if k not in NONDETERMINISTIC:
            assert row[k] == v, k
    assert row["status"] == "ok" and row["failure"] is None
    # and every row is what its scenario text gives when run here, one after another
    for r, p in zip(rows, s.points, strict=True):
        assert _strip({**r, **run_point(p.scenario_text)}) == _strip(r)


def test_resume_runs_only_new_points(client, tmp_path) -> None:
    s = _sweep()
    run_sweep(s, tmp_path / "r", client)
    with pytest.raises(UsageError, match="--resume"):
        run_sweep(s, tmp_path / "r", client)
    again = run_sweep(s, tmp_path / "r", client, resume=True)
    assert again.ran == 0 and again.reused == 12
    wider = _sweep(SWEEP.replace('"40Gbit/s"]', '"40Gbit/s", "100Gbit/s"]'))
    more = run_sweep(wider, tmp_path / "r", client, resume=True)
    assert more.ran == 6 and more.reused == 12 and more.points == 18
    rows, desc = read_results(tmp_path / "r")
    assert len(rows) == 18 and desc["axes"][1]["values"][-1] == "100Gbit/s"


def test_failed_point_recorded_not_fatal(client, tmp_path, monkeypatch) -> None:
    real = vmsim.vm.run_scenario

    def flaky(scn, mode, **kw):
        if scn.guest.seed == 2 and mode == "capture":
            raise MemoryError("simulated: no memory for the page arrays")
        return real(scn, mode, **kw)
    monkeypatch.setattr(vmsim.vm, "run_scenario", flaky)
    logging.getLogger("vmsim.sweep.task").setLevel(logging.ERROR)
    out = run_sweep(_sweep(), tmp_path / "r", client)
    assert out.failed == 2 and out.ran == 12
    rows, _ = read_results(tmp_path / "r")
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(bad) == 2 and all(r["hinting.mode"] == "capture" and r["sweep_seed"] == 2
                                 for r in bad)
    assert bad[0]["failure"].startswith("MemoryError: simulated")
    assert bad[0]["bytes_sent"] is None          # no result, not a made-up one
    # a resume runs the failed points again (here they now pass)
    monkeypatch.setattr(vmsim.vm, "run_scenario", real)
    again = run_sweep(_sweep(), tmp_path / "r", client, resume=True)
    assert again.ran == 2 and again.failed == 0


def test_point_larger_than_worker_memory_refused_before_submission(tmp_path) -> None:
    # a 32 GiB guest needs 64 MiB + 32 B x 8 Mi pages = 320 MiB; the worker gives each of its
    # two threads 400 / 2 = 200 MiB
    s = _sweep(SWEEP + '    "guest.ram" = ["256MiB", "32GiB"]\n')
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                           memory_limit="400MiB", dashboard_address=LOOPBACK_HTTP,
                           worker_dashboard_address=LOOPBACK_HTTP)
    try:
        with Client(cluster) as c:
            with pytest.raises(UsageError) as ei:
                run_sweep(s, tmp_path / "r", c)
            assert not c.futures  # refused before any task was submitted
    finally:
        cluster.close()
    assert "needs about 320.0 MiB" in str(ei.value) and "32.0 GiB" in str(ei.value)
    assert not (tmp_path / "r" / "results.parquet").exists()


def test_memory_plan_restricts_to_workers_that_fit() -> None:
    s = _sweep(SWEEP + '    "guest.ram" = ["256MiB", "8GiB"]\n')
    small = next(p for p in s.points if p.ram_bytes == 256 << 20)
    big = next(p for p in s.points if p.ram_bytes == 8 << 30)
    plan = memory_plan(s, [small, big], {"tcp://a": 100e6, "tcp://b": 1e9})
    assert plan[small.point_id] is None and plan[big.point_id] == ["tcp://b"]
    with pytest.raises(UsageError, match="more than any worker"):
        memory_plan(s, [big], {"tcp://a": 100e6})
    assert memory_plan(s, [big], {"tcp://a": float("inf")})[big.point_id] is None


def test_every_run_result_field_has_a_column() -> None:
    """A field added to RunResult becomes a column by itself (list[str], nested maps...)."""
    from dataclasses import fields

    from vmsim.report import RunResult
    from vmsim.sweep.store import result_fields

    assert [f.name for f in result_fields()] == [f.name for f in fields(RunResult)]
