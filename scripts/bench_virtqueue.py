"""Device-side ring throughput: chains popped and used elements pushed per second, batched
(pop_many/push_many) against one at a time (pop/push). Same run, so compare the ratio."""
from __future__ import annotations

import time

import numpy as np

from balloon_dev.virtqueue import DeviceVirtqueue
from guestmem import GuestMemory
from tests.ringbuilder import WRITE, RawRing

SIZE = 1024
ROUNDS = 200


def setup() -> tuple[RawRing, DeviceVirtqueue]:
    mem = GuestMemory()
    mem.add_region(0, bytearray(1 << 20))
    r = RawRing.layout(mem, 0x1000, SIZE)
    for i in range(SIZE):
        r.set_desc(i, 0x80000 + 64 * i, 64, WRITE)
    return r, DeviceVirtqueue(mem, SIZE, r.desc, r.driver, r.device)


def run(batched: bool) -> float:
    r, q = setup()
    t0 = time.perf_counter()
    heads = np.arange(SIZE, dtype="<u2")
    ring = r.mem.array(r.driver + 4, "<u2", SIZE, writable=True)
    for _ in range(ROUNDS):
        ring[:] = heads  # publish a full ring at once: the driver's cost is not measured
        r.set_avail_idx(r.avail_idx + SIZE)
        if batched:
            chains = q.pop_many()
            q.push_many([(c.head, 0) for c in chains])
        else:
            for c in iter(q.pop, None):
                q.push(c.head, 0)
    dt = time.perf_counter() - t0
    return SIZE * ROUNDS / dt


def main() -> None:
    one = run(False)
    many = run(True)
    print(f"virtqueue  pop+push one at a time: {one:12,.0f} chains/s")
    print(f"virtqueue  pop_many+push_many:     {many:12,.0f} chains/s  ({many / one:.1f}x)")


if __name__ == "__main__":
    main()
