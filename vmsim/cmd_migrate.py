"""``balloon-hint migrate``: run a simulated pre-copy migration of a scenario, verify it, report.

With no scenario it runs the embedded default (built-in ``compile-8g``, the published 8 GiB
kernel-compile set-up) in all three hinting modes and prints them side by side. Exit status: 0
when every run verified, 1 when one did not (a fault switched on is expected to do that) or did
not finish (the migration was cancelled by its simulated time budget, ``migration.time_limit``:
"did not converge within N s simulated"), 2 for a bad scenario file or argument, 130 / 143 when
interrupted by SIGINT (Ctrl-C) / SIGTERM.

Interruption: the modes run one after the other; SIGINT and SIGTERM stop the mode that is
running (its partial run is dropped) and the modes already finished are still printed and
written to ``--json`` / ``--plot``, with one line on standard error saying what was kept. The
JSON document says ``"interrupted": {"signal": ..., "during_mode": ...}`` (docs/json.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

from protocol.errors import EnvironmentFailure, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from vmsim import report
    from vmsim.scenario import Scenario

# The simulator, rich and the report are imported by ``run`` (vmsim.cli: ``--help`` loads only
# what the parser needs). The parser's choices are therefore spelled here; a test keeps them
# equal to vmsim.scenario.HINT_MODES, vmsim.vm.FAULTS and vmsim.qtest.host_migrate.QEMU_FAULTS.
HINT_MODES = ("off", "walk", "capture")
FAULTS = ("accept-stale-hints",)
QEMU_FAULTS = ("hint-in-use",)

log = logging.getLogger(__name__)

HELP = "simulate a pre-copy live migration with free page hinting and verify the destination"

DEFAULT_BUILTIN = "compile-8g"
PLOT_EXTRA = "--plot needs matplotlib: pip install 'balloon-hint[plot]'"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a mode was running (a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in the simulator swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", metavar="SCENARIO_FILE",
                        help="a scenario TOML file (default: the embedded default scenario)")
    parser.add_argument("--builtin", metavar="NAME",
                        help="a built-in scenario (see `balloon-hint scenarios`)")
    parser.add_argument("--mode", choices=(*HINT_MODES, "all"), default=None,
                        help="hinting mode; default: the scenario's own, or all three for the "
                        "embedded default")
    parser.add_argument("--json", metavar="PATH",
                        help="write the results as JSON (docs/json.md); - for standard output")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG: bytes, time line, pages skipped by hints per mode "
                        "(needs the plot extra: pip install 'balloon-hint[plot]')")
    parser.add_argument("--seed", type=int, default=None,
                        help="override the scenario's seed (a whole number >= 0)")
    parser.add_argument("--fault", choices=(*FAULTS, *QEMU_FAULTS), default=None,
                        help="inject a fault (accept-stale-hints, simulated host: apply hints "
                        "that arrive after a bitmap sync; verification should then fail under "
                        "churn. hint-in-use, --host qemu: a broken driver that also hints pages "
                        "in use; the destination check must fail)")
    parser.add_argument("--host", default="sim", metavar="sim|qemu[:PATH]",
                        help="sim: the simulator (default). qemu: the same scenario migrated by "
                        "two real QEMUs under qtest (the lab's QEMU, or PATH to a "
                        "qemu-system-x86_64 >= 8), printed beside the simulator's figures")
    parser.add_argument("--max-work", metavar="UNITS|none", type=_max_work, default=None,
                        help="the simulation's work bound in units of about 1 us of CPU "
                        "(default: vmsim.vm.MAX_SIM_COST, about a minute of CPU; a 1 TiB "
                        "guest compiling a kernel fits in every mode); 'none' lifts it")
    parser.add_argument("--ram", metavar="SIZE", default=None,
                        help="with --host qemu: the guest RAM to run (up to 4GiB; workload sizes "
                        "and rates scale with it). Default: the scenario's, scaled down to 2GiB "
                        "when larger")


def _max_work(text: str) -> float:
    """``--max-work``: a positive number of work units, or ``none`` for no bound."""
    if text.strip().lower() in ("none", "inf"):
        return math.inf
    try:
        units = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of work units: {text!r}") from None
    if not units > 0 or math.isinf(units):
        raise argparse.ArgumentTypeError(f"the work bound must be a positive number: {text!r}")
    return units


def _load(args: argparse.Namespace) -> tuple[Scenario, bool]:
    from vmsim.scenario import ScenarioError, load, load_builtin

    if args.scenario and args.builtin:
        raise ScenarioError(args.scenario, None, None, "give a scenario file or --builtin, "
                            "not both")
    if args.scenario:
        return load(args.scenario), False
    if args.builtin:
        return load_builtin(args.builtin), False
    return load_builtin(DEFAULT_BUILTIN), True


def _check_outputs(args: argparse.Namespace) -> None:
    """Everything that would make the results unwritable, before the run (which can be long)."""
    from vmsim import report

    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed {args.seed}: a seed is a whole number >= 0")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path == "-" and opt == "--json":
            continue
        if path and (why := report.output_problem(path)):
            raise UsageError(f"{opt} {path}: {why}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise EnvironmentFailure(PLOT_EXTRA)
    host, _, path = args.host.partition(":")
    if host not in ("sim", "qemu") or (host == "sim" and path) or (host == "qemu" and _
                                                                 and not path):
        raise UsageError(f"--host {args.host}: sim, qemu or qemu:PATH")
    if host == "sim":
        if args.ram is not None:
            raise UsageError("--ram applies to --host qemu (the simulator runs any size)")
        if args.fault in QEMU_FAULTS:
            raise UsageError(f"--fault {args.fault} needs --host qemu")
    else:
        if args.fault in FAULTS:
            raise UsageError(f"--fault {args.fault} is a fault of the simulated host; with "
                             f"--host qemu: {', '.join(QEMU_FAULTS)}")
        if args.plot:
            raise UsageError("--plot is not available with --host qemu")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from vmsim.vm import run_scenario

    # With --json - the JSON owns standard output and the table goes to standard error.
    console = Console(stderr=args.json == "-")
    err = Console(stderr=True)
    # A bad file raises ScenarioError, a UsageError: vmsim.cli prints it on one line (rich
    # would wrap a long one) and exits 2.
    scn, embedded = _load(args)
    _check_outputs(args)
    mode = args.mode or ("all" if embedded else scn.hinting.mode)
    modes = list(HINT_MODES) if mode == "all" else [mode]
    if args.host.startswith("qemu"):
        from vmsim.cmd_migrate_qemu import run_qemu
        return run_qemu(args, scn, modes, console, err)
    if scn.guest.page_poison and "walk" in modes:
        err.print("[yellow]warning:[/] the seed's walk hints free pages while they stay free; "
                  "with page poisoning the host skips them and the destination never gets their "
                  "poison, so expect poison violations on hinted pages in mode walk "
                  "(counted apart in the summary)", highlight=False)
    results: list[report.RunResult] = []
    interrupted: Interrupted | None = None
    running: str | None = None  # the mode being run, None between modes
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # A progress bar on a terminal; nothing when output is piped (rich disables it there).
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.fields[what]}"), TimeElapsedColumn(), console=err,
                      transient=True, disable=not err.is_terminal) as prog:
            for m in modes:
                running = m
                task = prog.add_task(escape(f"{scn.name} [{m}]"), total=1.0, what="")

                def progress(frac: float, what: str, _t=task) -> None:
                    prog.update(_t, completed=frac, what=escape(what))
                t0 = time.perf_counter()
                bound = {} if args.max_work is None else {"max_cost": args.max_work}
                results.append(run_scenario(scn, m, seed=args.seed, fault=args.fault,
                                            progress=progress, **bound))
                running = None
                log.info("mode %s finished in %.2f s", m, time.perf_counter() - t0)
                prog.update(task, completed=1.0)
    except Interrupted as e:
        interrupted = e
    finally:
        # From here on a second Ctrl-C must not cut the output of what finished.
        for s in old:
            signal.signal(s, signal.SIG_IGN if interrupted else old[s])
    try:
        return _report(args, scn, results, interrupted, running, console, err)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _report(args: argparse.Namespace, scn: Scenario, results: list[report.RunResult],
            interrupted: Interrupted | None, running: str | None, console: Console,
            err: Console) -> int:
    from rich.markup import escape

    from vmsim import report

    title = f"{scn.name}: {scn.description}" if scn.description else scn.name
    if results:
        report.print_table(results, console, title=title)
    for line in results[0].guest_log if results else ():
        if "precedence" in line:  # the guest did not get the settings the scenario asked for
            err.print(f"guest: {escape(line)}", highlight=False)
    for r in results:
        if r.fault == "accept-stale-hints" and r.stale_hints_applied + r.stale_hints_dropped == 0:
            err.print(f"note: mode {r.mode}: 0 stale hints arrived: the fault had nothing to "
                      "act on", highlight=False)
    doc = report.migrate_document(
        results, scenario=scn.name, description=scn.description, published=scn.published,
        interrupted=None if interrupted is None else
        {"signal": signal.Signals(interrupted.signum).name, "during_mode": running})
    try:
        if args.json:
            report.write_json(doc, args.json)
        if args.plot and results:
            report.write_plot(results, args.plot, published=scn.published)
    except OSError as e:
        raise EnvironmentFailure(f"cannot write the results: {e}") from None
    if interrupted is not None:
        kept = ", ".join(r.mode for r in results) or "none"
        when = f"during mode {running}" if running else "between modes"
        print(f"balloon-hint migrate: interrupted by {signal.Signals(interrupted.signum).name} "
              f"{when}; finished modes kept: {kept}", file=sys.stderr)
        return 128 + interrupted.signum
    bad = [r for r in results if not r.verified]
    for r in bad:
        if r.error:
            err.print(f"[red]error:[/] mode {escape(r.mode)}: {escape(r.error)}",
                      highlight=False)
            continue
        why = ""
        if r.poison_violations_from_hints:
            unexplained = r.poison_violations - r.poison_violations_from_hints
            why = (f" ({r.poison_violations_from_hints} on pages the walk hinted: the seed's "
                   f"known loss of poison; {unexplained} otherwise)")
        if r.mismatched_pages and scn.host.dirty_log != "exact":
            why += (f" (the scenario's host dirty log, {scn.host.dirty_log}, loses writes by "
                    "design: docs/qemu-lab.md)")
        err.print(f"[red]verification failed[/] for mode {escape(r.mode)}: "
                  f"{r.mismatched_pages} mismatched pages, {r.poison_violations} poison "
                  f"violations{why}", highlight=False)
    return 1 if bad else 0


if __name__ == "__main__":
    from vmsim.cli import main
    sys.exit(main(["migrate", *sys.argv[1:]]))
