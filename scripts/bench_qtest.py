#!/usr/bin/env python3
"""QEMU under qtest as a peer (vmsim/qtest): how fast it starts and how much a qtest operation
costs, so the numbers in notes and docs come from a command.

Measures, with the lab's QEMU (or ``--qemu PATH``): the wall time from starting a
``QemuBalloon`` (QEMU + PCI set-up + transport) to a usable device, over ``--starts`` runs; the
round trip of one qtest ``readl`` (sequential) and of the same reads sent as one pipeline;
``b64write`` throughput for 1 MiB blocks; the time for our driver to probe QEMU's balloon; a
hint round of our driver (capture strategy) on an idle guest, from ``hint_start`` to the used
STOP.

Usage: ``scripts/bench_qtest.py [--qemu PATH] [--starts N] [--ops N] [--ram-mib N] [--json]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from guest_model.guest import GuestOptions, SimGuest
from guestmem import PageVersions
from guestmem.clock import Scheduler, SimClock
from vmsim.qtest import QemuBalloon, QtestUnavailable, find_qemu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu", default=None)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--ram-mib", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        q = find_qemu(a.qemu)
    except QtestUnavailable as e:
        print(f"bench_qtest: skipped: {e}")
        return 0
    ram = a.ram_mib << 20
    starts = []
    for _ in range(a.starts):
        t0 = time.monotonic()
        with QemuBalloon(q, ram_bytes=ram):
            starts.append(time.monotonic() - t0)
    out: dict[str, float | int | str] = {"qemu": q.name, "ram_mib": a.ram_mib,
                                         "start_median_s": statistics.median(starts),
                                         "start_max_s": max(starts)}
    with QemuBalloon(q, ram_bytes=ram) as b:
        qt = b.machine.qt
        t0 = time.monotonic()
        for _ in range(a.ops):
            qt.readl(0x100000)
        out["readl_rtt_us"] = (time.monotonic() - t0) / a.ops * 1e6
        t0 = time.monotonic()
        qt.pipeline(["readl 0x100000"] * a.ops)
        out["readl_pipelined_us"] = (time.monotonic() - t0) / a.ops * 1e6
        blk = bytes(range(256)) * 4096
        t0 = time.monotonic()
        for i in range(32):
            qt.b64write(0x1000000 + i * len(blk), blk)
        out["b64write_mib_s"] = 32 / (time.monotonic() - t0)
        sched = Scheduler(SimClock(0.0))
        ops0, t0 = qt.ops, time.monotonic()
        g = SimGuest(b.mem, PageVersions(ram // 4096), sched, b.transport,
                     GuestOptions(ram_bytes=ram, driver_area=(0x100000, 4 << 20), driver={}))
        out["probe_s"] = time.monotonic() - t0
        out["probe_qtest_ops"] = qt.ops - ops0
        d = g.driver
        t0 = time.monotonic()
        b.hint_start()
        while d.counters["stop_sent"] < 1 and time.monotonic() - t0 < 30:
            b.transport.poll_interrupts()
            sched.run_until(sched.now + 1e-3)
        out["hint_round_s"] = time.monotonic() - t0
        out["hinted_mib"] = d.counters["hinted_pages"] * 4096 >> 20
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:22} {v:.4g}" if isinstance(v, float) else f"{k:22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
