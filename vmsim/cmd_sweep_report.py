"""``balloon-hint sweep-report``: summary tables (and plots) of a sweep's results folder.

The tables and what "bytes saved" and "does not pay" mean are in ``vmsim/sweep/report.py``; the
host evacuation model in ``vmsim/sweep/evacuation.py``. pyarrow is imported only when the command
runs. Exit status: 0; 1 without the sweep extra; 2 for a folder without sweep results or an
unwritable --plot path.
"""
from __future__ import annotations

import argparse

HELP = "summarise a sweep's results: savings, time and downtime per axis value, plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="DIR",
                        help="a sweep's results folder (or its results.parquet)")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG: distribution of savings, savings against each axis")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from protocol.errors import UsageError
    from vmsim import report as run_report
    from vmsim.cmd_sweep import need_sweep_extra

    need_sweep_extra()
    from vmsim.sweep.report import print_report, write_plot
    from vmsim.sweep.store import read_results

    if args.plot and (why := run_report.output_problem(args.plot)):
        raise UsageError(f"--plot {args.plot}: {why}")
    rows, desc = read_results(args.results)
    print_report(rows, desc, Console())
    if args.plot:
        try:
            write_plot(rows, desc, args.plot)
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install balloon-hint[plot])") from None
        except OSError as e:
            raise UsageError(f"--plot {args.plot}: cannot write: {e}") from None
        Console(stderr=True).print(f"plot: {args.plot}", highlight=False)
    return 0
