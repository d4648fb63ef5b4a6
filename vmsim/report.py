"""Results of simulated migrations and the three ways to show them: a table, JSON, a PNG plot.

``RunResult`` is one migration of one scenario in one hinting mode (the JSON object, key for
key). ``print_table`` puts several modes side by side (one column per mode, one row per
measure); ``migrate_document`` / ``write_json`` make the ``migrate --json`` document (a
``schema_version``, the scenario, whether the run was interrupted, the results: docs/json.md);
``write_plot`` draws, per mode, bytes per round, the simulated time line with the downtime,
pages skipped by hints per round and the totals against the published figures (matplotlib,
imported only when a plot is asked for). ``output_problem`` checks an output path before a run,
so a typo in ``--json``/``--plot`` does not cost the results of a run that took minutes. Every
string that reaches rich (scenario names, descriptions, modes, errors) is escaped: rich reads
``[...]`` as markup.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: Version of the JSON documents balloon-hint writes (docs/json.md); bumped when a field is
#: removed or changes meaning (new fields do not bump it).
SCHEMA_VERSION = 1


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
    # Per round (same length as pages_per_round; the last is the stop-and-copy): bytes put on
    # the wire, pages skipped because they were hinted, and the simulated time the round ended,
    # in microseconds since the migration started (integers: sweep stores them as int lists).
    bytes_per_round: list[int] = field(default_factory=list)
    skipped_per_round: list[int] = field(default_factory=list)
    round_end_us: list[int] = field(default_factory=list)

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
    t = Table(title=escape(title) if title else None)
    t.add_column("")
    for r in results:
        label = r.mode if r.fault is None else f"{r.mode} (fault {r.fault})"
        t.add_column(escape(label), justify="right")
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
        t.add_row("error", *(f"[bold red]{escape(r.error)}[/]" if r.error else ""
                             for r in results))
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


def migrate_document(results: Sequence[RunResult], *, scenario: str, description: str = "",
                     published: dict[str, float] | None = None,
                     interrupted: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The ``migrate --json`` document (docs/json.md)."""
    return {"schema_version": SCHEMA_VERSION, "kind": "migrate", "scenario": scenario,
            "description": description, "published": dict(published or {}),
            "interrupted": interrupted, "results": [r.as_dict() for r in results]}


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write a JSON document; ``-`` is standard output."""
    text = json.dumps(doc, indent=2) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(path).write_text(text, encoding="utf-8")


#: One look per mode, so that lines that coincide stay visible (walk and capture often do).
_STYLE = {"off": dict(color="tab:gray", marker="o", linestyle="-"),
          "walk": dict(color="tab:orange", marker="s", linestyle="--"),
          "capture": dict(color="tab:blue", marker="^", linestyle=":")}
#: The published totals (scenario ``[published]``) and the mode each one is compared with.
_PUBLISHED = (("without_hints_ms", "off", "published, no hints"),
              ("with_hints_ms", "capture", "published, with hints"))


def write_plot(results: Sequence[RunResult], path: str | Path,
               published: dict[str, float] | None = None) -> None:
    """The PNG of ``plot_figure``."""
    import matplotlib.pyplot as plt

    fig = plot_figure(results, published)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_figure(results: Sequence[RunResult], published: dict[str, float] | None = None) -> Any:
    """Four panels, one line (or bar) per mode: bytes sent per round, the simulated time line
    (each round's end, the stop-and-copy's downtime shaded), pages skipped by hints per round,
    and total time with its downtime next to the published totals when the scenario has them.
    Rounds are whole numbers on the axes; coinciding lines keep apart by marker and dash."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_bytes, ax_time), (ax_skip, ax_total) = axes
    n = len(results)
    for k, r in enumerate(results):
        style = _STYLE.get(r.mode, dict(marker="o"))
        # Coinciding series: shift each mode a little sideways so none hides another.
        shift = (k - (n - 1) / 2) * 0.08
        xs = [i + 1 + shift for i in range(len(r.bytes_per_round))]
        ax_bytes.plot(xs, [b / 2**20 for b in r.bytes_per_round], label=r.mode, **style)
        ax_skip.plot(xs, r.skipped_per_round, label=r.mode, **style)
        # Time line: one row per mode, one segment per round (shades alternate), the last
        # (stop-and-copy, the downtime) hatched and labelled.
        ends = [t / 1e6 for t in r.round_end_us]
        starts = [0.0, *ends[:-1]]
        color = style.get("color", "tab:green")
        for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
            last = i == len(ends) - 1
            ax_time.broken_barh([(a, b - a)], (k - 0.35, 0.7), facecolors=color,
                                alpha=0.35 if last else (0.9 if i % 2 == 0 else 0.6),
                                hatch="//" if last else None, edgecolor="black", linewidth=0.5)
        if ends:
            ax_time.annotate(f"{len(ends)} rounds, {r.total_time_s:.2f} s "
                             f"(downtime {r.downtime_s * 1000:.0f} ms)", (ends[-1], k),
                             textcoords="offset points", xytext=(4, -3), fontsize=8)
    for ax in (ax_bytes, ax_skip):
        ax.set_xlabel("round (last = stop-and-copy)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bytes.set_ylabel("MiB sent")
    ax_bytes.set_yscale("symlog")
    ax_bytes.set_title("bytes sent per round")
    ax_skip.set_ylabel("pages")
    ax_skip.set_yscale("symlog")
    ax_skip.set_title("pages skipped by hints per round")
    ax_time.set_xlabel("simulated time since the migration started (s)")
    ax_time.set_yticks(range(n), [r.mode for r in results])
    ax_time.set_ylim(-0.6, n - 0.4)
    ax_time.set_xlim(0, max((r.total_time_s for r in results), default=1.0) * 1.6)
    ax_time.set_title("rounds over time (hatched: stop-and-copy = downtime)")
    # Totals: precopy and downtime stacked per mode, published totals as dashed lines.
    labels = [r.mode for r in results]
    pre = [max(r.total_time_s - r.downtime_s, 0.0) for r in results]
    down = [r.downtime_s for r in results]
    colors = [_STYLE.get(r.mode, {}).get("color", "tab:green") for r in results]
    ax_total.bar(labels, pre, color=colors, alpha=0.8, label="pre-copy")
    ax_total.bar(labels, down, bottom=pre, color=colors, alpha=0.35, hatch="//",
                 label="downtime")
    top = max((r.total_time_s for r in results), default=1.0)
    for key, mode, text in _PUBLISHED:
        if published and key in published and mode in labels:
            x = labels.index(mode)
            y = published[key] / 1000
            ax_total.hlines(y, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
            ax_total.annotate(f"{text}: {y:.2f} s", (x, y), textcoords="offset points",
                              xytext=(0, 3), ha="center", va="bottom", fontsize=8,
                              bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none"))
            top = max(top, y)
    ax_total.set_ylim(0, top * 1.3)
    ax_total.set_ylabel("simulated time (s)")
    ax_total.set_title("total time" + (" vs published" if published else ""))
    for ax in (ax_bytes, ax_time, ax_skip, ax_total):
        ax.grid(True, alpha=0.3)
    ax_bytes.legend()
    ax_total.legend(loc="upper right", fontsize=8, ncol=2)
    scen = results[0].scenario if results else ""
    fig.suptitle(f"pre-copy migration of {scen}")
    fig.tight_layout()
    return fig
