#!/usr/bin/env python3
"""Migrate every built-in scenario (or the named ones) in every hinting mode; print one line per
run with the simulated results, whether it verified, and the wall time it took.

    .venv/bin/python scripts/bench_migration.py [NAME ...] [--modes off walk capture]
"""
from __future__ import annotations

import argparse
import sys
import time

from vmsim.scenario import builtin_names, load_builtin
from vmsim.vm import run_scenario


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="built-in scenarios (default: all)")
    ap.add_argument("--modes", nargs="+", default=["off", "walk", "capture"])
    args = ap.parse_args()
    names = args.names or builtin_names()
    print(f"{'scenario':<16} {'mode':<8} {'pages sent':>11} {'skipped':>11} {'rounds':>6} "
          f"{'total':>10} {'downtime':>9} {'verified':>8} {'wall':>7}")
    bad = 0
    t_all = time.perf_counter()
    for name in names:
        scn = load_builtin(name)
        for mode in args.modes:
            r = run_scenario(scn, mode)
            bad += not r.verified
            print(f"{name:<16} {mode:<8} {r.pages_sent:>11,} {r.pages_skipped_hint:>11,} "
                  f"{r.rounds:>6} {r.total_time_s * 1000:>8,.0f}ms {r.downtime_s * 1000:>7,.1f}ms "
                  f"{'yes' if r.verified else 'NO':>8} {r.wall_s:>6.1f}s", flush=True)
    print(f"{len(names) * len(args.modes)} runs, {bad} not verified, "
          f"{time.perf_counter() - t_all:.0f} s wall")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
