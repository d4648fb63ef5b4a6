#!/usr/bin/env python3
"""Measure what the simulation's work costs in CPU time and fit the work bound's weights
(vmsim.vm.COST_UNITS_PER, MAX_SIM_COST).

Runs a spread of migrations, each in its own forked process, and records for each its work by
kind (``SimVM.work()``: events, fallback steals, hints, pages allocated, freed and written,
churn ticks, pages pre-copy sent) and the CPU seconds it took (set-up phases, migration and
switchover verification; not the imports). Then fits, by non-negative least squares on the
relative error, the CPU microseconds one item of each kind costs, and prints per run the
ratio of the fitted units (fit/CPU) and of the units the current weights give (now/CPU) to its
CPU microseconds.

    .venv/bin/python scripts/calibrate_work.py              # built-ins x modes, 60 campaign
                                                            # scenarios, 1 TiB churn x modes
    .venv/bin/python scripts/calibrate_work.py --quick      # no 1 TiB, 20 campaign scenarios
    .venv/bin/python scripts/calibrate_work.py --json runs.json --jobs 2

The runs: every built-in scenario in every hinting mode; ``--campaign N`` scenarios drawn by
vmsim.campaign (``--campaign-seed``), each in its drawn mode; compile-128g with ``ram`` changed
to ``--tib-gib`` GiB (1 TiB) in every mode, run to the end; three runaway scenarios
(``RUNAWAY``), stopped at a tenth of the current bound. Built-in and campaign runs stop at
``--cap`` times the current bound: a runaway still gives one data point, the work done up to
its stop. Quote CPU seconds on a shared machine; the fit does not depend on wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
from importlib import resources
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from vmsim import campaign  # noqa: E402
from vmsim.scenario import HINT_MODES, builtin_names, loads  # noqa: E402
from vmsim.vm import (  # noqa: E402
    COST_UNITS_PER,
    MAX_SIM_COST,
    WORK_KINDS,
    SimulationTooLong,
    SimVM,
    VMOptions,
    work_cost,
)

MIN_CPU_S = 0.1  # shorter runs are mostly timer and set-up noise: listed, not fitted

# Runaway scenarios, the bound's reason to be: pre-copy never converges under a heavy workload
# with a day allowed (tests/vmsim/test_absurd_scenarios.py's HEAVY; a churn at 25 GiB/s on
# 256 MiB, a guest out of memory: failed allocations and reclaim) and a slow walk over
# fragmented lists. Each is stopped at a tenth of the current bound: the work up to the stop
# is the data point.
RUNAWAY = {
    "runaway-dirty": ("walk", """[guest]
ram = "64MiB"
[[workload]]
kind = "fill"
size = "48MiB"
[[workload]]
kind = "dirty"
during = true
rate = "6GiB/s"
[migration]
bandwidth = "1Gbit/s"
downtime_limit = "1ms"
max_rounds = 10000
time_limit = "24h"
"""),
    "runaway-churn": ("capture", """[guest]
ram = "256MiB"
[[workload]]
kind = "fill"
size = "128MiB"
[[workload]]
kind = "churn"
during = true
rate = "25GiB/s"
[migration]
bandwidth = "1Gbit/s"
downtime_limit = "1ms"
max_rounds = 10000
time_limit = "24h"
"""),
    "slow-walk": ("walk", """[guest]
ram = "128MiB"
[[workload]]
kind = "fill_free"
size = "80MiB"
keep = 0.5
[[workload]]
kind = "churn"
during = true
rate = "64MiB/s"
[migration]
bandwidth = "1Gbit/s"
downtime_limit = "1ms"
max_rounds = 10000
time_limit = "24h"
[hinting]
mode = "walk"
min_order = 0
block_cost = "500us"
"""),
}


def _builtin_text(name: str) -> str:
    return (resources.files("vmsim") / "scenarios" / f"{name}.toml").read_text(encoding="utf-8")


def runs(quick: bool, n_campaign: int, campaign_seed: int, tib_gib: int,
         cap: float) -> list[dict[str, Any]]:
    """The spread of runs: label, scenario text, mode and the work at which to stop it."""
    out = [{"label": f"builtin:{name}", "text": _builtin_text(name), "mode": mode, "cap": cap}
           for name in builtin_names() for mode in HINT_MODES]
    out += [{"label": name, "text": text, "mode": mode, "cap": MAX_SIM_COST / 10}
            for name, (mode, text) in RUNAWAY.items()]
    rng = random.Random(campaign_seed)
    for i in range(n_campaign):
        text = campaign.generate(rng, i, stale_window=i % 4 == 3)
        mode = re.search(r'(?m)^mode = "(\w+)"', text)
        assert mode is not None
        out.append({"label": f"campaign:{campaign_seed}#{i}", "text": text,
                    "mode": mode.group(1), "cap": cap})
    if not quick and tib_gib:
        text, n = re.subn(r'(?m)^ram = "[^"]*"', f'ram = "{tib_gib}GiB"',
                          _builtin_text("compile-128g"))
        if n != 1:
            raise RuntimeError("compile-128g: no single ram line to change")
        out += [{"label": f"compile-128g-as-{tib_gib}g", "text": text, "mode": mode,
                 "cap": math.inf} for mode in HINT_MODES]
    return out


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One run in this (forked) process: its work by kind and its CPU seconds."""
    scn = loads(job["text"], job["label"])
    c0, t0 = time.process_time(), time.perf_counter()
    vm = SimVM(scn, VMOptions(mode=job["mode"], seed=scn.guest.seed, max_cost=job["cap"]))
    stopped = False
    try:
        vm.prepare()
        vm.migrate()
    except SimulationTooLong:
        stopped = True
    return {"label": job["label"], "mode": job["mode"], "stopped": stopped,
            "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
            "ram_gib": scn.guest.ram_bytes / (1 << 30), "work": vm.work()}


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 100) -> np.ndarray:
    """min |a x - b| with x >= 0 (Lawson and Hanson's active set method)."""
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(iters):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max(initial=-np.inf) <= 1e-12 * np.abs(grad).max():
            break
        passive[np.where(~passive)[0][np.argmax(grad[~passive])]] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def fit(results: list[dict[str, Any]]) -> dict[str, float]:
    """CPU microseconds per item of each kind. Least squares on the relative error (units
    proportional to CPU time whatever the run's size), each run weighted by the square root of
    its CPU time: the long runs, the ones near the bound, count more than the sub-second ones,
    whose fixed costs (building the VM) no kind of work accounts for."""
    rows = [r for r in results if r["cpu_s"] >= MIN_CPU_S]
    a = np.array([[r["work"].get(k, 0) for k in WORK_KINDS] for r in rows], dtype=float)
    cpu_us = np.array([r["cpu_s"] * 1e6 for r in rows])
    weight = cpu_us ** -0.5
    w = nnls(a * weight[:, None], cpu_us * weight)
    return {k: float(v) for k, v in zip(WORK_KINDS, w, strict=True)}


def units(weights: dict[str, float], work: dict[str, int]) -> float:
    return sum(weights[k] * work.get(k, 0) for k in WORK_KINDS)


def spread(ratios: list[float]) -> str:
    q = np.quantile(ratios, [0, 0.1, 0.5, 0.9, 1])
    return "min {:.2f}, p10 {:.2f}, median {:.2f}, p90 {:.2f}, max {:.2f}".format(*q)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="no 1 TiB runs")
    ap.add_argument("--campaign", type=int, default=60, metavar="N",
                    help="campaign scenarios to draw (default 60; --quick: 20)")
    ap.add_argument("--campaign-seed", type=int, default=1)
    ap.add_argument("--tib-gib", type=int, default=1024,
                    help="RAM of the large compile-128g churn (GiB; 0: none)")
    ap.add_argument("--cap", type=float, default=1.0,
                    help="stop a built-in or campaign run at this many times the current bound "
                    "(default 1; the 1 TiB runs are not stopped)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU time is per run)")
    ap.add_argument("--json", metavar="PATH", help="write every run (work, CPU s) and the fit")
    ap.add_argument("--refit", metavar="PATH", nargs="+",
                    help="fit the runs of earlier --json files again (no new runs)")
    args = ap.parse_args()
    load = os.getloadavg()
    if args.refit:
        results = []
        for path in args.refit:
            with open(path) as f:
                saved = json.load(f)
            results += saved["runs"]
            load = saved["load_average"]  # the (last) measurement's, not now
    else:
        n_campaign = min(args.campaign, 20) if args.quick else args.campaign
        jobs = runs(args.quick, n_campaign, args.campaign_seed, args.tib_gib,
                    args.cap * MAX_SIM_COST)
        results = []
        # one fresh process per run: no run inherits another's heap or caches
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
            for r in pool.imap(measure, jobs):
                results.append(r)
                print(f"\r{len(results)}/{len(jobs)} {r['label']} {r['mode']}: "
                      f"{r['cpu_s']:.2f} s CPU", end=" " * 20, file=sys.stderr, flush=True)
        print(file=sys.stderr)
        load = os.getloadavg()
    weights = fit(results)
    fitted = [r for r in results if r["cpu_s"] >= MIN_CPU_S]
    print(f"{len(results)} runs, {len(fitted)} of >= {MIN_CPU_S} s CPU fitted, "
          f"{sum(r['cpu_s'] for r in results):.0f} s CPU in all; load average "
          f"{' '.join(f'{x:.2f}' for x in load)} (at the end of the runs)")
    print("CPU us per item (fitted)   current weight (units)")
    for k in WORK_KINDS:
        print(f"  {k:16s} {weights[k]:10.4g}   {COST_UNITS_PER[k]:10.4g}")
    print(f"\n{'run':34s} {'mode':8s} {'CPU s':>7s} {'fit/CPU':>8s} {'now/CPU':>8s}  top kind")
    for r in results:
        cpu_us = r["cpu_s"] * 1e6
        parts = {k: weights[k] * r["work"].get(k, 0) for k in WORK_KINDS}
        top = max(parts, key=lambda k: parts[k])
        cur = work_cost(r["work"])
        flag = (" (stopped)" if r["stopped"]
                else "" if r["cpu_s"] >= MIN_CPU_S else " (not fitted)")
        print(f"{r['label'][:34]:34s} {r['mode']:8s} {r['cpu_s']:7.2f} "
              f"{sum(parts.values()) / cpu_us:8.2f} {cur / cpu_us:8.2f}  "
              f"{top} {parts[top] / max(sum(parts.values()), 1e-9):.0%}{flag}")
    ratios = [units(weights, r["work"]) / (r["cpu_s"] * 1e6) for r in fitted]
    now = [work_cost(r["work"]) / (r["cpu_s"] * 1e6) for r in fitted]
    print(f"\nfitted units / CPU us over the fitted runs: {spread(ratios)}")
    print(f"current weights' units / CPU us: {spread(now)}")
    big = [r for r in fitted if r["cpu_s"] >= 5]
    if big:
        print("runs of >= 5 s CPU, fitted units / CPU us: "
              + spread([units(weights, r["work"]) / (r["cpu_s"] * 1e6) for r in big]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fit_us_per_item": weights, "runs": results,
                       "load_average": load}, f, indent=1)
    return 0 if all(math.isfinite(v) for v in weights.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
