"""Device-side ring throughput (balloon_dev/virtqueue.py): chains popped per second and used
elements pushed per second, batched (pop_many / push_many) against one at a time (pop / push).

Workloads, queue size 1024 (QEMU's free_page_vq):
  hint      one writable descriptor per chain (what Linux posts for every free page hint)
  chain3    three chained descriptors (out, in, in): the general walk
  indirect  one INDIRECT descriptor to a 32-entry table (a page-reporting chain)
  indirect256  the same with 256 entries (checked as one numpy batch, >= indirect_batch_min)

The same workloads run on a packed ring (balloon_dev/packed_virtqueue.py, rows "packed ..."):
the driver's writes (descriptors with the lap's AVAIL/USED bits, head flags last) are outside the
timed region there too.

The driver's cost (writing the avail ring) is outside the timed region. Compare ratios from one
run: the machines are shared and noisy. Usage: scripts/bench virtqueue [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from balloon_dev.packed_virtqueue import PackedDeviceVirtqueue  # noqa: E402
from balloon_dev.virtqueue import DeviceVirtqueue  # noqa: E402
from tests.packedringbuilder import RawPackedRing, pack_pdesc  # noqa: E402
from vmsim.conformance.rings import INDIRECT, WRITE, RawRing, make_memory, write_table  # noqa: E402

SIZE = 1024
BUF = 0x200000


def setup(kind: str) -> tuple[RawRing, DeviceVirtqueue, int]:
    """A full ring of identical-shape chains; returns (ring, queue, chains per fill)."""
    mem = make_memory(8 << 20)
    r = RawRing.layout(mem, 0x1000, SIZE)
    if kind == "hint":
        for i in range(SIZE):
            r.set_desc(i, BUF + 0x1000 * i, 0x1000, WRITE)
        per_fill = SIZE
    elif kind == "chain3":
        per_fill = SIZE // 3
        for c in range(per_fill):
            r.chain([(BUF + 0x100 * c, 16, 0), (BUF + 0x100 * c + 16, 64, WRITE),
                     (BUF + 0x100 * c + 80, 64, WRITE)], start=3 * c)
    elif kind in ("indirect", "indirect256"):
        entries = 32 if kind == "indirect" else 256
        per_fill = SIZE if kind == "indirect" else SIZE // 8
        tbl = 0x600000
        n = write_table(mem, tbl, [(BUF + 0x1000 * j, 0x1000,
                                    WRITE | (1 if j < entries - 1 else 0), j + 1)
                                   for j in range(entries)])
        for i in range(per_fill):
            r.set_desc(i, tbl, n, INDIRECT)
    else:
        raise ValueError(kind)
    return r, DeviceVirtqueue(mem, SIZE, r.desc, r.driver, r.device), per_fill


def _pop_push(q: DeviceVirtqueue | PackedDeviceVirtqueue, batched: bool,
              per_fill: int) -> tuple[float, float]:
    """Pop every chain the driver posted and push them all back used: (pop s, push s)."""
    t0 = time.perf_counter()
    if batched:
        chains = q.pop_many()
    else:
        chains = []
        while (c := q.pop()) is not None:
            chains.append(c)
    t1 = time.perf_counter()
    if batched:
        q.push_many([(c.head, 0) for c in chains])
    else:
        for c in chains:
            q.push(c.head, 0)
    t2 = time.perf_counter()
    assert len(chains) == per_fill and all(c.error is None for c in chains)
    return t1 - t0, t2 - t1


def run(kind: str, batched: bool, rounds: int) -> tuple[float, float]:
    r, q, per_fill = setup(kind)
    stride = 3 if kind == "chain3" else 1
    heads = (np.arange(per_fill, dtype=np.uint16) * stride).astype("<u2")
    ring = r.mem.array(r.driver + 4, "<u2", SIZE, writable=True)
    t_pop = t_push = 0.0
    for _ in range(rounds):
        # Publish per_fill chains (the slots wrap, so write them slot by slot).
        slots = (r.avail_idx + np.arange(per_fill)) % SIZE
        ring[slots] = heads
        r.set_avail_idx(r.avail_idx + per_fill)
        dt_pop, dt_push = _pop_push(q, batched, per_fill)
        t_pop += dt_pop
        t_push += dt_push
    n = per_fill * rounds
    return n / t_pop, n / t_push


def _packed_chains(kind: str) -> tuple[list[list[tuple[int, int, int]]], int]:
    """The chains (lists of (addr, len, flags)) one packed fill posts, and the table gpa."""
    tbl = 0x600000
    if kind == "hint":
        return [[(BUF + 0x1000 * i, 0x1000, WRITE)] for i in range(SIZE)], tbl
    if kind == "chain3":
        return [[(BUF + 0x100 * c, 16, 0), (BUF + 0x100 * c + 16, 64, WRITE),
                 (BUF + 0x100 * c + 80, 64, WRITE)] for c in range(SIZE // 3)], tbl
    entries = 32 if kind == "indirect" else 256
    per_fill = SIZE if kind == "indirect" else SIZE // 8
    return [[(tbl, 16 * entries, INDIRECT)] for _ in range(per_fill)], tbl


def run_packed(kind: str, batched: bool, rounds: int) -> tuple[float, float]:
    mem = make_memory(8 << 20)
    r = RawPackedRing.layout(mem, 0x1000, SIZE)
    chains_spec, tbl = _packed_chains(kind)
    if kind.startswith("indirect"):
        entries = 32 if kind == "indirect" else 256
        mem.write(tbl, b"".join(pack_pdesc(BUF + 0x1000 * j, 0x1000, 0, WRITE)
                                for j in range(entries)))
    q = PackedDeviceVirtqueue(mem, SIZE, r.desc, r.driver, r.device)
    per_fill = len(chains_spec)
    t_pop = t_push = 0.0
    for _ in range(rounds):
        for i, bufs in enumerate(chains_spec):
            r.add(bufs, bid=i)
        dt_pop, dt_push = _pop_push(q, batched, per_fill)
        t_pop += dt_pop
        t_push += dt_push
    n = per_fill * rounds
    return n / t_pop, n / t_push


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60, help="ring fills per measurement")
    args = ap.parse_args(argv)
    print(f"queue size {SIZE}, {args.rounds} fills per row")
    print(f"{'workload':18} {'mode':10} {'pops/s':>12} {'pushes/s':>12}")
    for ring, runner in (("split", run), ("packed", run_packed)):
        for kind in ("hint", "chain3", "indirect", "indirect256"):
            res = {}
            label = kind if ring == "split" else f"packed {kind}"
            for batched in (False, True):
                pops, pushes = runner(kind, batched, args.rounds)
                res[batched] = pops, pushes
                mode = "batched" if batched else "one"
                print(f"{label:18} {mode:10} {pops:12,.0f} {pushes:12,.0f}")
            print(f"{label:18} {'ratio':10} {res[True][0] / res[False][0]:11.1f}x "
                  f"{res[True][1] / res[False][1]:11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
