"""Summaries of a sweep's results: tables per axis value, where hinting does not pay, plots.

Savings are paired: a run with hinting (walk or capture) is compared with the run that differs
from it only in ``hinting.mode = "off"`` (same other axis values, same fleet VM, same seed, so
the same guest activity): bytes saved = bytes sent without hints - bytes sent with them, and
time saved likewise. A sweep without ``"off"`` on a ``hinting.mode`` axis has no pair: bytes
saved is then the pages hints kept off the wire (``pages_skipped_hint`` x page size), which
ignores what hinting costs, and no time saved is given; the report says so.

Per axis value the tables give, per hinting mode, the median and the 5th / 95th percentiles
(numpy's linear interpolation) over every run at that value (all other axes, seeds and fleet
VMs pooled) of bytes saved, total migration time and downtime, and the share of paired runs in
which hinting did not pay (total time not shorter than without hints). "Where hinting does not
pay" lists the combinations of axis values (seeds and VMs pooled) whose median time saved or
median bytes saved is not above zero.

Only runs with status ``ok`` count, less those the time limit cancelled (``error`` set: they
never switched over); failed points are counted and their first errors shown. Runs stopped by
the round limit (``converged`` false, no error) did switch over and count.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from vmsim.sweep.evacuation import Evacuation, evacuations

MODE_KEY = "hinting.mode"
CONCURRENCY_KEY = "evacuation.concurrency"


@dataclass(slots=True)
class Paired:
    row: dict[str, Any]
    bytes_saved: float
    time_saved_s: float | None      # None without an off baseline
    bytes_off: float | None


def _mode(r: dict[str, Any]) -> str:
    return str(r.get(MODE_KEY) or r["mode"])


def _pair_key(r: dict[str, Any], axes: Sequence[str]) -> tuple[Any, ...]:
    return (tuple(r.get(a) for a in axes if a != MODE_KEY), r.get("fleet.vm"), r["sweep_seed"])


def pair(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> tuple[list[Paired], bool]:
    """Every completed row with its savings against its off twin; (rows, paired?). A run the
    time limit cancelled (``error`` set: no switchover, bytes and time cut short) is left out,
    as is a hinted run whose off twin was."""
    ok = [r for r in rows if r["status"] == "ok" and not r.get("error")]
    off = {_pair_key(r, axes): r for r in ok if _mode(r) == "off"}
    paired = MODE_KEY in axes and bool(off)
    out = []
    for r in ok:
        if paired:
            base = off.get(_pair_key(r, axes))
            if base is None:
                continue
            out.append(Paired(r, float(base["bytes_sent"] - r["bytes_sent"]),
                              float(base["total_time_s"] - r["total_time_s"]),
                              float(base["bytes_sent"])))
        else:
            out.append(Paired(r, float(r["pages_skipped_hint"] * r["page_size"]), None, None))
    return out, paired


def _stats(xs: Sequence[float]) -> tuple[float, float, float] | None:
    if not xs:
        return None
    a = np.asarray(xs, dtype=np.float64)
    p5, med, p95 = np.percentile(a, [5, 50, 95])
    return float(med), float(p5), float(p95)


def _fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult:
            return f"{sign}{n / mult:.2f} {unit}"
    return f"{sign}{n:.0f} B"


def _fmt_s(t: float) -> str:
    return f"{t * 1000:.1f} ms" if abs(t) < 10 else f"{t:.2f} s"


@dataclass(frozen=True, slots=True)
class Unit:
    """One unit for a whole column (named in its header), so cells are only numbers."""
    name: str
    mult: float

    def fmt(self, x: float) -> str:
        v = x / self.mult
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _unit(values: Sequence[float], kind: str) -> Unit:
    big = max((abs(v) for v in values), default=0.0)
    if kind == "bytes":
        for name, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
            if big >= mult:
                return Unit(name, float(mult))
        return Unit("KiB", 1024.0)
    return Unit("s", 1.0) if big >= 10 else Unit("ms", 1e-3)


def _fmt_stats(s: tuple[float, float, float] | None, u: Unit) -> str:
    if s is None:
        return "-"
    med, p5, p95 = s
    return f"{u.fmt(med)} ({u.fmt(p5)}..{u.fmt(p95)})"


@dataclass(slots=True)
class Cell:
    runs: int
    bytes_saved: tuple[float, float, float] | None
    total_time: tuple[float, float, float] | None
    downtime: tuple[float, float, float] | None
    not_paid: float | None           # share of paired runs where hinting did not save time
    time_saved: tuple[float, float, float] | None


def _cell(ps: Sequence[Paired], paired: bool) -> Cell:
    ts = [p.time_saved_s for p in ps if p.time_saved_s is not None]
    hinted = [p for p in ps if _mode(p.row) != "off"]
    return Cell(
        runs=len(ps),
        bytes_saved=_stats([p.bytes_saved for p in ps]),
        total_time=_stats([float(p.row["total_time_s"]) for p in ps]),
        downtime=_stats([float(p.row["downtime_s"]) for p in ps]),
        not_paid=(sum(1 for p in hinted if (p.time_saved_s or 0.0) <= 0) / len(hinted)
                  if paired and hinted else None),
        time_saved=_stats(ts) if paired else None)


def _stats_table(title: str, heads: Sequence[str],
                 cells: Sequence[tuple[Sequence[str], str, Cell]]) -> Table:
    """One row per (labels, mode, cell); each measure's unit chosen once for its column."""
    def vals(get: Any) -> list[float]:
        # the unit that suits the medians (a far p95 may then take more digits)
        return [st[0] for _, _, c in cells if (st := get(c)) is not None]
    ub = _unit(vals(lambda c: c.bytes_saved), "bytes")
    ut = _unit(vals(lambda c: c.total_time), "time")
    ud = _unit(vals(lambda c: c.downtime), "time")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=0, caption="median (5th..95th percentile)",
              caption_justify="left")
    for h in heads:
        t.add_column(h, justify="left", no_wrap=True)
    for col in ("mode", "runs", f"bytes saved\n{ub.name}", f"total time\n{ut.name}",
                f"downtime\n{ud.name}", "not\npaid"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
    for labels, m, c in cells:
        t.add_row(*labels, m, str(c.runs),
                  "-" if m == "off" else _fmt_stats(c.bytes_saved, ub),
                  _fmt_stats(c.total_time, ut), _fmt_stats(c.downtime, ud),
                  "-" if c.not_paid is None or m == "off" else f"{c.not_paid:.0%}")
    return t


def axis_tables(desc: dict[str, Any], ps: Sequence[Paired], paired: bool) -> list[Table]:
    """Per axis (but hinting.mode, which the overall table already splits by), one row per
    axis value and mode."""
    tables = []
    modes = _modes(ps)
    for ax in desc["axes"]:
        key = ax["key"]
        if key == MODE_KEY:
            continue
        cells = []
        for v in ax["values"]:
            for m in modes:
                sel = [p for p in ps if _same(p.row.get(key), v) and _mode(p.row) == m]
                if sel:
                    cells.append(([str(v)], m, _cell(sel, paired)))
        tables.append(_stats_table(f"by {key}", ["value"], cells))
    return tables


def _same(stored: Any, declared: Any) -> bool:
    # axis columns of mixed types are stored as text (store._axis_value)
    return stored == declared or (isinstance(stored, str) and not isinstance(declared, str)
                                  and stored == str(declared))


def _modes(ps: Sequence[Paired]) -> list[str]:
    seen = {_mode(p.row) for p in ps}
    return [m for m in ("off", "walk", "capture") if m in seen]


def not_paying(desc: dict[str, Any], ps: Sequence[Paired]) -> list[tuple[str, str, Cell]]:
    """(axis values, mode, cell) for every combination where hinting's median time saved or
    median bytes saved is not above zero (paired sweeps only)."""
    keys = [a["key"] for a in desc["axes"] if a["key"] != MODE_KEY]
    groups: dict[tuple[Any, ...], list[Paired]] = {}
    for p in ps:
        if _mode(p.row) == "off":
            continue
        groups.setdefault((tuple(str(p.row.get(k)) for k in keys), _mode(p.row)),
                          []).append(p)
    out = []
    for (vals, mode), sel in groups.items():
        c = _cell(sel, True)
        if (c.time_saved and c.time_saved[0] <= 0) or (c.bytes_saved and c.bytes_saved[0] <= 0):
            where = ", ".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True)) or "(all)"
            out.append((where, mode, c))
    return out


def evacuation_table(desc: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Table | None:
    ev = desc.get("evacuation")
    if not ev:
        return None
    evs = evacuations([r for r in rows], len(desc.get("fleet", [])))
    t = Table(title=f"host evacuation: {len(desc['fleet'])} VMs over one {ev['link']} link, "
              "k at a time (link shared equally: an approximation, vmsim/sweep/evacuation.py)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=0)
    for col in ("k", "mode", "seeds", "evacuation time\n(simulated)",
                "bytes sent\nmedian", "longest\ndowntime", "time\nvs off"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    by: dict[tuple[int, str], list[Evacuation]] = {}
    for e in evs:
        by.setdefault((e.k, e.mode), []).append(e)
    off_med: dict[int, float] = {}
    for (k, mode), es in sorted(by.items(), key=lambda kv: (kv[0][0], _mode_order(kv[0][1]))):
        done = [e.time_s for e in es if e.time_s is not None]
        med = float(np.median(done)) if done else None
        if mode == "off" and med is not None:
            off_med[k] = med
        if med is None:
            timecol = f"n/a ({es[0].problem})"
        else:
            timecol = f"{med:.2f} s" + (f" ({min(done):.2f}..{max(done):.2f})"
                                        if len(done) > 1 else "")
            if len(done) < len(es):
                timecol += f" ({len(es) - len(done)} incomplete)"
        vs = "-" if mode == "off" or med is None or k not in off_med \
            else f"{(med - off_med[k]) / off_med[k]:+.0%}"
        t.add_row(str(k), mode, str(len(es)), timecol,
                  _fmt_bytes(float(np.median([e.bytes_sent for e in es]))),
                  _fmt_s(max(e.max_downtime_s for e in es)), vs)
    return t


def _mode_order(m: str) -> int:
    return {"off": 0, "walk": 1, "capture": 2}.get(m, 3)


def print_report(rows: Sequence[dict[str, Any]], desc: dict[str, Any],
                 console: Console) -> None:
    axes = [a["key"] for a in desc["axes"]]
    ps, paired = pair(rows, axes)
    failed = [r for r in rows if r["status"] != "ok"]
    unverified = [r for r in rows if r["status"] == "ok" and not r["verified"]
                  and not r["error"]]
    unconverged = [r for r in rows if r["status"] == "ok" and not r["converged"]]
    cancelled = [r for r in unconverged if r["error"]]
    console.print(f"[bold]sweep {desc['name']}[/]: {len(rows)} runs, {len(failed)} failed, "
                  f"{len(unconverged)} did not converge ({len(cancelled)} of them cancelled by "
                  f"the time limit: left out below), {len(unverified)} failed verification")
    if desc.get("description"):
        console.print(desc["description"], style="dim")
    if paired:
        console.print("bytes / time saved: against the same point with hinting.mode = off "
                      "(same seed, same VM); 'not paid': hinted runs whose total time was not "
                      "shorter", style="dim")
    else:
        console.print("no hinting.mode = \"off\" runs to pair with: bytes saved = pages "
                      "skipped by hints x page size (hinting's own costs not counted)",
                      style="dim")
    console.print(_stats_table("all runs", [], [
        ((), m, _cell([p for p in ps if _mode(p.row) == m], paired)) for m in _modes(ps)]))
    for t in axis_tables(desc, ps, paired):
        console.print(t)
    if paired:
        bad = not_paying(desc, ps)
        hinted = [p for p in ps if _mode(p.row) != "off"]
        n_bad = sum(1 for p in hinted if (p.time_saved_s or 0.0) <= 0)
        console.print(f"[bold]where hinting does not pay[/]: {n_bad} of {len(hinted)} hinted "
                      f"runs took at least as long as without hints; {len(bad)} point(s) by "
                      "median:")
        if bad:
            ut = _unit([x for _, _, c in bad for x in (c.time_saved or ())], "time")
            ub = _unit([x for _, _, c in bad for x in (c.bytes_saved or ())], "bytes")
            t = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=0,
                      caption="median (5th..95th percentile)", caption_justify="left")
            for col in ("point (seeds and VMs pooled)", "mode", "runs",
                        f"time saved\n{ut.name}", f"bytes saved\n{ub.name}"):
                t.add_column(col, justify="left" if col[:5] in ("point", "mode") else "right")
            bad.sort(key=lambda b: (b[2].time_saved or (0.0,))[0])
            for where, mode, c in bad[:30]:
                t.add_row(where, mode, str(c.runs), _fmt_stats(c.time_saved, ut),
                          _fmt_stats(c.bytes_saved, ub))
            console.print(t)
            if len(bad) > 30:
                console.print(f"... and {len(bad) - 30} more")
    ev = evacuation_table(desc, rows)
    if ev is not None:
        console.print(ev)
    if failed:
        console.print(f"[red]{len(failed)} failed point(s)[/], first errors:")
        for r in failed[:5]:
            console.print(f"  point {r['point']}: {r['failure']}", highlight=False)


def write_plot(rows: Sequence[dict[str, Any]], desc: dict[str, Any], path: str | Path) -> None:
    """The distribution of savings, savings against each axis, and the evacuation time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    axes_keys = [a["key"] for a in desc["axes"]]
    ps, paired = pair(rows, axes_keys)
    hinted_modes = [m for m in _modes(ps) if m != "off"] or _modes(ps)

    def share(p: Paired) -> float:
        # savings as a share of what the migration sends without hints (or of guest RAM)
        denom = p.bytes_off if p.bytes_off else float(p.row["guest_ram_bytes"])
        return 100.0 * p.bytes_saved / denom if denom else 0.0

    plot_axes = [a for a in desc["axes"] if a["key"] not in (MODE_KEY,)]
    n = 1 + len(plot_axes) + (1 if desc.get("evacuation") else 0)
    cols = 2 if n > 1 else 1
    nrows = (n + cols - 1) // cols
    fig, grid = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.8 * nrows), squeeze=False)
    flat = list(grid.flat)
    what = "bytes saved (% of bytes sent without hints)" if paired else \
        "bytes kept off the wire by hints (% of guest RAM)"
    ax0 = flat[0]
    by_mode = {m: [share(p) for p in ps if _mode(p.row) == m] for m in hinted_modes}
    every = [x for xs in by_mode.values() for x in xs]
    # one set of bins for all modes, so their bars compare
    edges = np.histogram_bin_edges(every, bins=30) if every else 30
    for m, xs in by_mode.items():
        if xs:
            ax0.hist(xs, bins=edges, alpha=0.55, label=f"{m} ({len(xs)} runs)")
    ax0.axvline(0, color="k", lw=0.8)
    ax0.set_xlabel(what)
    ax0.set_ylabel("runs")
    ax0.set_title("distribution of savings")
    ax0.legend()
    for ax, spec in zip(flat[1:], plot_axes, strict=False):
        key, values = spec["key"], spec["values"]
        x = np.arange(len(values))
        for m in hinted_modes:
            med, lo, hi = [], [], []
            for v in values:
                s = _stats([share(p) for p in ps if _mode(p.row) == m
                            and _same(p.row.get(key), v)])
                med.append(s[0] if s else np.nan)
                lo.append(s[1] if s else np.nan)
                hi.append(s[2] if s else np.nan)
            ax.plot(x, med, marker="o", label=f"{m} median")
            ax.fill_between(x, lo, hi, alpha=0.2, label=f"{m} p5..p95")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [str(v) for v in values], rotation=30 if len(values) > 6 else 0)
        ax.set_xlabel(key)
        ax.set_ylabel("bytes saved (%)")
        ax.set_title(f"savings against {key}")
        ax.legend(fontsize="small")
    used = 1 + len(plot_axes)
    if desc.get("evacuation"):
        ax = flat[used]
        evs = evacuations(rows, len(desc.get("fleet", [])))
        ks = sorted({e.k for e in evs})
        for m in ("off", "walk", "capture"):
            ys = []
            for k in ks:
                done = [e.time_s for e in evs if e.mode == m and e.k == k and e.time_s is not None]
                ys.append(float(np.median(done)) if done else np.nan)
            if any(not np.isnan(y) for y in ys):
                ax.plot(ks, ys, marker="o", label=m)
        ax.set_xlabel("migrations at a time (k)")
        ax.set_ylabel("evacuation time, s (simulated)")
        ax.set_title(f"evacuating {len(desc['fleet'])} VMs over {desc['evacuation']['link']}")
        ax.set_xticks(ks)
        ax.legend()
        used += 1
    for ax in flat[used:]:
        ax.set_visible(False)
    fig.suptitle(f"sweep {desc['name']}: {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
