"""Sweeps on real clusters, as a user runs them: ``balloon-hint sweep --workers 2`` (a
multi-process LocalCluster), and a scheduler and workers started from Dask's command line on
loopback, one of which is killed mid-sweep. The rows must be the in-process sweep's, whatever
ran them (reproducibility), and no point may go missing when a worker dies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmsim.sweep.run import local_cluster, run_sweep
from vmsim.sweep.spec import load_sweep
from vmsim.sweep.store import NONDETERMINISTIC, read_results

BIN = Path(sys.executable).parent
# 3 modes x 2 bandwidths x 3 seeds = 18 points of about 0.1-0.3 s each (512 MiB, heavy churn):
# long enough to kill a worker while the sweep runs.
SWEEP = """
    name = "cluster-test"
    seeds = 3
    [base]
    builtin = "small-churn"
    [axes]
    "hinting.mode" = ["off", "walk", "capture"]
    "migration.bandwidth" = ["10Gbit/s", "40Gbit/s"]
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmsim", *args]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("sweep") / "cluster.toml"
    f.write_text(textwrap.dedent(SWEEP))
    return f


@pytest.fixture(scope="module")
def reference(sweep_file, tmp_path_factory) -> list[dict]:
    """The rows of the same sweep on a one-worker in-process cluster."""
    out = tmp_path_factory.mktemp("ref")
    cluster, client = local_cluster(1, processes=False)
    try:
        run_sweep(load_sweep(sweep_file), out, client)
    finally:
        client.close()
        cluster.close()
    rows, _ = read_results(out)
    return rows


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if k not in NONDETERMINISTIC} == \
            {k: v for k, v in y.items() if k not in NONDETERMINISTIC}


def test_local_cluster_processes_from_the_cli(sweep_file, reference, tmp_path) -> None:
    out = tmp_path / "r"
    proc = subprocess.run(_cli("sweep", str(sweep_file), "--workers", "2", "--out", str(out)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "18/18 done, 0 failed" in proc.stderr          # the progress lines (not a terminal)
    assert "2 workers" in proc.stderr
    rows, _ = read_results(out)
    _same_rows(rows, reference)
    rep = subprocess.run(_cli("sweep-report", str(out), "--plot", str(tmp_path / "p.png")),
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "by migration.bandwidth" in rep.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.1)


def test_cli_scheduler_and_workers_survive_a_killed_worker(sweep_file, reference,
                                                            tmp_path) -> None:
    sched_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        with open(tmp_path / f"dask-{len(procs)}.log", "w") as log:
            p = subprocess.Popen([str(BIN / "dask"), *args], stdout=subprocess.DEVNULL,
                                 stderr=log)
        procs.append(p)
        return p
    try:
        sched = start("scheduler", "--host", "127.0.0.1", "--port", "0",
                      "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file))
        _wait_for(sched_file, sched)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        # no nanny: a killed worker stays dead (a nanny would start a new one)
        workers = [start("worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                         "--no-nanny", "--dashboard-address", "127.0.0.1:0",
                         "--memory-limit", "2GiB", "--name", f"w{i}") for i in range(2)]
        out = tmp_path / "r"
        sweep = subprocess.Popen(_cli("sweep", str(sweep_file), "--scheduler", address,
                                      "--out", str(out)),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(sweep)
        killed = False
        err_lines = []
        assert sweep.stderr is not None
        for line in sweep.stderr:
            err_lines.append(line)
            # the first progress line after some points completed: the sweep is under way
            done = line.split(":", 1)[1].split("/")[0].strip() if " done, " in line else ""
            if not killed and done.isdigit() and 0 < int(done) < 18:
                os.kill(workers[0].pid, signal.SIGKILL)
                workers[0].wait(timeout=30)
                killed = True
        sweep.wait(timeout=300)
        err = "".join(err_lines)
        assert killed, err
        rows, _ = read_results(out)
        # every point has its row: rerun on the surviving worker, or recorded as failed
        assert [r["point"] for r in rows] == list(range(18))
        failed = [r for r in rows if r["status"] != "ok"]
        assert all(r["failure"] for r in failed)
        assert sweep.returncode == (1 if failed else 0), err
        _same_rows([r for r in rows if r["status"] == "ok"],
                   [r for r in reference if r["point_id"] not in
                    {f["point_id"] for f in failed}])
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
