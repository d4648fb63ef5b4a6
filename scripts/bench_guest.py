#!/usr/bin/env python3
"""Benchmark the simulated guest's memory manager: set-up time, allocator operations/s, bulk
pages/s, walk blocks/s and peak RSS, for 8, 64 and 1024 GiB guests (or the sizes given).

Each size runs in its own child process so that its peak RSS is its own. Wall-clock timing is
fine here: this is a script, not the simulation core.

    .venv/bin/python scripts/bench_guest.py            # 8 64 1024
    .venv/bin/python scripts/bench_guest.py 8 64 --ops 100000
    .venv/bin/python scripts/bench_guest.py --migrate FILE.toml --mode capture [--bounded]

Two functions for other scripts (scripts/benchmarks.py): ``measure_allocator(gib, ...)`` and
``measure_migration(path, mode, ...)``, each one child process returning a dict. The second
times ``run_scenario`` as ``balloon-hint migrate FILE --mode MODE`` does, but without the
simulation's work bound (vmsim.vm.MAX_SIM_COST, about a minute of CPU) unless ``bounded``, so
that the timing of a large guest is never cut short. What the bound's units cost in CPU time is
measured by scripts/calibrate_work.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

GiB = 1 << 30


def peak_rss_mib() -> float:
    """This process's peak RSS (MiB): VmHWM, not ru_maxrss, whose figure in a child process
    starts at the parent's peak (exec records the forked image's), so that a small run would
    read as the benchmark script's own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(gib: int, ops: int, with_pages: bool, seed: int) -> dict[str, float]:
    import numpy as np

    from guest_model.buddy import MAX_ORDER, BuddyAllocator
    from guestmem.pages import PageVersions

    out: dict[str, float] = {"gib": gib}
    ram = gib * GiB
    t = time.perf_counter()
    pages = PageVersions(ram >> 12) if with_pages else None
    a = BuddyAllocator(ram, pages=pages, reserved=[(1 << 20, 4 << 20)], seed=seed)
    out["setup_s"] = time.perf_counter() - t
    out["rss_after_setup_mib"] = peak_rss_mib()

    # A walk of the fresh guest: every max-order block once.
    n, dt = _timed_walk(a)
    out["walk_boot_blocks"] = n
    out["walk_boot_blocks_per_s"] = n / dt

    # Mixed single-block operations: orders skewed to small, alloc/free balanced around a pool.
    rng = np.random.default_rng(seed)
    orders = rng.choice(MAX_ORDER, size=ops, p=_order_weights(MAX_ORDER))
    mts = rng.integers(0, 3, size=ops)
    coin = rng.random(ops)
    held: list[tuple[int, int]] = []
    t = time.perf_counter()
    for i in range(ops):
        if held and coin[i] < 0.5:
            j = int(coin[i] * 2 * len(held))
            held[j], held[-1] = held[-1], held[j]
            p, o = held.pop()
            a.free_pages(p, o, cpu=i & 1)
        else:
            o = int(orders[i])
            got = a.alloc_pages(o, int(mts[i]), cpu=i & 1)
            if got is not None:
                held.append((got, o))
    dt = time.perf_counter() - t
    out["ops"] = ops
    out["ops_per_s"] = ops / dt

    # Walk of the fragmented guest.
    n, dt = _timed_walk(a)
    out["walk_frag_blocks"] = n
    out["walk_frag_blocks_per_s"] = n / dt

    # Bulk: a quarter of RAM (at most 16 GiB) as order-0 pages, then freed in bulk
    # (scattered half first, so the second free unlinks millions of order-0 blocks).
    want = min(a.ram_pages // 4, 1 << 22)
    t = time.perf_counter()
    pf = a.alloc_pages_bulk(want)
    dt_a = time.perf_counter() - t
    t = time.perf_counter()
    a.free_pages_bulk(pf[::2])
    a.free_pages_bulk(pf[1::2])
    dt_f = time.perf_counter() - t
    out["bulk_pages"] = int(pf.size)
    out["bulk_alloc_pages_per_s"] = pf.size / dt_a
    out["bulk_free_pages_per_s"] = pf.size / dt_f
    out["peak_rss_mib"] = peak_rss_mib()
    return out


_MIGRATE_CHILD = r"""
import json, resource, sys, time
from bench_guest import peak_rss_mib
from vmsim.scenario import load
from vmsim.vm import MAX_SIM_COST, run_scenario
path, mode, bounded = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
scn = load(path)
t = time.perf_counter()
r = run_scenario(scn, mode, max_cost=MAX_SIM_COST if bounded else float("inf"))
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
gib = scn.guest.ram_bytes / (1 << 30)
print(json.dumps({"scenario": scn.name, "gib": gib, "mode": mode, "wall_s": wall,
                  "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": peak_rss_mib(),
                  "rss_mib_per_gib": peak_rss_mib() / gib, "verified": r.verified,
                  "pages_sent": r.pages_sent, "rounds": r.rounds,
                  "total_time_s": r.total_time_s}))
"""


def _child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), HERE, *filter(None, [os.environ.get("PYTHONPATH")])]))
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}...: failed ({res.returncode})\n"
                           f"{res.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def measure_allocator(gib: int, *, ops: int = 200_000, pages: bool = False,
                      seed: int = 0) -> dict[str, Any]:
    """``one(gib, ...)`` in its own process (its peak RSS is its own)."""
    return _child([sys.executable, os.path.abspath(__file__), "--one", str(gib), "--ops",
                   str(ops), "--seed", str(seed)] + (["--pages"] if pages else []))


def measure_migration(path: str, mode: str, *, bounded: bool = False) -> dict[str, Any]:
    """One migration of scenario file ``path`` in hinting ``mode``, in its own process: wall
    and CPU seconds, peak RSS (MiB, and per simulated GiB), verified, pages sent, rounds."""
    return _child([sys.executable, "-c", _MIGRATE_CHILD, path, mode, "1" if bounded else "0"])


def _timed_walk(allocator: Any) -> tuple[int, float]:
    """Walk every free block once (the seed's walker, from pfn 0): (blocks, seconds)."""
    from guest_model.walk import FreeBlockWalker

    w = FreeBlockWalker(allocator, 0)
    t = time.perf_counter()
    n = 0
    while w.step() is not None:
        n += 1
    return n, time.perf_counter() - t


def _order_weights(k: int) -> list[float]:
    w = [0.7, 0.08, 0.06, 0.05] + [0.11 / (k - 4)] * (k - 4)
    s = sum(w)
    return [x / s for x in w]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[8, 64, 1024], help="guest GiB")
    ap.add_argument("--ops", type=int, default=200_000, help="single alloc/free operations")
    ap.add_argument("--pages", action="store_true", help="also model page contents (PageVersions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--migrate", metavar="FILE", help="time one migrate of this scenario file")
    ap.add_argument("--mode", default="capture", help="with --migrate: off, walk or capture")
    ap.add_argument("--bounded", action="store_true",
                    help="with --migrate: keep the simulation's work bound")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.ops, args.pages, args.seed)))
        return 0
    if args.migrate:
        print(json.dumps(measure_migration(args.migrate, args.mode, bounded=args.bounded)))
        return 0
    rows = []
    for gib in args.sizes:
        try:
            rows.append(measure_allocator(gib, ops=args.ops, pages=args.pages, seed=args.seed))
        except RuntimeError as e:
            print(f"{gib} GiB: {e}", file=sys.stderr)
            return 1
    hdr = ("GiB", "setup s", "ops/s", "walk blk/s (boot)", "walk blk/s (frag)",
           "bulk alloc pg/s", "bulk free pg/s", "peak RSS MiB")
    print("  ".join(f"{h:>18}" for h in hdr))
    for r in rows:
        vals = (r["gib"], f'{r["setup_s"]:.3f}', f'{r["ops_per_s"]:,.0f}',
                f'{r["walk_boot_blocks_per_s"]:,.0f}', f'{r["walk_frag_blocks_per_s"]:,.0f}',
                f'{r["bulk_alloc_pages_per_s"]:,.0f}', f'{r["bulk_free_pages_per_s"]:,.0f}',
                f'{r["peak_rss_mib"]:,.0f}')
        print("  ".join(f"{v:>18}" for v in vals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
