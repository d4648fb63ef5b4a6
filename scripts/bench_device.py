#!/usr/bin/env python3
"""Micro-benchmark of the device core's hot paths (one process, no transport).

    .venv/bin/python scripts/bench_device.py [--rounds N]

free_page_vq: a full 1024-entry ring of single-descriptor hints per kick (what a Linux guest
posts during a round); inflateq: 128 buffers of 256 pfns per kick (Linux's largest buffers).
Times only the device's ``notify`` (ring writing by the test harness is excluded).
"""
from __future__ import annotations

import argparse
import logging
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloon_dev.device import DeviceConfig  # noqa: E402
from protocol.balloon import BalloonQueue as Q  # noqa: E402
from tests.balloon_dev.devharness import Harness, cmd, pfn_bytes  # noqa: E402
from vmsim.conformance.rings import WRITE  # noqa: E402


def bench_hints(rounds: int) -> str:
    h = Harness(DeviceConfig(ram_pages=4096))
    h.init()
    h.dev.free_page_start()
    h.post_out(Q.FREE_PAGE, cmd(h.read_cmd_id()))
    h.kick(Q.FREE_PAGE)
    ring = h.rings[Q.FREE_PAGE]
    n = ring.size
    total = 0.0
    for _ in range(rounds):
        for i in range(n):
            ring.set_desc(i, (i % 3) << 22, 0x400000, WRITE)
        for head in range(n):
            h.mem.write(ring.driver + 4 + 2 * (ring.avail_idx % n), struct.pack("<H", head))
            ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        ring.set_avail_idx(ring.avail_idx)
        t = time.perf_counter()
        eff = h.kick(Q.FREE_PAGE)
        total += time.perf_counter() - t
        assert sum(len(e.ranges) for e in eff if hasattr(e, "ranges")) == n
    return (f"free_page_vq: {rounds} kicks x {n} hints: {total / rounds * 1e3:.2f} ms/kick, "
            f"{rounds * n / total / 1e3:.0f} k hints/s")


def bench_inflate(rounds: int) -> str:
    h = Harness(DeviceConfig(ram_pages=1 << 20))
    h.init()
    bufs = 128
    total = 0.0
    for r in range(rounds):
        for i in range(bufs):
            base = (r * bufs + i) * 256
            h.post_out(Q.INFLATE, pfn_bytes(*range(base, base + 256)))
        t = time.perf_counter()
        h.kick(Q.INFLATE)
        total += time.perf_counter() - t
        h._data = 0x200000  # reuse the harness's buffer area
    return (f"inflateq: {rounds} kicks x {bufs} buffers x 256 pfns: "
            f"{total / rounds * 1e3:.2f} ms/kick, {rounds * bufs * 256 / total / 1e6:.2f} M pfns/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(bench_hints(args.rounds))
    print(bench_inflate(min(args.rounds, 30)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
