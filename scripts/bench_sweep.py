#!/usr/bin/env python3
"""A sweep on a local Dask cluster against the same points run one after another in this
process: wall times, the speed-up, and whether both gave the same rows.

    .venv/bin/python scripts/bench_sweep.py [SWEEP.toml] [--workers N] [--out DIR]

Default: examples/sweep-builtin.toml (540 runs) on 2 workers. The cluster's wall time is given
with and without its start-up (process spawn and imports, paid once per sweep). Both runs give
every point's row; the rows are compared column for column (wall_s aside), so a speed-up never
hides different results. CPU seconds are given too: on a shared machine the wall times depend on
what else runs (and with Linux's autogroup scheduling, a local cluster's workers share the CPU
share of the session that started them: start the workers in sessions of their own, e.g.
`setsid dask worker ...`, and pass --scheduler, to compare like with like).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vmsim.sweep.run import connect, local_cluster, run_sweep
from vmsim.sweep.spec import load_sweep
from vmsim.sweep.store import NONDETERMINISTIC, read_results
from vmsim.sweep.task import run_point

ROOT = Path(__file__).resolve().parent.parent


def _cpu_s() -> float:
    """CPU seconds of this process (run on each worker by client.run)."""
    return time.process_time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", nargs="?", default=str(ROOT / "examples" / "sweep-builtin.toml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                    help="use a running Dask scheduler and its workers instead of a local cluster")
    ap.add_argument("--out", help="keep the Dask sweep's results here (default: a temp folder)")
    args = ap.parse_args()
    sweep = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty", file=sys.stderr)
        return 2
    n = len(sweep.points)
    where = args.scheduler or f"a local cluster of {args.workers} workers"
    print(f"sweep {sweep.name}: {n} runs on {where}", flush=True)

    t0 = time.perf_counter()
    cluster = None
    if args.scheduler:
        client = connect(args.scheduler)
    else:
        cluster, client = local_cluster(args.workers)
    t1 = time.perf_counter()
    try:
        # CPU seconds the workers use (the machine may be shared: wall time alone hides that)
        cpu_before = sum(client.run(_cpu_s).values())
        outcome = run_sweep(sweep, out, client)
        t2 = time.perf_counter()
        worker_cpu = sum(client.run(_cpu_s).values()) - cpu_before
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    dask_rows, _ = read_results(out)
    print(f"dask: {t2 - t0:.1f} s wall with cluster start-up ({t1 - t0:.1f} s), "
          f"{outcome.wall_s:.1f} s for the sweep itself; {outcome.failed} failed; "
          f"workers' CPU {worker_cpu:.1f} s", flush=True)

    t3 = time.perf_counter()
    c3 = time.process_time()
    serial = [run_point(p.scenario_text) for p in sweep.points]
    t4 = time.perf_counter()
    print(f"serial, one process: {t4 - t3:.1f} s wall, {time.process_time() - c3:.1f} s CPU",
          flush=True)

    differ = 0
    for row, res in zip(dask_rows, serial, strict=True):
        if any(row[k] != v for k, v in res.items() if k not in NONDETERMINISTIC):
            differ += 1
    cpu = sum(r["wall_s"] for r in serial if r.get("wall_s"))
    print(f"speed-up: {(t4 - t3) / (t2 - t0):.2f}x with start-up, "
          f"{(t4 - t3) / outcome.wall_s:.2f}x without; rows differing: {differ} of {n}; "
          f"sum of run times (serial) {cpu:.1f} s")
    if not args.out:
        shutil.rmtree(out)
    return 1 if differ or outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
