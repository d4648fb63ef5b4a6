"""``balloon-hint scenarios``: list the built-in scenarios shipped in the package (or show one)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from vmsim.scenario import ScenarioError, builtin_names, format_size, load_builtin

HELP = "list the built-in migration scenarios (or print one with --show NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", metavar="NAME", help="print the TOML text of one scenario")


def run(args: argparse.Namespace) -> int:
    # a wide table: give it room even when the output is not a terminal
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if args.show:
        from importlib import resources
        f = resources.files("vmsim") / "scenarios" / f"{args.show}.toml"
        if not f.is_file():
            console.print(f"[red]no built-in scenario {args.show!r}[/]")
            return 2
        print(f.read_text(encoding="utf-8"), end="")
        return 0
    t = Table(title="built-in scenarios (balloon-hint migrate --builtin NAME)")
    t.add_column("name", no_wrap=True)
    for col in ("RAM", "hinting", "bandwidth", "downtime"):
        t.add_column(col, no_wrap=True)
    t.add_column("workloads")
    t.add_column("description", ratio=1)
    for name in builtin_names():
        try:
            s = load_builtin(name)
        except ScenarioError as e:
            t.add_row(name, "", "", "", "", "", f"[red]{e}[/]")
            continue
        wl = ", ".join(w.kind + ("*" if w.during else "") for w in s.workloads)
        t.add_row(name, format_size(s.guest.ram_bytes), s.hinting.mode,
                  f"{s.migration.bandwidth_Bps * 8 / 1e9:g} Gbit/s",
                  f"{s.migration.downtime_limit_s * 1000:g} ms", wl, s.description)
    console.print(t)
    console.print("[dim]* runs during migration[/]")
    return 0
