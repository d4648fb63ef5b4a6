"""``balloon-hint migrate``: run a simulated pre-copy migration of a scenario, verify it, report.

With no scenario it runs the embedded default (built-in ``compile-8g``, the published 8 GiB
kernel-compile set-up) in all three hinting modes and prints them side by side. Exit status: 0
when every run verified, 1 when one did not (a fault switched on is expected to do that) or did
not finish (the migration was cancelled by its simulated time budget, ``migration.time_limit``:
"did not converge within N s simulated"), 2 for a bad scenario file or argument.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from vmsim import report
from vmsim.scenario import HINT_MODES, Scenario, ScenarioError, load, load_builtin
from vmsim.vm import FAULTS

HELP = "simulate a pre-copy live migration with free page hinting and verify the destination"

DEFAULT_BUILTIN = "compile-8g"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", metavar="SCENARIO_FILE",
                        help="a scenario TOML file (default: the embedded default scenario)")
    parser.add_argument("--builtin", metavar="NAME",
                        help="a built-in scenario (see `balloon-hint scenarios`)")
    parser.add_argument("--mode", choices=(*HINT_MODES, "all"), default=None,
                        help="hinting mode; default: the scenario's own, or all three for the "
                        "embedded default")
    parser.add_argument("--json", metavar="PATH", help="write the results as a JSON list")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of pages sent per round")
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--fault", choices=FAULTS, default=None,
                        help="inject a host fault (accept-stale-hints: apply hints that arrive "
                        "after a bitmap sync; verification should then fail under churn)")


def _load(args: argparse.Namespace) -> tuple[Scenario, bool]:
    if args.scenario and args.builtin:
        raise ScenarioError(args.scenario, None, None, "give a scenario file or --builtin, "
                            "not both")
    if args.scenario:
        return load(args.scenario), False
    if args.builtin:
        return load_builtin(args.builtin), False
    return load_builtin(DEFAULT_BUILTIN), True


def run(args: argparse.Namespace) -> int:
    from vmsim.vm import run_scenario

    console = Console()
    err = Console(stderr=True)
    # A bad file raises ScenarioError, a UsageError: vmsim.cli prints it on one line (rich
    # would wrap a long one) and exits 2.
    scn, embedded = _load(args)
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (why := report.output_problem(path)):
            err.print(f"[red]error:[/] {opt} {path}: {why}", highlight=False)
            return 2
    mode = args.mode or ("all" if embedded else scn.hinting.mode)
    modes = list(HINT_MODES) if mode == "all" else [mode]
    if scn.guest.page_poison and "walk" in modes:
        err.print("[yellow]warning:[/] the seed's walk hints free pages while they stay free; "
                  "with page poisoning the host skips them and the destination never gets their "
                  "poison, so expect poison violations on hinted pages in mode walk "
                  "(counted apart in the summary)", highlight=False)
    results: list[report.RunResult] = []
    # A progress bar on a terminal; nothing when output is piped (rich disables it there).
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[what]}"),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as prog:
        for m in modes:
            task = prog.add_task(f"{scn.name} [{m}]", total=1.0, what="")

            def progress(frac: float, what: str, _t=task) -> None:
                prog.update(_t, completed=frac, what=what)
            results.append(run_scenario(scn, m, seed=args.seed, fault=args.fault,
                                        progress=progress))
            prog.update(task, completed=1.0)
    title = f"{scn.name}: {scn.description}" if scn.description else scn.name
    report.print_table(results, console, title=title)
    for line in results[0].guest_log if results else ():
        if "precedence" in line:  # the guest did not get the settings the scenario asked for
            err.print(f"guest: {line}", highlight=False)
    try:
        if args.json:
            report.write_json(results, args.json)
        if args.plot:
            report.write_plot(results, args.plot)
    except ImportError:
        err.print("[red]error:[/] --plot needs matplotlib (pip install balloon-hint[plot])")
        return 2
    except OSError as e:
        err.print(f"[red]error:[/] cannot write the results: {e}", highlight=False)
        return 2
    bad = [r for r in results if not r.verified]
    for r in bad:
        if r.error:
            err.print(f"[red]error:[/] mode {r.mode}: {r.error}", highlight=False)
            continue
        why = ""
        if r.poison_violations_from_hints:
            unexplained = r.poison_violations - r.poison_violations_from_hints
            why = (f" ({r.poison_violations_from_hints} on pages the walk hinted: the seed's "
                   f"known loss of poison; {unexplained} otherwise)")
        err.print(f"[red]verification failed[/] for mode {r.mode}: {r.mismatched_pages} "
                  f"mismatched pages, {r.poison_violations} poison violations{why}",
                  highlight=False)
    return 1 if bad else 0


if __name__ == "__main__":
    from vmsim.cli import main
    sys.exit(main(["migrate", *sys.argv[1:]]))
