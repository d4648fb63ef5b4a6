#!/usr/bin/env python3
"""P1: the free page hint path on the host, in descriptors per second.

    .venv/bin/python scripts/bench_hint_path.py [--sizes 1024,32768] [--runs N] [--json PATH]

What is timed, per kick: ``BalloonDevice.notify`` on a free_page_vq whose whole ring holds 4 MiB
writable hint buffers, the ``PagesHinted`` effects handed to a running
``PrecopyMigration`` and the host's hint thread applying them (bits cleared in ``to_send``).
Writing the ring (the guest's work) is not timed. Three rings:

- ``distinct``: every descriptor names another 4 MiB block, adjacent blocks in address order, as
  a guest hinting a large free memory sends them (the simulated guest: 99.9% of the blocks of a
  batch are adjacent to another one, measured on idle-128g and compile-128g at 8 GiB);
- ``scattered``: distinct blocks in random order over RAM (the worst case for the clear: no two
  of a kick adjacent, one row of the bitmap each);
- ``3 blocks``: the descriptors cycle over three blocks (the ring issue 10 first measured).

Before each kick (not timed) the bits of the blocks that kick hints are set again, so every hint
clears real bits; only those bits are written, so the timed kick does not start with caches that
a RAM-sized bitmap write has just flushed (that costs about 70 us a kick at size 1024).

Baselines over the same descriptor bytes, measured in the same process: ``struct.iter_unpack
('<QIHH')`` (decode only) and numpy (decode, the V-7/V-8/flag checks a plain hint needs, and the
bitmap clear for the hinted pages), so the figures that hold on a shared machine are the ratios.
Each figure is the median of ``--runs`` runs of ``--kicks`` kicks, in descriptors per second of
the process's CPU time (``time.process_time``), for all three alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloon_dev.device import BalloonDevice, DeviceConfig  # noqa: E402
from balloon_dev.effects import PagesHinted  # noqa: E402
from balloon_dev.host.precopy import MigrationParams, PrecopyMigration  # noqa: E402
from guestmem import DirtyLog, GuestMemory, PageVersions  # noqa: E402
from guestmem.clock import Scheduler  # noqa: E402
from protocol.balloon import QEMU_QUEUE_SIZE, BalloonQueue  # noqa: E402
from protocol.virtio import DeviceStatus  # noqa: E402
from protocol.virtqueue import DESC_DTYPE, VIRTQ_DESC_F_WRITE  # noqa: E402
from vmsim.conformance.rings import RawRing  # noqa: E402

#: Rates are per second of this process's CPU time: on a shared machine, wall time measures the
#: neighbours as much as the code (the baselines use the same clock).
clock = time.process_time
BLOCK = 4 << 20                 # one order-10 block, what Linux hints
BLOCK_PAGES = BLOCK >> 12
RING_GPA = 1 << 30              # the byte-backed area holding the rings (RAM itself is modelled)
RING_AREA = 2 << 20


class HostPath:
    """A device with only its free_page_vq in use, in a hint round, wired to a migration."""

    def __init__(self, qsize: int, ram_pages: int) -> None:
        self.mem = GuestMemory()
        self.mem.add_region(RING_GPA, bytearray(RING_AREA), "rings")
        sizes = (QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, QEMU_QUEUE_SIZE, qsize, 32)
        self.dev = BalloonDevice(self.mem, DeviceConfig(queue_sizes=sizes, ram_pages=ram_pages))
        d = self.dev
        st = DeviceStatus
        d.write_status(int(st.ACKNOWLEDGE))
        d.write_status(int(st.ACKNOWLEDGE | st.DRIVER))
        d.write_driver_features(d.device_features)
        d.write_status(int(st.ACKNOWLEDGE | st.DRIVER | st.FEATURES_OK))
        self.q = d.queue_layout()[BalloonQueue.FREE_PAGE]
        self.ring = RawRing.layout(self.mem, RING_GPA, qsize)
        d.set_queue(self.q, qsize, self.ring.desc, self.ring.driver, self.ring.device)
        d.enable_queue(self.q)
        d.write_status(int(st.ACKNOWLEDGE | st.DRIVER | st.FEATURES_OK | st.DRIVER_OK))
        self.size = qsize
        self.avail = 0
        # the migration, in its first round, its hint round open
        log = DirtyLog(ram_pages)
        self.sched = Scheduler()
        self.mig = PrecopyMigration(PageVersions(ram_pages, log), log, self.sched,
                                    MigrationParams())
        self.mig.start()
        # the round: the host starts it, the driver's start buffer (one readable descriptor)
        d.free_page_start()
        cmd = d.hint.cmd_id
        self.mem.write(RING_GPA + RING_AREA - 4096, struct.pack("<I", cmd))
        self.ring.set_desc(0, RING_GPA + RING_AREA - 4096, 4, 0)
        self._publish(np.zeros(1, np.uint16))
        d.notify(self.q)

    def _publish(self, heads: np.ndarray) -> None:
        n = heads.size
        slots = (self.avail + np.arange(n)) % self.size
        ring = self.mem.array(self.ring.driver + 4, "<u2", self.size, writable=True)
        ring[slots] = heads
        self.avail = (self.avail + n) & 0xFFFF
        self.ring.set_avail_idx(self.avail)

    def fill(self, addrs: np.ndarray) -> None:
        """The guest's part: the whole ring, one 4 MiB writable buffer per descriptor."""
        table = self.mem.array(self.ring.desc, DESC_DTYPE, self.size, writable=True)
        table["addr"] = addrs
        table["len"] = BLOCK
        table["flags"] = VIRTQ_DESC_F_WRITE
        table["next"] = 0
        self._publish(np.arange(self.size, dtype=np.uint16))

    def kick(self) -> int:
        """The host path for one kick; returns the hinted descriptors."""
        n = 0
        for e in self.dev.notify(self.q):
            if isinstance(e, PagesHinted):
                if hasattr(e, "first_pfn"):
                    self.mig.hint_pages(e.cmd_id, e.first_pfn, e.count)
                    n += int(e.first_pfn.size)
                else:
                    self.mig.hint(e.cmd_id, e.ranges)
                    n += len(e.ranges)
        self.mig._drain_hints()  # the host's hint thread runs (it takes bitmap_mutex)
        return n


RINGS = ("distinct", "scattered", "3 blocks")


def block_addrs(kind: str, size: int, kick: int, ram_pages: int) -> np.ndarray:
    nblocks = ram_pages // BLOCK_PAGES
    if kind == "3 blocks":
        return (np.arange(size, dtype=np.uint64) % 3) * np.uint64(BLOCK)
    if kind == "scattered":
        # every other block (so none adjacent), in an order of its own each kick
        rows = np.random.default_rng(kick).permutation(nblocks // 2)[:size] * 2
        return rows.astype(np.uint64) * np.uint64(BLOCK)
    first = (kick * size) % nblocks
    return ((first + np.arange(size, dtype=np.uint64)) % np.uint64(nblocks)) * np.uint64(BLOCK)


def set_blocks(to_send: np.ndarray, addrs: np.ndarray) -> None:
    """Mark the blocks a kick will hint as still to send (setup, not timed)."""
    to_send.reshape(-1, BLOCK_PAGES)[(addrs // np.uint64(BLOCK)).astype(np.intp)] = True


def host_path_rate(qsize: int, kind: str, kicks: int, ram_pages: int) -> float:
    hp = HostPath(qsize, ram_pages)
    total = 0.0
    for k in range(kicks):
        addrs = block_addrs(kind, qsize, k, ram_pages)
        set_blocks(hp.mig.to_send, addrs)
        hp.fill(addrs)
        t = clock()
        n = hp.kick()
        total += clock() - t
        assert n == qsize, (n, qsize)
    return kicks * qsize / total


def descriptor_bytes(addrs: np.ndarray) -> bytes:
    t = np.zeros(addrs.size, DESC_DTYPE)
    t["addr"], t["len"], t["flags"] = addrs, BLOCK, VIRTQ_DESC_F_WRITE
    return t.tobytes()


def struct_rate(raw: bytes, reps: int) -> float:
    n = len(raw) // 16
    t = clock()
    for _ in range(reps):
        for _d in struct.iter_unpack("<QIHH", raw):
            pass
    return reps * n / (clock() - t)


def numpy_rate(raw: bytes, ram_pages: int, reps: int) -> float:
    """The same work in a few numpy lines: decode, the checks a plain hint needs (flags, V-7,
    V-8 against RAM), whole pages, and the bitmap clear with the count of bits it cleared."""
    to_send = np.ones(ram_pages, np.bool_)
    limit = np.uint64(ram_pages << 12)
    n = len(raw) // 16
    total = 0.0
    for _ in range(reps):
        set_blocks(to_send, np.frombuffer(raw, DESC_DTYPE)["addr"])
        t = clock()
        d = np.frombuffer(raw, DESC_DTYPE)
        a, ln, fl = d["addr"], d["len"].astype(np.uint64), d["flags"]
        ok = (ln > 0) & (fl == VIRTQ_DESC_F_WRITE) & (a <= limit - ln)
        assert ok.all()
        first = (a + np.uint64(4095)) >> np.uint64(12)
        rows = np.unique(first // np.uint64(BLOCK_PAGES)).astype(np.intp)
        blocks = to_send.reshape(-1, BLOCK_PAGES)
        cleared = np.count_nonzero(blocks[rows])
        blocks[rows] = False
        total += clock() - t
        assert cleared
    return reps * n / total


def run(sizes: list[int], runs: int, kicks: int, ram_gib: int = 64) -> list[dict[str, Any]]:
    out = []
    for qsize in sizes:
        # RAM for twice the ring's blocks at least: a ring of distinct (or every other) blocks
        ram_pages = max(ram_gib << 18, 2 * qsize * BLOCK_PAGES)
        k = max(1, kicks * 1024 // qsize)
        for kind in RINGS:
            addrs = block_addrs(kind, qsize, 0, ram_pages)
            raw = descriptor_bytes(addrs)
            hp, st, npy = [], [], []
            for _ in range(runs):
                gc.collect()
                hp.append(host_path_rate(qsize, kind, k, ram_pages))
                st.append(struct_rate(raw, k))
                npy.append(numpy_rate(raw, ram_pages, k))
            m_hp, m_st, m_np = (statistics.median(x) for x in (hp, st, npy))
            out.append({"queue_size": qsize, "ring": kind, "ram_gib": ram_pages >> 18,
                        "runs": runs, "kicks": k,
                        "host_path_desc_per_s": m_hp, "struct_iter_unpack_desc_per_s": m_st,
                        "numpy_desc_per_s": m_np, "ratio_to_struct": m_hp / m_st,
                        "ratio_to_numpy": m_hp / m_np})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| queue size | ring | host path (M desc/s) | struct.iter_unpack | numpy | "
             "host/struct | host/numpy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['queue_size']} | {r['ring']} | {r['host_path_desc_per_s'] / 1e6:.2f} "
                     f"| {r['struct_iter_unpack_desc_per_s'] / 1e6:.2f} | "
                     f"{r['numpy_desc_per_s'] / 1e6:.2f} | {r['ratio_to_struct']:.2f} | "
                     f"{r['ratio_to_numpy']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,32768")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kicks", type=int, default=64, help="kicks of a 1024 ring per run "
                    "(scaled down for larger rings, so each run hints the same count)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rows = run([int(s) for s in args.sizes.split(",")], args.runs, args.kicks)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
