"""``balloon-hint migrate SCENARIO --host qemu[:PATH]``: the scenario migrated by two real QEMUs
under qtest (``vmsim.qtest.host_migrate``), printed beside the simulator's run of the same
scenario, mode and seed.

Per mode: the simulator runs first (seconds), then QEMU. A guest too large for QEMU under qtest
is scaled down (``--ram``, or 2 GiB by default) and both runs use the scaled scenario; the
output says so. Exit status: 0 when both runs of every mode verified, 1 otherwise (a fault
switched on is expected to do that) or when QEMU's migration did not reach switchover in time,
2 for bad arguments, 130 / 143 when interrupted (the modes that finished are still printed).
"""
from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from protocol.errors import EnvironmentFailure, UsageError
from vmsim import report
from vmsim.qtest.host_migrate import (
    CompareRow,
    QemuRunResult,
    compare_rows,
    qemu_ram_for,
    run_qemu_scenario,
    scale_scenario,
)
from vmsim.qtest.qemu import find_qemu
from vmsim.scenario import Scenario, parse_size

#: Wall-time bound of one QEMU migration when the scenario sets no migration.time_limit.
DEFAULT_TIMEOUT_S = 300.0


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def _fmt(row: CompareRow, v: float) -> str:
    if row.unit == "bytes":
        return f"{v / (1 << 20):,.1f} MiB"
    if row.unit == "ms":
        return f"{v:,.1f} ms"
    return f"{v:,.0f}"


def _rel(row: CompareRow) -> str:
    r = row.rel_diff
    if r is None:
        return "-" if row.qemu == 0 else "n/a (sim 0)"
    return f"{r:+.1%}"


def side_by_side_table(sim: report.RunResult, q: QemuRunResult, title: str) -> Table:
    t = Table(title=escape(title))
    for c, j in (("", "left"), ("simulator", "right"), ("QEMU", "right"),
                 ("QEMU vs sim", "right")):
        t.add_column(c, justify=j)  # type: ignore[arg-type]
    for row in compare_rows(sim, q):
        t.add_row(row.name, _fmt(row, row.simulator), _fmt(row, row.qemu), _rel(row))

    def ok(v: bool) -> str:
        return "[green]yes[/]" if v else "[bold red]NO[/]"
    t.add_row("verified", ok(sim.verified), ok(q.verified), "")
    t.add_row("mismatched pages", f"{sim.mismatched_pages:,}", f"{q.mismatched_pages:,}", "")
    if q.poison_violations or sim.poison_violations:
        t.add_row("poison violations", f"{sim.poison_violations:,}",
                  f"{q.poison_violations:,}", "")
        t.add_row("  of which on hinted pages", f"{sim.poison_violations_from_hints:,}",
                  f"{q.poison_violations_from_hints:,}", "")
    t.add_row("converged", "yes" if sim.converged else "no",
              "no (max_rounds: downtime-limit raised)" if q.forced_switchover else "yes", "")
    t.add_row("our pause before switchover", "", f"{q.pause_ms:,.1f} ms", "")
    t.add_row("QEMU's downtime / total time", "",
              f"{q.downtime_ms:,} / {q.total_time_ms:,} ms", "(pause included)")
    t.add_row("guest page writes via qtest", "", f"{q.pages_written:,}", "")
    t.add_row("guest model lag (max)", "", f"{q.write_lag_s * 1e3:,.1f} ms", "")
    t.add_row("wall time", f"{sim.wall_s:.2f} s", f"{q.wall_s:.2f} s", "")
    if q.error or sim.error:
        t.add_row("error", escape(sim.error or ""), f"[bold red]{escape(q.error or '')}[/]", "")
    return t


def run_qemu(args: argparse.Namespace, scn: Scenario, modes: list[str], console: Console,
             err: Console) -> int:
    from vmsim.vm import run_scenario

    ram = None
    if args.ram is not None:
        try:
            ram = parse_size(args.ram)
        except ValueError as e:
            raise UsageError(f"--ram {args.ram}: {e}") from None
    ram, scaled = qemu_ram_for(scn, ram)
    if scaled:
        scn, _ = scale_scenario(scn, ram)
    qemu = find_qemu(args.host.partition(":")[2] or None)
    if scaled:
        console.print(f"[yellow]note:[/] {escape(scaled)}", highlight=False)
    timeout = scn.migration.time_limit_s or DEFAULT_TIMEOUT_S
    if scn.guest.page_poison and "walk" in modes:
        err.print("[yellow]warning:[/] the seed's walk hints free pages while they stay free; "
                  "with page poisoning the host skips them and the destination never gets their "
                  "poison, so expect poison violations on hinted pages in mode walk, on both "
                  "hosts", highlight=False)
    console.print(f"host: {escape(qemu.check())} under qtest (two QEMUs, unix socket); "
                  f"guest {report._fmt_bytes(scn.guest.ram_bytes)}", highlight=False)
    runs: list[tuple[report.RunResult, QemuRunResult]] = []
    interrupted: _Interrupted | None = None
    running: str | None = None
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for m in modes:
            running = m
            sim = run_scenario(scn, m, seed=args.seed)
            q = run_qemu_scenario(scn, m, seed=args.seed, qemu=qemu, fault=args.fault,
                                  timeout=timeout)
            runs.append((sim, q))
            running = None
            label = m if args.fault is None else f"{m} (fault {args.fault})"
            console.print(side_by_side_table(sim, q, f"{scn.name} [{label}], seed {sim.seed}"))
    except _Interrupted as e:
        interrupted = e
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.json:
        doc = report.migrate_document(
            [sim for sim, _ in runs], scenario=scn.name, description=scn.description,
            published=scn.published,
            interrupted=None if interrupted is None else
            {"signal": signal.Signals(interrupted.signum).name, "during_mode": running})
        doc["qemu"] = qemu_document(runs, qemu.check(), scaled, args.fault)
        try:
            report.write_json(doc, args.json)
        except OSError as e:
            raise EnvironmentFailure(f"cannot write the results: {e}") from None
    if interrupted is not None:
        kept = ", ".join(s.mode for s, _ in runs) or "none"
        print(f"balloon-hint migrate: interrupted by {signal.Signals(interrupted.signum).name}"
              f"{f' during mode {running}' if running else ''}; finished modes kept: {kept}",
              file=sys.stderr)
        return 128 + interrupted.signum
    bad = 0
    for sim, q in runs:
        if q.error:
            err.print(f"[red]error:[/] mode {q.mode}, QEMU: {escape(q.error)}", highlight=False)
            bad += 1
        elif not q.verified:
            first = ", ".join(f"{p:#x}" for p in q.first_mismatches[:4])
            err.print(f"[red]verification failed[/] for mode {q.mode} on QEMU's destination: "
                      f"{q.mismatched_pages} pages in use differ (first pfns {first}), "
                      f"{q.poison_violations} poison violations, {q.source_mismatches} source "
                      "pages differ from the guest model", highlight=False)
            bad += 1
        if not sim.verified:
            err.print(f"[red]verification failed[/] for mode {sim.mode} in the simulator",
                      highlight=False)
            bad += 1
    return 1 if bad else 0


def qemu_document(runs: list[tuple[report.RunResult, QemuRunResult]], version: str,
                  scaled: str | None, fault: str | None) -> dict[str, Any]:
    """The ``qemu`` part of ``migrate --host qemu --json`` (docs/json.md)."""
    return {"version": version, "scaled": scaled, "fault": fault,
            "runs": [{**q.as_dict(), "compare": [r.as_dict() for r in compare_rows(sim, q)]}
                     for sim, q in runs]}
