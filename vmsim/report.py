"""Results of simulated migrations and the three ways to show them: a table, JSON, a PNG plot.

``RunResult`` is one migration of one scenario in one hinting mode (the JSON object, key for
key). ``print_table`` puts several modes side by side (one column per mode, one row per
measure), ``write_json`` writes a list of objects, ``write_plot`` draws pages sent per round with
one line per mode (matplotlib, imported only when a plot is asked for). ``output_problem``
checks an output path before a run, so a typo in ``--json``/``--plot`` does not cost the
results of a run that took minutes.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass(slots=True)
class RunResult:
    scenario: str
    mode: str
    guest_ram_bytes: int
    page_size: int
    rounds: int
    pages_sent: int
    zero_pages: int
    pages_skipped_hint: int
    bytes_sent: int
    total_time_s: float
    downtime_s: float
    hint_rounds: int
    hints_received: int
    hinted_pages: int
    stale_hints_dropped: int
    verified: bool
    mismatched_pages: int
    poison_violations: int
    wall_s: float
    converged: bool = True
    seed: int = 0
    fault: str | None = None
    stale_hints_applied: int = 0
    stale_pages_skipped: int = 0    # --fault accept-stale-hints: pages its stale hints skipped
    pages_per_round: list[int] = field(default_factory=list)
    setup_s: float = 0.0            # simulated time of the set-up workload phases
    guest_in_use_pages: int = 0     # at switchover
    guest_held_pages: int = 0       # held by the balloon driver at switchover
    device_counters: dict[str, int] = field(default_factory=dict)
    guest_counters: dict[str, int] = field(default_factory=dict)
    # Poison violations on pages the guest hinted while they stayed free (the seed's walk with
    # page poisoning: the host skips them, the destination never gets their poison).
    poison_violations_from_hints: int = 0
    # The guest's kernel log lines the model produces (memory auto-init at boot).
    guest_log: list[str] = field(default_factory=list)
    # Set when the run did not complete (the migration was cancelled by its time budget): why.
    # Such a run has verified = False without any page checked.
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{n / mult:.2f} {unit}"
    return f"{n} B"


def _fmt_s(t: float) -> str:
    return f"{t * 1000:,.1f} ms" if t < 10 else f"{t:,.2f} s"


ROWS: list[tuple[str, str, Any]] = [
    ("pages sent", "pages_sent", _fmt_int),
    ("zero pages", "zero_pages", _fmt_int),
    ("pages skipped by hints", "pages_skipped_hint", _fmt_int),
    ("bytes sent", "bytes_sent", _fmt_bytes),
    ("rounds", "rounds", str),
    ("total time (simulated)", "total_time_s", _fmt_s),
    ("downtime (simulated)", "downtime_s", _fmt_s),
    ("hint rounds", "hint_rounds", str),
    ("hints received", "hints_received", _fmt_int),
    ("hinted pages", "hinted_pages", _fmt_int),
    ("stale hints dropped", "stale_hints_dropped", _fmt_int),
    ("verified", "verified", lambda v: "[green]yes[/]" if v else "[bold red]NO[/]"),
    ("mismatched pages", "mismatched_pages", _fmt_int),
    ("poison violations", "poison_violations", _fmt_int),
    ("wall time", "wall_s", lambda t: f"{t:.2f} s"),
]


def build_table(results: Sequence[RunResult], title: str | None = None) -> Table:
    t = Table(title=title)
    t.add_column("")
    for r in results:
        label = r.mode if r.fault is None else f"{r.mode} (fault {r.fault})"
        t.add_column(label, justify="right")
    for name, key, fmt in ROWS:
        t.add_row(name, *(fmt(getattr(r, key)) for r in results))
        if key == "poison_violations" and any(r.poison_violations_from_hints for r in results):
            t.add_row("  of which on hinted pages",
                      *(_fmt_int(r.poison_violations_from_hints) for r in results))
    if any(not r.converged for r in results):
        t.add_row("converged", *("yes" if r.converged else
                                 "no (time limit)" if r.error else "no (round limit)"
                                 for r in results))
    if any(r.error for r in results):
        t.add_row("error", *(f"[bold red]{r.error}[/]" if r.error else "" for r in results))
    return t


def print_table(results: Sequence[RunResult], console: Console | None = None,
                title: str | None = None) -> None:
    (console or Console()).print(build_table(results, title))


def output_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be written as an output file (its folder is missing or not
    writable, or it is a folder), or None. Writing can still fail later (a full disk): callers
    catch OSError there too."""
    p = Path(path)
    if p.is_dir():
        return "is a folder"
    parent = p.resolve().parent
    if not parent.is_dir():
        return f"folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"folder {parent} is not writable"
    return None


def write_json(results: Sequence[RunResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n",
                          encoding="utf-8")


def write_plot(results: Sequence[RunResult], path: str | Path) -> None:
    """Pages sent per round, one line per mode (the last point is the stop-and-copy)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs = list(range(1, len(r.pages_per_round) + 1))
        ax.plot(xs, r.pages_per_round, marker="o", label=r.mode)
    ax.set_xlabel("round (last = stop-and-copy)")
    ax.set_ylabel("pages sent")
    ax.set_yscale("symlog")
    scen = results[0].scenario if results else ""
    ax.set_title(f"pre-copy migration of {scen}: pages sent per round")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
