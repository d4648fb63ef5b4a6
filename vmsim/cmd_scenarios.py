"""``balloon-hint scenarios``: list the built-in scenarios shipped in the package (or show one).

The list is laid out for an 80-column terminal or pipe: one line of short, aligned fields per
scenario (name, RAM, hinting mode, link bandwidth, downtime limit), then, indented below it, its
workloads and its description, wrapped to the console's width. A table with the description as a
seventh column squeezed every column into a few characters at 80 columns.
"""
from __future__ import annotations

import argparse
import textwrap
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by run: --help needs neither (vmsim.cli)
    from vmsim.scenario import Scenario

HELP = "list the built-in migration scenarios (or print one with --show NAME)"

_HEADER = ("name", "RAM", "hinting", "bandwidth", "downtime")
_INDENT = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", metavar="NAME", help="print the TOML text of one scenario")


def _fields(name: str, s: Scenario) -> tuple[str, ...]:
    from vmsim.scenario import format_size

    return (name, format_size(s.guest.ram_bytes), s.hinting.mode,
            f"{s.migration.bandwidth_Bps * 8 / 1e9:g} Gbit/s",
            f"{s.migration.downtime_limit_s * 1000:g} ms")


def _workloads(s: Scenario) -> str:
    return ", ".join(w.kind + ("*" if w.during else "") for w in s.workloads) or "(none)"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from vmsim.scenario import Scenario, ScenarioError, builtin_names, load_builtin

    # Console() takes the terminal's width, or 80 columns (COLUMNS if set) when piped.
    console = Console(highlight=False)
    if args.show:
        f = resources.files("vmsim") / "scenarios" / f"{args.show}.toml"
        if not f.is_file():
            console.print(f"[red]no built-in scenario {args.show!r}[/]")
            return 2
        print(f.read_text(encoding="utf-8"), end="")
        return 0
    loaded: list[tuple[str, Scenario | ScenarioError]] = []
    for name in builtin_names():
        try:
            loaded.append((name, load_builtin(name)))
        except ScenarioError as e:
            loaded.append((name, e))
    rows = [_fields(name, s) if isinstance(s, Scenario) else (name,) for name, s in loaded]
    widths = [max(len(r[i]) for r in [_HEADER, *rows] if i < len(r)) for i in range(len(_HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    console.print("built-in scenarios (balloon-hint migrate --builtin NAME)")
    console.print()
    console.print(Text(line(_HEADER), style="bold"), soft_wrap=True)

    def indented(text: str, style: str = "") -> None:
        # Wrapped here rather than by rich, which pads every wrapped line to the widest one.
        width = max(console.width, 40)
        for ln in textwrap.wrap(text, width, initial_indent=" " * _INDENT,
                                subsequent_indent=" " * _INDENT):
            console.print(Text(ln, style=style), soft_wrap=True)

    for (_name, s), cells in zip(loaded, rows, strict=True):
        # soft_wrap: the short fields stay on one line even on a very narrow console
        console.print(Text(line(cells)), soft_wrap=True)
        if isinstance(s, ScenarioError):
            indented(str(s), "red")
            continue
        indented(f"workloads: {_workloads(s)}")
        if s.description:
            indented(s.description, "dim")
    console.print()
    console.print("* runs during migration; scenarios --show NAME prints a scenario's TOML",
                  style="dim")
    return 0
