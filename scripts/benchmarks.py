#!/usr/bin/env python3
"""balloon-hint's benchmark suite: one command, one table, optionally one JSON file.

    scripts/bench [NAME ...] [--json PATH] [--quick] [--list]

Benchmarks (``--list``; all of them when no NAME is given):

  p1          the free page hint path on the host (device notify -> PagesHinted -> migration
              bitmap), queue sizes 1024 and 32768, with struct.iter_unpack and numpy over the
              same descriptor bytes as same-run baselines (scripts/bench_hint_path.py)
  p2          a migration (as `balloon-hint migrate` runs it, without its work bound) of an
              idle and a churning guest (the idle-128g and compile-128g scenarios with only
              the RAM size changed) at 8, 64, 256 and 1024 GiB,
              hinting off and capture: wall time, peak RSS, RSS per GiB, and the growth exponent
              fitted over the sizes (wall ~ GiB^b)
  allocator   the guest's buddy allocator at 64 GiB: ops/s, walk blocks/s (scripts/bench_guest.py)
  vfio-user   kick -> interrupt round trip over vfio-user, no QEMU (scripts/bench_vfio_user.py)
  vhost-user  the same over vhost-user (scripts/bench_vhost_user.py)

Every figure is the median of 5 runs (p2 at 1024 GiB: 2), each p2 run and each allocator run in
its own process so its peak RSS is its own. ``--quick`` is a smoke test (fewer runs, p2 at 8 and
64 GiB only); its figures are not the published ones. The other scripts/bench_*.py scripts
(device, virtqueue, migration, qemu, qtest) still run on their own.

Same-run baselines: p1 runs struct.iter_unpack and numpy over the same descriptor bytes; p2
measures, in a child like its runs, the start-up every run pays (the interpreter and the
simulator's imports) and numpy's fill bandwidth, so figures from two machines can be scaled.
The JSON's ``timing`` gives each benchmark's wall and CPU seconds (its children included) and
the load average before and after it: on a shared machine wall time is mostly the neighbours'.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

NAMES = {
    "p1": "free page hint path on the host, queue sizes 1024 and 32768, vs struct and numpy",
    "p2": "migrate idle and churning guests, 8..1024 GiB, off and capture: wall, peak RSS",
    "allocator": "the guest's buddy allocator at 64 GiB: ops/s, walk blocks/s",
    "vfio-user": "kick -> interrupt round trip over vfio-user (no QEMU)",
    "vhost-user": "kick -> interrupt round trip over vhost-user (no QEMU)",
}
P2_SIZES = (8, 64, 256, 1024)
P2_SCENARIOS = {"idle": "idle-128g", "churn": "compile-128g"}
P2_MODES = ("off", "capture")
#: Targets of issue 10, checked in the summary.
TARGET_P1_DESC_PER_S = 5e6
TARGET_RSS_MIB_PER_GIB = 4.0
TARGET_CHURN_1TIB_S = 60.0


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = 0
    try:
        m2 = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        mem = int(m2.group(1)) // 1024 if m2 else 0
    except OSError:
        pass
    import numpy as np
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem,
            "load_avg_at_start": os.getloadavg(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (every child here is
    waited for), user and system."""
    return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_child(cmd: list[str], timeout: float = 1800) -> str:
    """Run ``cmd`` in its own process (so its peak RSS is its own); its stdout."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)}: no answer within {timeout} s") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


# -- p1 ------------------------------------------------------------------------------------------
def bench_p1(quick: bool) -> list[dict[str, Any]]:
    import logging

    import bench_hint_path
    logging.disable(logging.WARNING)
    return bench_hint_path.run([1024, 32768], runs=3 if quick else 5, kicks=8 if quick else 32)


# -- p2 ------------------------------------------------------------------------------------------
#: One P2 run: what `balloon-hint migrate FILE --mode M` does (load, run, verify), without the
#: CLI's work bound (vmsim.vm.MAX_SIM_COST, about a minute of CPU), so that a slower machine's
#: figures are never cut short. Wall time includes the imports.
_P2_CHILD = r"""
import json, math, resource, sys, time
t = time.perf_counter()
from vmsim.scenario import load
from vmsim.vm import run_scenario
r = run_scenario(load(sys.argv[1]), sys.argv[2], max_cost=math.inf)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (the exec records the
# forked image's), so every run below the benchmark process's own peak read as that peak.
with open("/proc/self/status") as f:
    hwm = [int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")]
print(json.dumps({"verified": r.verified, "error": r.error, "wall_s": wall,
                  "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_mib": (hwm[0] if hwm else ru.ru_maxrss) / 1024}))
"""


#: p2's same-run baseline, in a child as its runs: the start-up every run pays (interpreter and
#: the simulator's imports, CPU seconds) and numpy's fill bandwidth over 1 GiB (GB/s).
_P2_BASELINE_CHILD = r"""
import json, resource, time
from vmsim.scenario import load
from vmsim.vm import run_scenario
ru = resource.getrusage(resource.RUSAGE_SELF)
import numpy as np
a = np.empty(1 << 30, np.uint8)
a.fill(1)
rates = []
for v in range(2, 7):
    t = time.perf_counter()
    a.fill(v)
    rates.append(a.nbytes / (time.perf_counter() - t) / 1e9)
print(json.dumps({"startup_cpu_s": ru.ru_utime + ru.ru_stime,
                  "fill_GB_per_s": sorted(rates)[len(rates) // 2]}))
"""


def p2_baseline(runs: int) -> dict[str, Any]:
    res = [json.loads(run_child([sys.executable, "-c", _P2_BASELINE_CHILD]).strip()
                      .splitlines()[-1]) for _ in range(runs)]
    return medians(res)


def scenario_file(base: str, gib: int, folder: str) -> str:
    show = subprocess.run([sys.executable, "-m", "vmsim", "scenarios", "--show", base],
                          capture_output=True, text=True, cwd=ROOT, check=True).stdout
    text, n = re.subn(r'(?m)^ram = "[^"]*"', f'ram = "{gib}GiB"', show)
    if n != 1:
        raise RuntimeError(f"scenario {base}: no single ram line to change")
    text = re.sub(r'(?m)^name = "[^"]*"', f'name = "{base}-as-{gib}g"', text)
    path = os.path.join(folder, f"{base}-{gib}g.toml")
    Path(path).write_text(text)
    return path


def bench_p2(quick: bool) -> dict[str, Any]:
    sizes = (8, 64) if quick else P2_SIZES
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bh-bench-") as folder:
        for kind, base in P2_SCENARIOS.items():
            for gib in sizes:
                path = scenario_file(base, gib, folder)
                runs = 2 if quick or gib >= 1024 else 5
                for mode in P2_MODES:
                    walls, cpus, rss = [], [], []
                    for _ in range(runs):
                        stdout = run_child([sys.executable, "-c", _P2_CHILD, path, mode])
                        child = json.loads(stdout.strip().splitlines()[-1])
                        if not child["verified"]:
                            raise RuntimeError(f"p2 {kind} {gib} GiB {mode}: not verified "
                                               f"({child['error']})")
                        walls.append(child["wall_s"])
                        cpus.append(child["cpu_s"])
                        rss.append(child["peak_rss_mib"])
                    row = {"workload": kind, "scenario": base, "gib": gib, "mode": mode,
                           "runs": runs, "wall_s": statistics.median(walls),
                           "cpu_s": statistics.median(cpus),
                           "peak_rss_mib": statistics.median(rss),
                           "rss_mib_per_gib": statistics.median(rss) / gib,
                           "walls": walls, "cpus": cpus, "rss": rss}
                    rows.append(row)
                    print(f"  p2 {kind:5} {gib:5} GiB {mode:7}: {row['wall_s']:7.2f} s wall, "
                          f"{row['cpu_s']:7.2f} s CPU, "
                          f"{row['peak_rss_mib']:8.0f} MiB ({row['rss_mib_per_gib']:.2f}/GiB)",
                          flush=True)
    fits = {}
    import numpy as np
    for kind in P2_SCENARIOS:
        for mode in P2_MODES:
            pts = [r for r in rows if r["workload"] == kind and r["mode"] == mode]
            if len(pts) >= 2:
                x = np.log([r["gib"] for r in pts])
                fits[f"{kind}/{mode}"] = {
                    "wall_exponent": float(np.polyfit(x, np.log([r["wall_s"] for r in pts]), 1)[0]),
                    "cpu_exponent": float(np.polyfit(x, np.log([r["cpu_s"] for r in pts]), 1)[0]),
                    "rss_exponent": float(np.polyfit(
                        x, np.log([r["peak_rss_mib"] for r in pts]), 1)[0])}
    return {"rows": rows, "fits": fits, "baseline": p2_baseline(2 if quick else 5)}


# -- allocator and transports ---------------------------------------------------------------------
def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(results)}
    for k, v in results[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in results)
    return out


def bench_allocator(quick: bool) -> dict[str, Any]:
    res = []
    for _ in range(2 if quick else 5):
        out = run_child([sys.executable, str(HERE / "bench_guest.py"), "--one", "64",
                               "--ops", "20000" if quick else "100000"])
        res.append(json.loads(out.strip().splitlines()[-1]))
    return medians(res)


def bench_transport(script: str, quick: bool) -> dict[str, Any]:
    res = []
    for _ in range(2 if quick else 5):
        out = run_child([sys.executable, str(HERE / script), "--json", "--kicks",
                               "300" if quick else "1000"])
        res.append(json.loads(out.strip().splitlines()[-1])["round_trip"])
    return medians(res)


# -- report --------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    lines: list[str] = []
    if "p1" in res:
        import bench_hint_path
        lines += ["### P1: hint path on the host (descriptors/s, median of "
                  f"{res['p1'][0]['runs']} runs)", "", bench_hint_path.table(res["p1"]), ""]
    if "p2" in res:
        lines += ["### P2: one migration, wall, CPU and peak RSS (median of 5 runs, 1 TiB: 2)",
                  "", "| workload | GiB | mode | wall s | CPU s | peak RSS MiB | MiB/GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["p2"]["rows"]:
            lines.append(f"| {r['workload']} | {r['gib']} | {r['mode']} | {r['wall_s']:.2f} | "
                         f"{r['cpu_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['rss_mib_per_gib']:.2f} |")
        lines += ["", "| workload/mode | wall ~ GiB^b | CPU ~ GiB^b | peak RSS ~ GiB^b |",
                  "|---|---|---|---|"]
        for k, f in res["p2"]["fits"].items():
            lines.append(f"| {k} | {f['wall_exponent']:.2f} | {f['cpu_exponent']:.2f} | "
                         f"{f['rss_exponent']:.2f} |")
        if "baseline" in res["p2"]:
            b = res["p2"]["baseline"]
            lines += ["", f"Same-run baseline (median of {b['runs']}): a run's start-up "
                      f"(interpreter and imports) {b['startup_cpu_s']:.2f} s CPU, numpy fill "
                      f"{b['fill_GB_per_s']:.1f} GB/s."]
        lines.append("")
    if "allocator" in res:
        a = res["allocator"]
        lines += [f"### Allocator (64 GiB, median of {a['runs']})", "",
                  "| " + " | ".join(k for k in a if k != "runs") + " |",
                  "|" + "---|" * (len(a) - 1),
                  "| " + " | ".join(f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
                                    for k, v in a.items() if k != "runs") + " |", ""]
    for t in ("vfio-user", "vhost-user"):
        if t in res:
            r = res[t]
            med = next((v for k, v in r.items() if "median" in k), None)
            p90 = next((v for k, v in r.items() if "p90" in k), None)
            lines.append(f"- {t}: kick -> interrupt median {med} us, p90 {p90} us "
                         f"(median of {r['runs']} runs)")
    if "timing" in res:
        lines += ["", "| benchmark | wall s | CPU s (children included) | load average before |",
                  "|---|---|---|---|"]
        for k, t in res["timing"].items():
            lines.append(f"| {k} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | "
                         f"{t['load_avg_before'][0]:.1f} |")
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[str]:
    out = []
    for r in res.get("p1", []):
        ok = r["host_path_desc_per_s"] >= TARGET_P1_DESC_PER_S
        out.append(f"P1 {r['queue_size']} ({r['ring']}): {r['host_path_desc_per_s'] / 1e6:.2f} "
                   f"M desc/s, target 5: {'met' if ok else 'missed'}")
    for r in res.get("p2", {}).get("rows", []):
        if r["gib"] == 1024:
            ok = r["rss_mib_per_gib"] < TARGET_RSS_MIB_PER_GIB
            out.append(f"P2 1 TiB {r['workload']} {r['mode']}: {r['rss_mib_per_gib']:.2f} MiB/GiB,"
                       f" target < 4: {'met' if ok else 'missed'}")
            if r["workload"] == "churn":
                ok = r["wall_s"] < TARGET_CHURN_1TIB_S
                out.append(f"P2 1 TiB churn {r['mode']}: {r['wall_s']:.1f} s wall "
                           f"({r['cpu_s']:.1f} s CPU), target < 60: {'met' if ok else 'missed'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0],
                                 epilog="\n".join(f"  {k:11} {v}" for k, v in NAMES.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    ap.add_argument("--json", metavar="PATH", help="write every figure and the machine here")
    ap.add_argument("--quick", action="store_true", help="a smoke test: fewer runs and sizes")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in NAMES.items():
            print(f"{k:11} {v}")
        return 0
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        ap.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(NAMES)})")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            ap.error(f"--json {args.json}: folder {folder} does not exist")
    names = args.names or list(NAMES)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    res: dict[str, Any] = {"command": "scripts/bench " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
                           "quick": args.quick, "machine": machine(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    failed = []
    for name in names:
        t, cpu, load = time.perf_counter(), cpu_seconds(), os.getloadavg()
        print(f"== {name}", flush=True)
        try:
            if name == "p1":
                res["p1"] = bench_p1(args.quick)
            elif name == "p2":
                res["p2"] = bench_p2(args.quick)
            elif name == "allocator":
                res["allocator"] = bench_allocator(args.quick)
            else:
                res[name] = bench_transport(f"bench_{name.replace('-', '_')}.py", args.quick)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not lose the others
            print(f"{name}: failed: {e}", file=sys.stderr, flush=True)
            res.setdefault("errors", {})[name] = str(e)
            failed.append(name)
        wall = time.perf_counter() - t
        res.setdefault("seconds", {})[name] = wall
        res.setdefault("timing", {})[name] = {
            "wall_s": wall, "cpu_s": cpu_seconds() - cpu, "load_avg_before": load,
            "load_avg_after": os.getloadavg()}
        print(f"   {name}: {wall:.0f} s wall, {res['timing'][name]['cpu_s']:.0f} s CPU "
              f"(load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after)",
              flush=True)
        if args.json:  # after every benchmark, so a later failure loses nothing
            Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    res["total_s"] = time.perf_counter() - t0
    res["total_cpu_s"] = cpu_seconds() - cpu0
    res["targets"] = targets(res)
    print()
    print(markdown(res))
    for line in res["targets"]:
        print(line)
    print(f"total {res['total_s']:.0f} s wall, {res['total_cpu_s']:.0f} s CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    if failed:
        print(f"failed: {', '.join(failed)} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
