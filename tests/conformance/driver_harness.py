"""Harness for the driver conformance checks (tests/conformance/test_driver_*.py, DR-1..DR-13).

Theory of operation
-------------------
The checks judge OUR guest driver (``guest_model.driver.BalloonDriver``, inside a
``guest_model.guest.SimGuest``) by what it does, not by what it believes: a ``DriverVM`` runs it
against the real device core (``balloon_dev.device.BalloonDevice``) through an
``ObservedTransport``, the in-process transport with a recorder in the middle. The recorder sees
exactly what a device would see and nothing of the driver's own bookkeeping:

* every status write and config write, with the status at that moment;
* on every kick, *before* the device runs, the buffers made available since the last kick,
  decoded from guest memory by ``RingSpy`` (its own split-ring reader: avail ring, descriptor
  chains, indirect tables; bounded by the queue size), with the bytes of their readable part
  as they are at that moment (the driver reuses its pfn buffer, as Linux does);
* every host effect (``Inflated``, ``PagesHinted``, ...) with the simulated time it happened.

Kicks of chosen queues can be held back (``stall`` / ``release``): a device slow to look at a
queue, which is when "must wait for the acknowledgement" rules show. Page use is judged from the
guest's memory state: the allocator's per-page state (a page the guest allocated is
``PG_ALLOC``, a free one ``PG_BUDDY``/``PG_PCP``, the driver's ``PG_BALLOON``) and
``PageVersions`` (every write to a page changes its version and marks the dirty log).

The memory layout is vmsim's (docs/interfaces.md): 256 MiB of RAM whose contents are page
versions, one byte-backed 4 MiB driver area at 1 MiB for rings and driver buffers, the rest a
sparse mapping so the device's V-8 check accepts buffers anywhere in RAM.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from balloon_dev.device import DEFAULT_OFFERED_FEATURES, BalloonDevice, DeviceConfig
from balloon_dev.transport.inprocess import InProcessTransport
from guest_model.buddy import PG_ALLOC, PG_BALLOON, PG_BUDDY, PG_PCP
from guest_model.guest import DEFAULT_DRIVER_AREA, GuestOptions, SimGuest
from guestmem import DirtyLog, GuestMemory, PageVersions
from guestmem.clock import Scheduler
from protocol.balloon import (
    CFG_FREE_PAGE_HINT_CMD_ID,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_REPORTING,
    BalloonQueue,
)
from protocol.virtio import DeviceStatus, feature_mask
from protocol.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

RAM = 256 << 20
#: Events one ``DriverVM.run`` may take; the checks here need at most a few dozen.
MAX_EVENTS = 5_000
RAM_PAGES = RAM >> 12
#: Everything our device can offer: the default offer plus the three it leaves out by default.
ALL_FEATURES = DEFAULT_OFFERED_FEATURES | feature_mask(
    VIRTIO_BALLOON_F_MUST_TELL_HOST, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING)


def without(features: int, *bits: int) -> int:
    return features & ~feature_mask(*bits)


@dataclass(frozen=True, slots=True)
class Posted:
    """One buffer the driver made available: its elements as (gpa, len), readable ("out")
    then writable ("in"), the readable bytes at kick time, when, the device status then, the
    buffers outstanding on its ring then (made available, not used; this one included) and the
    ``free_page_hint_cmd_id`` the device published then (None without that field)."""

    head: int
    out: tuple[tuple[int, int], ...]
    in_: tuple[tuple[int, int], ...]
    data: bytes
    time: float
    status: int
    error: str = ""
    in_flight: int = 0
    cmd_id: int | None = None

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.out)


class RingSpy:
    """Reads a split ring's available side from guest memory, independently of the driver's
    ``DriverVring``: ``scan()`` returns the buffers published since the last scan."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.seen = 0  # free-running avail index read so far
        self.posted: list[Posted] = []

    def avail_idx(self) -> int:
        return self.mem.read_u16(self.avail + 2)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def outstanding(self) -> int:
        """Buffers made available and not yet used (as the rings say)."""
        return (self.avail_idx() - self.used_idx()) & 0xFFFF

    def _read_desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        base = table + 16 * i
        return (self.mem.read_u64(base), self.mem.read_u32(base + 8),
                self.mem.read_u16(base + 12), self.mem.read_u16(base + 14))

    def _chain(self, head: int, time: float, status: int, cmd_id: int | None) -> Posted:
        out: list[tuple[int, int]] = []
        in_: list[tuple[int, int]] = []
        error = ""
        table, limit, i = self.desc, self.size, head
        for _ in range(self.size + 1):  # bounded: a loop in the chain is an error, not a hang
            if i >= limit:
                error = f"descriptor {i} out of range"
                break
            addr, length, flags, nxt = self._read_desc(table, i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if table != self.desc:
                    error = "nested indirect table"
                    break
                table, limit, i = addr, length // 16, 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                in_.append((addr, length))
            else:
                if in_:
                    error = "readable element after a writable one"
                out.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            i = nxt
        else:
            error = "descriptor chain longer than the queue"
        data = b"".join(self.mem.read(a, n) for a, n in out if n and self.mem.contains(a, n))
        return Posted(head, tuple(out), tuple(in_), data, time, status, error, cmd_id=cmd_id)

    def scan(self, time: float, status: int, cmd_id: int | None = None) -> list[Posted]:
        idx = self.avail_idx()
        new: list[Posted] = []
        for _ in range(self.size + 1):
            if self.seen == idx:
                break
            head = self.mem.read_u16(self.avail + 4 + 2 * (self.seen % self.size))
            self.seen = (self.seen + 1) & 0xFFFF
            p = self._chain(head, time, status, cmd_id)
            new.append(replace(p, in_flight=(self.seen - self.used_idx()) & 0xFFFF))
        self.posted.extend(new)
        return new


@dataclass(slots=True)
class ConfigWrite:
    offset: int
    data: bytes
    status: int
    time: float


@dataclass(slots=True)
class Recorder:
    config_writes: list[ConfigWrite] = field(default_factory=list)
    status_writes: list[int] = field(default_factory=list)
    kicks: dict[int, int] = field(default_factory=dict)
    #: (time, effect) of every host effect, in order.
    host: list[tuple[float, Any]] = field(default_factory=list)


class ObservedTransport(InProcessTransport):
    """``InProcessTransport`` that records what the driver does (see the module docstring) and
    can hold back kicks of chosen transport queue indices until ``release``."""

    def __init__(self, dev: BalloonDevice, mem: GuestMemory, clock: Callable[[], float]) -> None:
        super().__init__(dev)
        self.mem = mem
        self.clock = clock
        self.rec = Recorder()
        self.spies: dict[int, RingSpy] = {}
        self.stalled: set[int] = set()
        self.held: set[int] = set()
        self.add_host_listener(lambda e: self.rec.host.append((self.clock(), e)))

    def set_status(self, status: int) -> None:
        self.rec.status_writes.append(status)
        super().set_status(status)

    def write_config(self, offset: int, data: bytes) -> None:
        self.rec.config_writes.append(ConfigWrite(offset, bytes(data), self.device.status,
                                                  self.clock()))
        super().write_config(offset, data)

    def setup_queue(self, q: int, size: int, desc: int, avail: int, used: int) -> None:
        self.spies[q] = RingSpy(self.mem, size, desc, avail, used)
        super().setup_queue(q, size, desc, avail, used)

    def scan(self, q: int) -> list[Posted]:
        spy = self.spies.get(q)
        if spy is None:
            return []
        cmd_id = None
        if self.device.config_size >= CFG_FREE_PAGE_HINT_CMD_ID + 4:
            cmd_id = int.from_bytes(self.device.read_config(CFG_FREE_PAGE_HINT_CMD_ID, 4),
                                    "little")
        return spy.scan(self.clock(), self.device.status, cmd_id)

    def notify(self, q: int) -> None:
        self.scan(q)
        self.rec.kicks[q] = self.rec.kicks.get(q, 0) + 1
        if q in self.stalled:
            self.held.add(q)
            return
        super().notify(q)

    def stall(self, q: int) -> None:
        self.stalled.add(q)

    def release(self, q: int) -> None:
        """Stop holding kicks of ``q``; a kick held back reaches the device now."""
        self.stalled.discard(q)
        if q in self.held:
            self.held.discard(q)
            super().notify(q)


class DriverVM:
    """Our driver in a SimGuest, against the device core, observed (module docstring).

    ``guest`` are ``GuestOptions`` fields (page_poisoning, init_on_free, hint_strategy, driver
    options as ``driver={...}``); ``device`` are extra ``DeviceConfig`` fields."""

    def __init__(self, offered: int = ALL_FEATURES, *, strategy: str = "off",
                 device: dict[str, Any] | None = None, **guest: Any) -> None:
        self.sched = Scheduler()
        self.max_events = 0  # most events one run() took (how far from MAX_EVENTS checks are)
        self.dirty = DirtyLog(RAM_PAGES)
        self.pages = PageVersions(RAM_PAGES, self.dirty)
        self.mem = GuestMemory()
        gpa, size = DEFAULT_DRIVER_AREA
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.mem.add_region(gpa, bytearray(size), "driver-area")
        self.mem.add_region(0, mmap.mmap(-1, gpa, flags=flags), "ram-low")
        self.mem.add_region(gpa + size, mmap.mmap(-1, RAM - gpa - size, flags=flags), "ram")
        self.mem.dirty_log = self.dirty
        self.dev = BalloonDevice(self.mem, DeviceConfig(offered_features=offered,
                                                        ram_pages=RAM_PAGES, **(device or {})))
        self.t = ObservedTransport(self.dev, self.mem, lambda: self.sched.now)
        self.guest = SimGuest(self.mem, self.pages, self.sched, self.t,
                              GuestOptions(ram_bytes=RAM, hint_strategy=strategy, **guest))
        self.drv = self.guest.driver
        self.alloc = self.guest.allocator
        self.run(0.001)

    # -- driving ---------------------------------------------------------------------------
    def run(self, dt: float) -> None:
        """Run ``dt`` simulated seconds. A driver that keeps scheduling work without time moving
        on (a livelock) fails the check instead of hanging it: at most ``MAX_EVENTS`` events."""
        t = self.sched.now + dt
        before = self.sched.events_run
        for _ in range(MAX_EVENTS):
            nt = self.sched.peek_time()
            if nt is None or nt > t:
                break
            self.sched.run_next()
        else:
            raise AssertionError(f"the driver ran {MAX_EVENTS} events before t={t:.3f} s "
                                 f"(stuck at t={self.sched.now:.6f} s): a livelock")
        self.sched.run_until(t)  # (moves the clock to t)
        self.max_events = max(self.max_events, self.sched.events_run - before)

    def host(self, fn: Callable[..., Any], *args: Any) -> None:
        self.t.host_call(fn, *args)

    def qidx(self, q: BalloonQueue) -> int:
        return self.dev.queue_layout()[q]

    def stall(self, q: BalloonQueue) -> None:
        self.t.stall(self.qidx(q))

    def release(self, q: BalloonQueue) -> None:
        self.t.release(self.qidx(q))

    # -- observing -------------------------------------------------------------------------
    def posted(self, q: BalloonQueue) -> list[Posted]:
        """Every buffer the driver made available on ``q`` so far (including any published
        without a kick yet); none for a queue the driver never set up."""
        i = self.dev.queue_layout().get(q)
        if i is None or i not in self.t.spies:
            return []
        self.t.scan(i)
        return list(self.t.spies[i].posted)

    def spy(self, q: BalloonQueue) -> RingSpy:
        return self.t.spies[self.qidx(q)]

    def effects(self, kind: type) -> list[Any]:
        return [e for _, e in self.t.rec.host if isinstance(e, kind)]

    def timed(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.t.rec.host if isinstance(e, kind)]

    def pfns_of(self, q: BalloonQueue) -> np.ndarray:
        """Every pfn the driver put in inflate/deflate buffers on ``q``, in order."""
        parts = [np.frombuffer(p.data, dtype="<u4") for p in self.posted(q)]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def state(self, pfns: Any) -> np.ndarray:
        return self.alloc.state[np.asarray(pfns, dtype=np.int64)]

    def balloon_pages(self) -> np.ndarray:
        """Pages the driver owns (balloon pages, and hint blocks it holds)."""
        return np.flatnonzero(self.alloc.state == PG_BALLOON)

    def guest_uses(self, pfns: Any) -> np.ndarray:
        """Per pfn: the guest has it (allocated to the guest, or free for it to allocate)."""
        st = self.state(pfns)
        return (st == PG_ALLOC) | (st == PG_BUDDY) | (st == PG_PCP)

    def negotiated(self, bit: int) -> bool:
        return bool(self.dev.driver_features >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        return bool(self.dev.status & DeviceStatus.DRIVER_OK)


def cfg_writes(vm: DriverVM, offset: int) -> list[ConfigWrite]:
    return [w for w in vm.t.rec.config_writes if w.offset == offset]


def had_driver_ok(status: int) -> bool:
    return bool(status & DeviceStatus.DRIVER_OK)
