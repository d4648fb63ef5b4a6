"""Capture QEMU's free page hints from the device side: the free page queue's descriptors, read
out of the guest's RAM file while the hint rounds run.

Theory of operation
-------------------
Linux's balloon driver hands each free 4 MiB block over as one device-writable descriptor of a
split ring and takes the descriptor back (``virtqueue_get_buf``) before it adds the next one. The
ring's free list is LIFO, so the driver reuses the same one or two descriptors for a whole round:
the descriptor table never holds the history. The only record of a hint is the moment between
its publication (``avail->idx`` moves) and the next reuse of its descriptor.

So a poller process maps the source QEMU's RAM file read-only and spins on ``avail->idx``; for
every newly published entry it reads the head's descriptor (``addr``, ``len``, ``flags``) and, for
a command id buffer (device-readable, 4 bytes), the id it points at. QEMU's own
``x-query-virtio-queue-status`` gives the ring addresses (guest physical), which map 1:1 to file
offsets below 2.75 GiB on q35.

A reading can be late: the driver may already have reused the descriptor for a later entry. A
descriptor value, once overwritten, never returns within a migration (a hinted block is held by
the driver until DONE), so a late reading shows the value of a later entry on the same
descriptor, and the readings of one descriptor's entries are a non-decreasing sequence of its true
values. Hence the number of hints lost to late readings is exactly the number of adjacent equal
readings per descriptor (``CaptureResult.suspect``): when it is 0, every published hint was read.
The command id buffers repeat their addresses across rounds, but two consecutive entries of one
descriptor cannot both be STOP (a round starts with START on the descriptor STOP freed).

Rounds: every START buffer read names the command id of the round that follows it; a hint read
after a STOP (or first) with no START between opens a round whose id was missed (0).
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from protocol.errors import EnvironmentFailure

PAGE = 4096
VRING_DESC_F_WRITE = 2
# q35 maps all RAM below 4 GiB (file offset == guest physical address) up to this size.
Q35_LOWMEM_LIMIT = 0xB000_0000


@dataclass(frozen=True, slots=True)
class RingAddrs:
    """Guest physical addresses of one split ring (from ``x-query-virtio-queue-status``)."""

    desc: int
    avail: int
    used: int
    num: int

    @classmethod
    def from_qmp(cls, status: dict[str, Any]) -> RingAddrs:
        return cls(desc=int(status["vring-desc"]), avail=int(status["vring-avail"]),
                   used=int(status["vring-used"]), num=int(status["vring-num"]))


@dataclass(frozen=True, slots=True)
class Reading:
    """One published entry of the free page queue as the poller read it."""

    entry: int        # running count of avail entries since the capture started
    head: int         # descriptor index
    addr: int         # guest physical address
    length: int
    flags: int
    cmd_id: int | None  # for a command id buffer: the id it held when read
    t_ns: int         # perf_counter_ns of the poll that saw it

    @property
    def is_hint(self) -> bool:
        return bool(self.flags & VRING_DESC_F_WRITE)


@dataclass(frozen=True, slots=True)
class Hint:
    addr: int
    length: int
    round: int        # 1-based index into CaptureResult.rounds
    t_ns: int


@dataclass(slots=True)
class CaptureResult:
    readings: list[Reading]
    polls: int
    max_gap_us: float
    hints: list[Hint] = field(default_factory=list)
    # one command id per round the guest ran (0: the round's START was read too late)
    rounds: list[int] = field(default_factory=list)
    suspect: int = 0    # entries whose reading was late (their hint is lost)

    @property
    def hinted_bytes(self) -> int:
        return sum(h.length for h in self.hints)

    def ranges(self) -> list[tuple[int, int]]:
        """Sorted, merged [start, end) guest-physical ranges of every captured hint."""
        out: list[tuple[int, int]] = []
        for a, n in sorted((h.addr, h.length) for h in self.hints):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], a + n))
            else:
                out.append((a, a + n))
        return out


def resolve(readings: list[Reading], polls: int = 0, max_gap_us: float = 0.0) -> CaptureResult:
    """Turn raw readings into distinct hints, rounds and the count of late readings."""
    res = CaptureResult(readings=readings, polls=polls, max_gap_us=max_gap_us)
    last_by_head: dict[int, tuple[int, int, int, int | None]] = {}
    seen: set[tuple[int, int]] = set()
    in_round = False
    for r in readings:
        key = (r.addr, r.length, r.flags, r.cmd_id)
        if last_by_head.get(r.head) == key:
            res.suspect += 1
            continue
        last_by_head[r.head] = key
        if r.is_hint:
            if not in_round:   # its START was read late: the round is known, its id is not
                res.rounds.append(0)
                in_round = True
            if (r.addr, r.length) not in seen:
                seen.add((r.addr, r.length))
                res.hints.append(Hint(r.addr, r.length, len(res.rounds), r.t_ns))
        elif r.cmd_id:   # START carries the round's id
            res.rounds.append(r.cmd_id)
            in_round = True
        elif r.cmd_id == 0:   # STOP points at the id 0
            in_round = False
    return res


def poll_ring(mm: mmap.mmap | bytes | bytearray, ring: RingAddrs, start_idx: int, stop: Any,
              check_every: int = 2048) -> tuple[list[Reading], int, float]:
    """Spin on the ring until ``stop.is_set()``; returns (readings, polls, max gap in us)."""
    u16 = struct.Struct("<H").unpack_from
    u32 = struct.Struct("<I").unpack_from
    desc_s = struct.Struct("<QIHH").unpack_from
    avail_idx_at = ring.avail + 2
    ring_at = ring.avail + 4
    size = len(mm)
    seen = start_idx
    entry = 0
    readings: list[Reading] = []
    polls = 0
    clock = time.perf_counter_ns
    last = clock()
    max_gap = 0
    while True:
        polls += 1
        now = clock()
        if now - last > max_gap:
            max_gap = now - last
        last = now
        idx = u16(mm, avail_idx_at)[0]
        if idx != seen:
            # Bounded: at most one ring's worth per poll (the index is 16 bits and wraps).
            for _ in range(min((idx - seen) & 0xFFFF, ring.num)):
                head = u16(mm, ring_at + 2 * (seen % ring.num))[0] % ring.num
                addr, length, flags, _next = desc_s(mm, ring.desc + 16 * head)
                cmd = None
                if not flags & VRING_DESC_F_WRITE and length == 4 and addr + 4 <= size:
                    cmd = u32(mm, addr)[0]
                readings.append(Reading(entry, head, addr, length, flags, cmd, now))
                entry += 1
                seen = (seen + 1) & 0xFFFF
            seen = idx
        if polls % check_every == 0 and stop.is_set():
            return readings, polls, max_gap / 1000


def _capture_main(ram_path: str, ring: RingAddrs, stop: Any, conn: Connection) -> None:
    # A hint lives in the ring for tens of microseconds; a poller that loses its CPU for a
    # scheduler tick on a busy machine reads most of a round late (measured: 93 of 98 entries
    # with 8 jobs on 2 cores at normal priority). So it spins at the lowest real-time priority
    # for the migration's few seconds (as root; the kernel's RT throttling still leaves other
    # tasks 5% of its core); without the right to, it asks for a higher nice share.
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        try:
            os.nice(-5)
        except OSError:
            pass
    fd = os.open(ram_path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    start = struct.unpack_from("<H", mm, ring.avail + 2)[0]
    conn.send(("started", start, os.sched_getscheduler(0) == os.SCHED_FIFO))
    readings, polls, gap = poll_ring(mm, ring, start, stop)
    conn.send(("done", readings, polls, gap))
    mm.close()


class HintCapture:
    """The poller process. ``start()`` returns once it watches the ring; ``stop()`` resolves."""

    def __init__(self, ram_path: str, ring: RingAddrs) -> None:
        if ring.avail + 4 + 2 * ring.num > os.path.getsize(ram_path):
            raise EnvironmentFailure(f"free page ring at {ring.avail:#x} is outside {ram_path}")
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_capture_main, args=(ram_path, ring, self._stop, child),
                                 daemon=True, name="hint-capture")
        self._child = child
        self.realtime = False   # whether the poller got its real-time priority

    def start(self, timeout: float = 60) -> None:
        self._proc.start()
        self._child.close()
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise EnvironmentFailure("the hint capture process did not start")
        _tag, _start, self.realtime = self._conn.recv()

    def stop(self, timeout: float = 60) -> CaptureResult:
        self._stop.set()
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise EnvironmentFailure("the hint capture process did not answer")
        _tag, readings, polls, gap = self._conn.recv()
        self._proc.join(10)
        return resolve(readings, polls, gap)

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
