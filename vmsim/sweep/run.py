"""Running a sweep on Dask distributed: one task per point, rows into the result store.

Theory of operation: the client (this process) holds the sweep's points; each point that the
results folder does not already hold is one ``client.submit(run_point, scenario_text)``, keyed
by its point id so the same run is never submitted twice. The worker parses the scenario text,
runs the migration and returns the row (``vmsim.sweep.task``): only the text goes in and only
the row comes out. Rows are collected as they complete (``as_completed``), written to a part
file every ``FLUSH_ROWS`` rows or ``FLUSH_S`` seconds, and merged into results.parquet at the
end, in the sweep's order: the table does not depend on which worker ran what, or when.

Memory: before anything is submitted, each point's memory (``task_memory_estimate`` of its
guest RAM) is checked against the workers' limits. A worker running ``nthreads`` tasks at once
under ``memory_limit`` gives each ``memory_limit / nthreads``; a point larger than that on every
worker stops the sweep with a usage error (nothing has run yet); a point that fits only some
workers is restricted to those (``workers=``). A worker with no limit fits everything.

Failures: a run that raises comes back as a failed row (``task.run_point`` catches it). A worker
that dies (killed, out of memory) loses the task it was running; the scheduler gives it to
another worker, up to ``distributed.scheduler.allowed-failures`` times (Dask's default, 3), after
which the future holds ``KilledWorker``: that point is recorded as failed with that error. No
point is ever missing: the final table has one row per point, and a point without a result
(an interrupted sweep) has a failed row saying so.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dask.distributed import Client, LocalCluster, as_completed

from protocol.errors import EnvironmentFailure, UsageError
from vmsim.scenario import format_size
from vmsim.sweep.spec import Point, Sweep, describe_point
from vmsim.sweep.store import ResultStore, failed_result
from vmsim.sweep.task import run_point

log = logging.getLogger(__name__)

FLUSH_ROWS = 256
FLUSH_S = 10.0
LOOPBACK_HTTP = "127.0.0.1:0"
#: How long to wait for a first worker of an external scheduler.
WORKER_WAIT_S = 60.0

#: progress(done, failed, total): done counts failed points too
Progress = Callable[[int, int, int], None]


@dataclass(slots=True)
class Outcome:
    path: Path
    points: int          # in the sweep
    ran: int             # submitted in this invocation
    reused: int          # already in the folder (--resume)
    failed: int          # rows with status failed in the final table
    wall_s: float
    dropped: int         # earlier rows not part of this sweep (left out)


def local_cluster(workers: int, *, processes: bool = True) -> tuple[LocalCluster, Client]:
    """A LocalCluster on loopback: ``workers`` workers of one thread each (a run is one
    thread of numpy work; one per worker makes a worker's memory limit one run's bound)."""
    # In-process workers talk over Dask's inproc:// transport; processes over TCP on loopback.
    # Scheduler and workers always start an HTTP server (health, metrics; the dashboard when
    # bokeh is installed): on loopback, any free port.
    where = {"host": "127.0.0.1"} if processes else {}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                           dashboard_address=LOOPBACK_HTTP,
                           worker_dashboard_address=LOOPBACK_HTTP,
                           silence_logs=logging.ERROR, **where)
    return cluster, Client(cluster)


def connect(address: str) -> Client:
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise EnvironmentFailure(f"cannot reach the Dask scheduler at {address}: {e}") from None
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        client.close()
        raise EnvironmentFailure(f"the Dask scheduler at {address} has no worker (waited "
                                 f"{WORKER_WAIT_S:g} s)") from None
    return client


def worker_budgets(info: dict[str, Any]) -> dict[str, float]:
    """Per-task memory of each worker (``memory_limit / nthreads``; no limit: infinite)."""
    out = {}
    for addr, w in info.get("workers", {}).items():
        limit = w.get("memory_limit") or 0
        threads = max(int(w.get("nthreads") or 1), 1)
        out[addr] = float(limit) / threads if limit else float("inf")
    return out


def memory_plan(sweep: Sweep, points: list[Point],
                budgets: dict[str, float]) -> dict[str, list[str] | None]:
    """point_id -> the workers it must run on (None: any). Raises UsageError when a point fits
    no worker, naming the point, its estimate and the largest per-task budget."""
    if not budgets:
        raise EnvironmentFailure("the Dask cluster has no worker")
    best = max(budgets.values())
    plan: dict[str, list[str] | None] = {}
    for p in points:
        need = p.memory_estimate
        if need > best:
            raise UsageError(
                f"point {p.index} ({describe_point(sweep, p)}) needs about "
                f"{format_size(need)} of worker memory (guest RAM {format_size(p.ram_bytes)}), "
                f"more than any worker gives one task ({format_size(best)}: memory_limit / "
                "nthreads); give the workers more memory or fewer threads")
        fits = [a for a, b in budgets.items() if b >= need]
        plan[p.point_id] = None if len(fits) == len(budgets) else sorted(fits)
    return plan


def run_sweep(sweep: Sweep, out: str | Path, client: Client, *, resume: bool = False,
              progress: Progress | None = None) -> Outcome:
    """Run every point the folder does not hold yet; write results.parquet; return counts."""
    t0 = time.monotonic()
    store = ResultStore(out, sweep, resume=resume)
    done = store.done_ids()
    todo: dict[str, Point] = {}
    for p in sweep.points:
        if p.point_id not in done:
            todo.setdefault(p.point_id, p)  # identical scenarios are one run
    reused = sum(1 for p in sweep.points if p.point_id in done)
    plan = memory_plan(sweep, list(todo.values()),
                       worker_budgets(client.scheduler_info(n_workers=-1)))
    total = len(sweep.points)
    per_id: dict[str, int] = {}  # rows a run fills (identical scenarios are one run)
    for p in sweep.points:
        per_id[p.point_id] = per_id.get(p.point_id, 0) + 1
    n_done = reused
    n_failed = 0
    if progress:
        progress(n_done, n_failed, total)
    futures = []
    for pid, p in todo.items():
        workers = plan[pid]
        futures.append(client.submit(run_point, p.scenario_text, key=f"balloon-hint-{pid}",
                                     workers=workers, allow_other_workers=False, pure=False))
    last_flush = time.monotonic()
    since_flush = 0
    try:
        for fut in as_completed(futures):
            pid = fut.key.removeprefix("balloon-hint-")
            if fut.status == "finished":
                res = fut.result()
            elif fut.status == "cancelled":
                res = failed_result("cancelled (the scheduler lost the task)")
            else:
                e = fut.exception()
                res = failed_result(f"{type(e).__name__}: {e}")
            fut.release()
            store.add(pid, res)
            n_done += per_id[pid]
            if res.get("status") != "ok":
                n_failed += per_id[pid]
            since_flush += 1
            if since_flush >= FLUSH_ROWS or time.monotonic() - last_flush > FLUSH_S:
                store.flush()
                since_flush, last_flush = 0, time.monotonic()
            if progress:
                progress(n_done, n_failed, total)
    except BaseException:
        # interrupted (Ctrl-C) or the scheduler went away: keep what completed for --resume
        client.cancel(futures)
        store.flush()
        raise
    path = store.finish()
    failed = sum(1 for r in store.rows() if r["status"] != "ok")
    return Outcome(path=path, points=total, ran=len(todo), reused=reused, failed=failed,
                   wall_s=time.monotonic() - t0, dropped=store.dropped)


def default_workers() -> int:
    return max(os.cpu_count() or 1, 1)
