"""Seed inputs for the ring targets: programs a correct driver would run (inflate, deflate, stats,
a free page hint round, a report, an indirect table), in the record format ``targets.py`` reads,
so the fuzzer starts from deep, valid paths and mutates them into near misses.

    python -m tests.fuzz.make_seeds   # (re)writes tests/fuzz/seeds/{split,packed}_ring/seed-*
"""
from __future__ import annotations

import struct
from pathlib import Path

from tests.fuzz.targets import QSIZE, RING_BASE, RING_STRIDE

BUF = 0x3000
AVAIL, USED, NEXT, WRITE, INDIRECT = 1 << 7, 1 << 15, 1, 2, 4


def write(off: int, data: bytes) -> bytes:
    out = b""
    for i in range(0, len(data), 40):
        chunk = data[i:i + 40]
        out += bytes([0]) + struct.pack("<H", off + i) + bytes([len(chunk)]) + chunk
    return out


def notify(q: int) -> bytes:
    return bytes([2, q])


def host(sub: int, arg: bytes = b"") -> bytes:
    return bytes([3, sub]) + arg


def split_chain(q: int, bufs: list[tuple[int, int, int]], slot: int = 0,
                indirect: bool = False) -> bytes:
    """Descriptors for ``bufs`` (gpa, len, flags) from ``slot`` on, head in avail ring entry
    ``slot``, avail idx ``slot + 1``; with ``indirect`` the chain is a table at BUF + 0x800."""
    base = RING_BASE + RING_STRIDE * q
    out = b""
    descs = b""
    for i, (gpa, n, fl) in enumerate(bufs):
        last = i == len(bufs) - 1
        nxt = (0 if indirect else slot) + i + 1
        descs += struct.pack("<QIHH", gpa, n, fl | (0 if last else NEXT), 0 if last else nxt)
    if indirect:
        out += write(BUF + 0x800, descs)
        out += write(base + 16 * slot, struct.pack("<QIHH", BUF + 0x800, len(descs), INDIRECT, 0))
    else:
        out += write(base + 16 * slot, descs)
    avail = base + 16 * QSIZE
    out += write(avail + 4 + 2 * slot, struct.pack("<H", slot))
    out += write(avail, struct.pack("<HH", 0, slot + 1))
    return out


def packed_chain(q: int, bufs: list[tuple[int, int, int]], slot: int = 0,
                 indirect: bool = False) -> bytes:
    base = RING_BASE + RING_STRIDE * q
    bid = slot
    out = b""
    for i, (gpa, n, fl) in enumerate(reversed(bufs)):  # the head is published last
        k = slot + len(bufs) - 1 - i
        last = i == 0
        out += write(base + 16 * k, struct.pack("<QIHH", gpa, n, bid,
                                                fl | AVAIL | (0 if last else NEXT)))
    return out


def programs(packed: bool) -> dict[str, bytes]:
    chain = packed_chain if packed else split_chain
    pfns = struct.pack("<3I", 1, 2, 40)
    stats = struct.pack("<HQHQ", 0, 1 << 20, 4, 1 << 30)
    out = {
        "inflate": write(BUF, pfns) + chain(0, [(BUF, len(pfns), 0)]) + notify(0),
        "deflate": write(BUF, pfns) + chain(1, [(BUF, len(pfns), 0)]) + notify(1),
        "stats": host(4) + write(BUF, stats) + chain(2, [(BUF, len(stats), 0)]) + notify(2),
        "hint-round": host(0) + write(BUF, struct.pack("<I", 0x80000001))
        + chain(3, [(BUF, 4, 0)]) + notify(3) + chain(3, [(0x8000, 0x4000, WRITE)], slot=1)
        + notify(3) + host(1) + host(2),
        "report": chain(4, [(0x8000, 0x1000, WRITE), (0x10000, 0x2000, WRITE)]) + notify(4),
        "target": host(3, struct.pack("<I", 16)) + bytes([5, 4, 4]),
    }
    if not packed:
        out["indirect"] = (write(BUF, pfns) + split_chain(0, [(BUF, 4, 0), (BUF + 4, 8, 0)],
                                                          indirect=True) + notify(0))
    return out


def main() -> None:
    here = Path(__file__).parent / "seeds"
    for name, packed in (("split_ring", False), ("packed_ring", True)):
        d = here / name
        d.mkdir(parents=True, exist_ok=True)
        for label, data in programs(packed).items():
            (d / f"seed-{label}").write_bytes(data)


if __name__ == "__main__":
    main()
