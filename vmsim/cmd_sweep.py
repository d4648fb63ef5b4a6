"""``balloon-hint sweep``: run every point of a sweep file on Dask, results as Parquet.

By default a ``LocalCluster`` on this machine (``--workers N`` processes of one thread, on
loopback; N defaults to the CPU count); ``--scheduler tcp://HOST:PORT`` uses a running Dask
scheduler and its workers instead (they need balloon-hint installed). The sweep file format is
in ``vmsim/sweep/spec.py``, the results layout in ``vmsim/sweep/store.py``.

Dask and pyarrow are imported only when a sweep runs, so ``balloon-hint --help`` and the other
commands never load them (they are the ``sweep`` extra; without it the command says so, exit 1).
Exit status: 0 when every point completed and every completed run verified, 1 when a point
failed (its row says why) or a run's verification failed, 2 for a bad sweep file or argument,
130 when interrupted (completed rows are kept: ``--resume``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Dask only for the types: the module must not import it (nor rich: --help)
    from dask.distributed import Client
    from rich.console import Console

    from vmsim.sweep.run import Outcome
    from vmsim.sweep.spec import Sweep

HELP = "run a sweep of migration scenarios on Dask (this machine or a cluster); Parquet results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="SWEEP.toml", help="the sweep file (see examples/)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="a running Dask scheduler (default: a local cluster)")
    where.add_argument("--workers", type=int, metavar="N",
                       help="workers of the local cluster (default: the CPU count)")
    parser.add_argument("--out", metavar="DIR",
                        help="results folder (default: SWEEP-results beside the current folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a sweep in --out: points already there are not run again")


def need_sweep_extra() -> None:
    """Dask and pyarrow are an extra: say which, instead of a traceback, when one is absent."""
    import importlib.util

    from protocol.errors import EnvironmentFailure

    missing = [m for m in ("dask", "distributed", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentFailure(f"{', '.join(missing)} not installed: balloon-hint sweep needs "
                                 "the sweep extra (pip install 'balloon-hint[sweep]')")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from protocol.errors import UsageError
    from vmsim.sweep.spec import load_sweep

    err = Console(stderr=True)
    sweep = load_sweep(args.sweep)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: at least 1")
    out = Path(args.out or f"{Path(args.sweep).stem}-results")
    # Dask and pyarrow only now: a bad sweep file is reported without loading either.
    need_sweep_extra()
    from vmsim.sweep.run import connect, default_workers, local_cluster

    # Dask logs its cluster's comings and goings at INFO; shown with -v only.
    root = logging.getLogger().getEffectiveLevel()
    logging.getLogger("distributed").setLevel(root if root < logging.WARNING
                                              else logging.WARNING)
    cluster = None
    if args.scheduler:
        client = connect(args.scheduler)
        where = f"scheduler {args.scheduler}"
    else:
        n = args.workers or default_workers()
        cluster, client = local_cluster(n)
        where = f"a local cluster of {n} worker{'s' if n != 1 else ''}"
    nworkers = len(client.scheduler_info(n_workers=-1)["workers"])
    err.print(f"sweep {sweep.name}: {len(sweep.points)} points on {where} "
              f"({nworkers} worker{'s' if nworkers != 1 else ''}) -> {out}", highlight=False)
    try:
        outcome = _run_with_progress(sweep, out, client, args.resume, err)
    except KeyboardInterrupt:
        err.print(f"interrupted: completed points are kept in {out}; run again with --resume",
                  highlight=False)
        return 130
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    from vmsim.sweep.store import read_results

    rows, _ = read_results(outcome.path)
    bad_verify = [r for r in rows if r["status"] == "ok" and not r["verified"] and not r["error"]]
    err.print(f"{outcome.points} points: {outcome.ran} run, {outcome.reused} already there, "
              f"{outcome.failed} failed; {outcome.wall_s:.1f} s wall; results in "
              f"{outcome.path}", highlight=False)
    if outcome.dropped:
        err.print(f"{outcome.dropped} earlier rows are not points of this sweep: left out "
                  "(the previous results.parquet is kept as results-before-resume.parquet)",
                  highlight=False)
    for r in [r for r in rows if r["status"] != "ok"][:5]:
        err.print(f"[red]failed[/] point {r['point']}: {r['failure']}", highlight=False)
    for r in bad_verify[:5]:
        err.print(f"[red]verification failed[/] point {r['point']}: {r['mismatched_pages']} "
                  f"mismatched pages, {r['poison_violations']} poison violations",
                  highlight=False)
    err.print(f"summary: balloon-hint sweep-report {outcome.path.parent}", highlight=False)
    return 1 if outcome.failed or bad_verify else 0


def _run_with_progress(sweep: Sweep, out: Path, client: Client, resume: bool,
                       err: Console) -> Outcome:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from vmsim.sweep.run import run_sweep

    if err.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("failed {task.fields[failed]}"), TextColumn("ETA"),
                      TimeRemainingColumn(), TimeElapsedColumn(), console=err) as prog:
            tasks: list[TaskID] = []

            def progress(done: int, failed: int, total: int) -> None:
                # the task starts at the points already done (--resume), so that the ETA
                # is estimated from this run's pace only
                if not tasks:
                    tasks.append(prog.add_task(sweep.name, total=total, completed=done,
                                               failed=failed))
                prog.update(tasks[0], completed=done, failed=failed)
            return run_sweep(sweep, out, client, resume=resume, progress=progress)
    # Piped (a log, CI): a plain line every 10% or 30 s, with the same numbers.
    t0 = time.monotonic()
    state: dict[str, float] = {}

    def plain(done: int, failed: int, total: int) -> None:
        now = time.monotonic()
        frac = done / total if total else 1.0
        if not state:
            state.update(first=done, last=frac, at=now)
        elif frac - state["last"] < 0.1 and now - state["at"] < 30 and done != total:
            return
        state["last"], state["at"] = frac, now
        pace = (done - state["first"]) / (now - t0) if now > t0 else 0.0
        eta = f"{(total - done) / pace:.0f} s" if pace > 0 and done < total else "-"
        print(f"{sweep.name}: {done}/{total} done, {failed} failed, ETA {eta}",
              file=sys.stderr, flush=True)
    return run_sweep(sweep, out, client, resume=resume, progress=plain)
