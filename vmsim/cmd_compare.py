"""``balloon-hint compare A.json B.json``: two runs' JSON documents side by side.

Theory of operation: both files must be balloon-hint JSON documents of the same ``kind`` and a
``schema_version`` this version reads (docs/json.md). For ``migrate`` documents each hinting mode
present in either file gets a table with one row per measure (the rows of the migrate table):
A, B and the difference B - A (and its ratio to A where A is not zero); rows that are equal are
marked ``=``; the scenario names, descriptions and seeds are compared first, since two runs of
different scenarios are rarely what one meant to compare. For ``conformance`` documents every
requirement id whose verdict differs is listed with both verdicts, then the counts. Exit status
0 when the two runs agree on every compared value, 1 when they differ, 2 for unreadable input.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import UsageError

if TYPE_CHECKING:  # rich is imported where it is used: --help needs none of it (vmsim.cli)
    from rich.console import Console

HELP = "compare two runs' JSON documents (migrate or conformance --json) side by side"

#: kind -> the newest schema_version this code reads.
READS = {"migrate": 1, "conformance": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A.json", help="the first run (the reference)")
    parser.add_argument("b", metavar="B.json", help="the second run")


def load_document(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or "schema_version" not in doc or "kind" not in doc:
        raise UsageError(f"{path}: not a balloon-hint JSON document (no schema_version and "
                         "kind; see docs/json.md)")
    kind, ver = doc["kind"], doc["schema_version"]
    if kind not in READS:
        raise UsageError(f"{path}: kind {kind!r} cannot be compared (comparable: "
                         f"{', '.join(READS)})")
    if not isinstance(ver, int) or ver > READS[kind]:
        raise UsageError(f"{path}: schema_version {ver!r} is newer than this balloon-hint "
                         f"reads ({READS[kind]})")
    return doc


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _delta(a: Any, b: Any) -> str:
    if a == b:
        return "="
    if _num(a) and _num(b):
        d = b - a
        text = f"{d:+,.6g}" if isinstance(d, float) else f"{d:+,}"
        return f"{text} ({d / a:+.1%})" if a else text
    return "differs"


def compare_migrate(a: dict[str, Any], b: dict[str, Any], pa: str, pb: str,
                    console: Console) -> bool:
    """Print the comparison; True if anything compared differs."""
    from rich.markup import escape
    from rich.table import Table

    from vmsim.report import ROWS  # noqa: PLC0415 - the migrate table's rows and formats

    differs = False
    for key in ("scenario", "description"):
        if a[key] != b[key]:
            console.print(f"{key}: A {escape(repr(a[key]))}  B {escape(repr(b[key]))}",
                          highlight=False)
            differs = True
    for doc, path in ((a, pa), (b, pb)):
        if doc.get("interrupted"):
            console.print(f"note: {escape(path)} was interrupted "
                          f"({escape(str(doc['interrupted']))}): only its finished modes",
                          highlight=False)
    by_mode_a = {r["mode"]: r for r in a["results"]}
    by_mode_b = {r["mode"]: r for r in b["results"]}
    modes = list(dict.fromkeys([*by_mode_a, *by_mode_b]))
    for mode in modes:
        ra, rb = by_mode_a.get(mode), by_mode_b.get(mode)
        if ra is None or rb is None:
            console.print(f"mode {escape(mode)}: only in {'B' if ra is None else 'A'}",
                          highlight=False)
            differs = True
            continue
        t = Table(title=escape(f"mode {mode}"))
        for col, justify in (("", "left"), ("A", "right"), ("B", "right"),
                             ("B - A", "right")):
            t.add_column(col, justify=justify)  # type: ignore[arg-type]
        rows = [("seed", "seed", str), *ROWS]
        for name, key, fmt in rows:
            va, vb = ra.get(key), rb.get(key)
            delta = _delta(va, vb)
            if delta != "=" and key != "wall_s":  # wall time is the host's, not the run's
                differs = True
            t.add_row(name, fmt(va) if va is not None else "-",
                      fmt(vb) if vb is not None else "-", delta)
        console.print(t)
    return differs


def compare_conformance(a: dict[str, Any], b: dict[str, Any], console: Console) -> bool:
    from rich.markup import escape

    va = {v["id"]: v["verdict"] for v in a["verdicts"]}
    vb = {v["id"]: v["verdict"] for v in b["verdicts"]}
    differs = False
    for key in ("target", "control"):
        if a.get(key) != b.get(key):
            console.print(f"{key}: A {escape(repr(a.get(key)))}  B {escape(repr(b.get(key)))}",
                          highlight=False)
    for rid in dict.fromkeys([*va, *vb]):
        x, y = va.get(rid, "absent"), vb.get(rid, "absent")
        if x != y:
            console.print(f"{rid}: {x} -> {y}", highlight=False)
            differs = True
    sa, sb = a["summary"], b["summary"]
    console.print("summary: " + ", ".join(f"{k.replace('_', ' ')} {sa[k]} -> {sb[k]}"
                                          for k in sa), highlight=False)
    if not differs:
        console.print("every id has the same verdict", highlight=False)
    return differs


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    a, b = load_document(args.a), load_document(args.b)
    if a["kind"] != b["kind"]:
        raise UsageError(f"{args.a} is a {a['kind']} document, {args.b} a {b['kind']} one")
    console = Console()
    console.print(f"A: {escape(args.a)}\nB: {escape(args.b)}", highlight=False)
    if a["kind"] == "migrate":
        differs = compare_migrate(a, b, args.a, args.b, console)
    else:
        differs = compare_conformance(a, b, console)
    return 1 if differs else 0
