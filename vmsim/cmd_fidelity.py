"""``balloon-hint fidelity``: simulated vs published migration times and their reductions.

The published figures (Wei Wang's free page hint series as merged in Linux 4.20, with QEMU's
free page hint support; Xeon E5-2699 v4, 4 vCPUs, 100 Gbit/s, 400 ms downtime limit) are stored
in the matching built-in scenarios' ``[published]`` tables. Each scenario is migrated without
hints (mode ``off``) and with them (``capture``, what Linux does), and the reductions
``1 - with / without`` are compared. One figure is the calibration point of the cost model
(``CALIBRATION``: idle-8g without hints, see docs/cost-model.md); ``--calibrate`` re-derives the
calibrated constant from it, so a reader can check the value in ``balloon_dev.host.precopy``.

``--only`` takes built-in names or scenario files: a file must have a ``[published]`` table with
both ``without_hints_ms`` and ``with_hints_ms`` (your own measurements, say). ``--json`` writes a
document with ``schema_version`` and ``kind = "fidelity"`` (docs/json.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

from protocol.errors import UsageError

if TYPE_CHECKING:  # the rest is imported where it is used: --help needs none of it (vmsim.cli)
    from rich.console import Console

    from vmsim.scenario import Scenario

HELP = "compare simulated migration times and hint savings with the published figures"

SCENARIOS = ("idle-8g", "compile-8g", "idle-128g", "compile-128g")
#: Set-ups measured on this project's machine (their [measured] tables): the second table.
MEASURED = ("lab-512m-ioa0", "lab-512m-ioa1")
CALIBRATION = ("idle-8g", "without_hints_ms")  # the one published figure the model is fitted to


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", metavar="NAME|FILE",
                        help="run only these: built-in names (" + ", ".join(SCENARIOS) + "; "
                        "default: all four) or scenario files with a [published] table")
    parser.add_argument("--calibrate", action="store_true",
                        help="re-derive zero_page_s from the calibration point and print it")
    parser.add_argument("--json", metavar="PATH", help="write the comparison as JSON")
    parser.add_argument("--fit-guest-memory", metavar="MIGRATE_CHECK_JSON",
                        help="fit a host profile's guest_memory_bandwidth and "
                        "guest_first_write_s from the capture order of a `migrate-check "
                        "--init-on-alloc 1 --json` run (docs/cost-model.md, 'Host CPU "
                        "contention'); prints them and exits")
    parser.add_argument("--measure-host", action="store_true",
                        help="migrate QEMU under qtest here and fit a host profile "
                        "(docs/cost-model.md, 'Host profiles'); prints it and exits")


def calibrate(console: Console) -> float:
    """Solve total_time(zero_page_s) = published for the calibration point. Every page the
    round sends costs zero_page_s (normal pages add to it), so the time is affine in it with
    slope ~ pages sent; two Newton steps land within a microsecond of simulated time."""
    from balloon_dev.host.precopy import CostModel
    from vmsim.scenario import load_builtin
    from vmsim.vm import run_scenario

    name, key = CALIBRATION
    scn = load_builtin(name)
    target = scn.published[key] / 1000
    cost = CostModel()
    for _ in range(2):
        r = run_scenario(scn, "off", cost=cost)
        c = cost.zero_page_s + (target - r.total_time_s) / r.pages_sent
        cost = dataclasses.replace(cost, zero_page_s=c)
    r = run_scenario(scn, "off", cost=cost)
    console.print(f"calibration: {name} without hints, published {target * 1000:.0f} ms -> "
                  f"zero_page_s = {cost.zero_page_s * 1e6:.4f} us (simulated "
                  f"{r.total_time_s * 1000:.1f} ms; built-in value "
                  f"{CostModel().zero_page_s * 1e6:.4f} us)")
    return cost.zero_page_s


PUBLISHED_KEYS = ("without_hints_ms", "with_hints_ms")


def scenario_for(name: str) -> Scenario:
    """A built-in with published figures, or a scenario file with a [published] table holding
    both; UsageError (exit 2) otherwise."""
    from vmsim.scenario import load, load_builtin

    if name in SCENARIOS:
        return load_builtin(name)
    if not name.endswith(".toml") and "/" not in name:
        raise UsageError(f"--only {name}: not one of the published built-ins ("
                         f"{', '.join(SCENARIOS)}) nor a .toml file")
    scn = load(name)
    missing = [k for k in PUBLISHED_KEYS if k not in scn.published]
    if missing:
        raise UsageError(f"--only {name}: its [published] table needs {', '.join(missing)} "
                         "(milliseconds) to be compared")
    return scn


#: Where a [measured]-style table's figures come from: the real-guest lab runs, or the same
#: set-up's simulated guest migrated by two QEMUs under qtest (`migrate --host qemu`).
MEASURED_SOURCES = {"lab": "measured", "qtest": "measured_qtest"}
MEASURED_NEED = {f"{k}_{m}" for k in ("transferred_bytes", "normal_pages", "zero_pages",
                                      "total_ms") for m in ("off", "hints")}


def measured_row(scn: Scenario, source: str = "lab") -> dict[str, Any]:
    """Simulate a measured set-up without and with hints; pair each figure with the measured
    mean of ``source`` (the [measured] table for lab, [measured_qtest] for qtest)."""
    from vmsim.vm import run_scenario

    m = getattr(scn, MEASURED_SOURCES[source])
    row: dict[str, Any] = {"scenario": scn.name, "source": source, "runs": int(m.get("runs", 0))}
    for mode, key in (("off", "off"), ("capture", "hints")):
        r = run_scenario(scn, mode)
        row[key] = {
            "sim": {"transferred_bytes": r.bytes_sent, "normal_pages": r.pages_sent - r.zero_pages,
                    "zero_pages": r.zero_pages, "total_ms": r.total_time_s * 1000,
                    "downtime_ms": r.downtime_s * 1000},
            "measured": {k: m[f"{k}_{key}"] for k in ("transferred_bytes", "normal_pages",
                                                        "zero_pages", "total_ms", "downtime_ms")
                         if f"{k}_{key}" in m},
            "verified": r.verified}
    for what, k in (("time", "total_ms"), ("bytes", "transferred_bytes")):
        for src in ("sim", "measured"):
            row[f"{what}_cut_{src}"] = 1 - row["hints"][src][k] / row["off"][src][k]
        row[f"{what}_cut_error"] = ((row[f"{what}_cut_sim"] - row[f"{what}_cut_measured"])
                                    / row[f"{what}_cut_measured"])
    return row


def measured_table(console: Console) -> list[dict[str, Any]]:
    """The second table: simulated vs measured on this machine (docs/cost-model.md)."""
    from rich.markup import escape
    from rich.table import Table

    from vmsim.scenario import load_builtin
    scns = [load_builtin(n) for n in MEASURED]
    missing = [s.name for s in scns if not MEASURED_NEED <= set(s.measured)]
    if missing:
        raise UsageError(f"built-in scenarios {', '.join(missing)} lack a complete [measured] "
                         "table")
    # the qtest rows where a scenario has them: an incomplete table is a bad built-in
    partial = [s.name for s in scns if s.measured_qtest
               and not MEASURED_NEED <= set(s.measured_qtest)]
    if partial:
        raise UsageError(f"built-in scenarios {', '.join(partial)} have an incomplete "
                         "[measured_qtest] table")
    rows = [measured_row(s, src) for s in scns for src in MEASURED_SOURCES
            if getattr(s, MEASURED_SOURCES[src])]
    t = Table(title="simulated vs measured here (QEMU 11.1 under TCG; lab: real guest, "
              "balloon-hint migrate-check; qtest: the simulated guest, migrate --host qemu; "
              "mean of the runs)")
    t.add_column("scenario", no_wrap=True)
    t.add_column("source", no_wrap=True)
    for col in ("mode", "sent MiB sim/meas", "normal sim/meas", "zero sim/meas",
                "ms sim/meas", "down ms"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        for key in ("off", "hints"):
            s_, m_ = r[key]["sim"], r[key]["measured"]
            first = key == "off"
            t.add_row(escape(r["scenario"]) if first else "", r["source"] if first else "", key,
                      f"{s_['transferred_bytes'] / 2**20:,.1f} / "
                      f"{m_['transferred_bytes'] / 2**20:,.1f}",
                      f"{s_['normal_pages']:,} / {m_['normal_pages']:,.0f}",
                      f"{s_['zero_pages']:,} / {m_['zero_pages']:,.0f}",
                      f"{s_['total_ms']:,.0f} / {m_['total_ms']:,.0f}",
                      f"{s_['downtime_ms']:,.0f} / "
                      + (f"{m_['downtime_ms']:,.0f}" if "downtime_ms" in m_ else "-"))
    console.print(t)
    c = Table(title="the hint cut, simulated vs measured here")
    c.add_column("scenario", no_wrap=True)
    c.add_column("source", no_wrap=True)
    for col in ("runs", "time cut sim", "meas.", "rel. err", "bytes cut sim", "meas.",
                "rel. err"):
        c.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        cells = [escape(r["scenario"]), r["source"], str(r["runs"])]
        for what in ("time", "bytes"):
            err = r[f"{what}_cut_error"]
            colour = "green" if abs(err) <= 0.10 else "red"
            cells += [f"{r[f'{what}_cut_sim']:.1%}", f"{r[f'{what}_cut_measured']:.1%}",
                      f"[{colour}]{err:+.1%}[/]"]
        c.add_row(*cells)
    console.print(c)
    return rows


def fit_guest_memory_command(path: str, console: Console) -> int:
    """Fit from the first hinted init_on_alloc=1 run of a migrate-check JSON that recorded
    its capture order; 2 (usage) if there is none or the file cannot be read."""
    from rich.markup import escape

    from vmsim.host_measure import fit_guest_memory

    try:
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/] --fit-guest-memory {escape(path)}: {e}", highlight=False)
        return 2
    usable = [r for r in runs if isinstance(r, dict) and r.get("hints", True)
              and r.get("init_on_alloc") == 1 and r.get("capture", {}).get("order")] \
        if isinstance(runs, list) else []
    if not usable:
        console.print(f"[red]error:[/] --fit-guest-memory {escape(path)}: no hinted "
                      "init_on_alloc=1 run with capture.order (migrate-check --hints on "
                      "--init-on-alloc 1 --json)", highlight=False)
        return 2
    # migrate-check's hint poller (a real-time spinner) held one of the machine's 2 CPUs for
    # the whole run when it got its priority: the round's threads shared the other.
    poller = 1 if usable[0]["capture"].get("realtime_poller") else 0
    cores = 2 - poller
    try:
        out = fit_guest_memory(usable[0]["capture"]["order"], cores=cores)
    except ValueError as e:
        console.print(f"[red]error:[/] --fit-guest-memory {escape(path)}: {e}", highlight=False)
        return 2
    console.print(f"guest_memory_bandwidth = {out['guest_memory_bandwidth']:.4g}  # bytes/s\n"
                  f"guest_first_write_s = {out['guest_first_write_s']:.4g}  # seconds per page\n"
                  f"({cores} host CPU{'s' if cores > 1 else ''} shared by 3 busy threads during "
                  f"the round{', the other held by the real-time hint poller' if poller else ''}"
                  "; put them in balloon_dev.host.profiles.PROFILE_VALUES)", highlight=False)
    return 0


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from vmsim import report
    from vmsim.vm import run_scenario

    # the table has nine columns: give it room even when the output is not a terminal
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if args.json and (why := report.output_problem(args.json)):
        console.print(f"[red]error:[/] --json {args.json}: {why}", highlight=False)
        return 2
    if args.fit_guest_memory:
        return fit_guest_memory_command(args.fit_guest_memory, console)
    if args.measure_host:
        from vmsim.host_measure import measure
        from vmsim.host_measure import report as host_report
        console.print(host_report(measure()), highlight=False)
        return 0
    scenarios = [scenario_for(n) for n in args.only or SCENARIOS]  # all checked before a run
    if args.calibrate:
        calibrate(console)
    rows: list[dict[str, Any]] = []
    with console.status("running the published scenarios...") as status:
        for scn in scenarios:
            name = scn.name
            status.update(f"{name}: without hints")
            off = run_scenario(scn, "off")
            status.update(f"{name}: with hints")
            cap = run_scenario(scn, "capture")
            pub_off = scn.published["without_hints_ms"]
            pub_on = scn.published["with_hints_ms"]
            pub_red = 1 - pub_on / pub_off
            sim_off = off.total_time_s * 1000
            sim_on = cap.total_time_s * 1000
            sim_red = 1 - sim_on / sim_off
            rows.append({
                "scenario": name, "published_without_ms": pub_off, "published_with_ms": pub_on,
                "published_reduction": pub_red, "simulated_without_ms": sim_off,
                "simulated_with_ms": sim_on, "simulated_reduction": sim_red,
                "relative_error": (sim_red - pub_red) / pub_red,
                "verified": off.verified and cap.verified,
                "calibration_point": name == CALIBRATION[0] and scn.source.startswith("builtin"),
                "wall_s": off.wall_s + cap.wall_s,
            })
    t = Table(title="total migration time, published (Linux 4.20 + QEMU hinting, E5-2699 v4, "
              "100 Gbit/s, 400 ms) vs simulated")
    t.add_column("scenario", no_wrap=True)
    for col in ("pub. off", "pub. hints", "pub. cut", "sim. off", "sim. hints", "sim. cut",
                "rel. err", "within 10%", "verified"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        err = r["relative_error"]
        colour = "green" if abs(err) <= 0.10 else "red"
        mark = "*" if r["calibration_point"] else ""
        t.add_row(escape(r["scenario"]) + mark, f"{r['published_without_ms']:,.0f}",
                  f"{r['published_with_ms']:,.0f}", f"{r['published_reduction']:.1%}",
                  f"{r['simulated_without_ms']:,.0f}", f"{r['simulated_with_ms']:,.0f}",
                  f"{r['simulated_reduction']:.1%}", f"[{colour}]{err:+.1%}[/]",
                  "yes" if abs(err) <= 0.10 else "[red]no[/]",
                  "yes" if r["verified"] else "[red]NO[/]")
    console.print(t)
    within = sum(abs(r["relative_error"]) <= 0.10 for r in rows)
    console.print(f"{within} of {len(rows)} reductions within 10% relative of the published ones")
    console.print("[dim]times in ms; cut = 1 - hints/off; rel. err = (sim. cut - pub. cut) / pub. "
                  "cut. * calibration point: zero_page_s is fitted to idle-8g's 2970 ms, every "
                  "other figure is a prediction (docs/cost-model.md)[/]")
    measured_rows = [] if args.only else measured_table(console)
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"schema_version": report.SCHEMA_VERSION, "kind": "fidelity",
                           "rows": rows, "measured_rows": measured_rows}, f, indent=2)
        except OSError as e:
            console.print(f"[red]error:[/] cannot write the comparison: {e}", highlight=False)
            return 2
    ok = all(r["verified"] for r in rows) and all(r[k]["verified"] for r in measured_rows
                                                  for k in ("off", "hints"))
    return 0 if ok else 1
