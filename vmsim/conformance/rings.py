"""Raw ring writer for the conformance checks and the device tests: puts descriptors, indirect
tables and available entries into guest memory exactly as told, including contents no correct
driver would write (loops, heads >= N, indices that jump). It is deliberately not the driver
(guest_model/vring.py) and imports nothing from guest_model: checks must be able to write what
the driver never would.

Usage::

    mem = make_memory()                       # 1 MiB byte-backed region at gpa 0
    r = RawRing.layout(mem, 0x1000, 8)        # desc table, avail ring, used ring (4 KiB apart)
    head = r.chain([(BUF, 4, 0), (BUF + 64, 100, WRITE)])   # descriptors 0 -> 1
    r.publish(head)                           # ring[idx % N] = head; avail.idx += 1
    q = DeviceVirtqueue(mem, 8, r.desc, r.driver, r.device)
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from guestmem import GuestMemory
from protocol.virtqueue import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT

_DESC = struct.Struct("<QIHH")


def pack_desc(addr: int, length: int, flags: int = 0, nxt: int = 0) -> bytes:
    """One raw 16-byte descriptor (protocol.md 1.2); fields are truncated to their widths."""
    return _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)


def make_memory(size: int = 1 << 20, gpa: int = 0) -> GuestMemory:
    """A GuestMemory with one zeroed byte-backed region ``[gpa, gpa+size)``."""
    mem = GuestMemory()
    mem.add_region(gpa, bytearray(size), "ram")
    return mem


class TrackingMemory(GuestMemory):
    """A ``GuestMemory`` that records every view a device-side queue asks for (``writes``: the
    writable ones) and every one outside its regions (``refused``), for fuzz properties such as
    "bounds are checked before reading" and "only the used ring is written"."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int]] = []
        self.refused: list[tuple[int, int]] = []

    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        if not self.contains(gpa, length):
            self.refused.append((gpa, length))
        if writable:
            self.writes.append((gpa, length))
        return super().view(gpa, length, writable=writable)


def write_table(mem: GuestMemory, gpa: int,
                descs: Sequence[tuple[int, int] | tuple[int, int, int] | tuple[int, int, int, int]]
                ) -> int:
    """Write raw descriptors ``(addr, len[, flags[, next]])`` at ``gpa`` (an indirect table);
    returns its length in bytes, ready for an INDIRECT descriptor."""
    raw = b"".join(pack_desc(*d) for d in descs)
    mem.write(gpa, raw)
    return len(raw)


@dataclass
class RawRing:
    mem: GuestMemory
    size: int
    desc: int
    driver: int
    device: int
    avail_idx: int = 0

    @classmethod
    def layout(cls, mem: GuestMemory, base: int, size: int) -> RawRing:
        """Place a ring at ``base`` (descriptor table, then avail, then used, 4 KiB aligned)."""
        desc = base
        driver = desc + desc_table_size(size)
        device = (driver + avail_ring_size(size) + 4095) & ~4095
        return cls(mem, size, desc, driver, device)

    @property
    def used_area(self) -> tuple[int, int]:
        """(gpa, length) of the used ring including avail_event: all the device may write."""
        return self.device, used_ring_size(self.size)

    # -- driver-written areas, raw -----------------------------------------------------
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc + DESC_SIZE * i, pack_desc(addr, length, flags, nxt))

    def chain(self, bufs: Sequence[tuple[int, int, int]], start: int = 0) -> int:
        """Write ``(addr, len, flags)`` buffers as descriptors start, start+1, ... linked with
        NEXT (added here; the last one gets none). Returns the head (``start``)."""
        for k, (addr, length, flags) in enumerate(bufs):
            i = (start + k) % self.size
            last = k == len(bufs) - 1
            self.set_desc(i, addr, length, flags | (0 if last else NEXT), (i + 1) % self.size)
        return start

    def publish(self, *heads: int) -> None:
        """Write each head at ring[avail_idx % N], then publish avail.idx once."""
        for h in heads:
            self.set_ring(self.avail_idx, h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_ring(self, idx: int, head: int) -> None:
        """Write a raw avail ring entry for index ``idx`` without publishing it."""
        self.mem.write(self.driver + 4 + 2 * (idx % self.size), struct.pack("<H", head & 0xFFFF))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.driver + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.driver, flags)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.driver + 4 + 2 * self.size, idx & 0xFFFF)

    # -- device-written area, read back ---------------------------------------------------
    def used_idx(self) -> int:
        return self.mem.read_u16(self.device + 2)

    def used_elem(self, i: int) -> tuple[int, int]:
        off = self.device + 4 + 8 * (i % self.size)
        return self.mem.read_u32(off), self.mem.read_u32(off + 4)

    def used_elems(self, first: int, count: int) -> list[tuple[int, int]]:
        """Used elements for indices first .. first+count-1 (wrapping)."""
        return [self.used_elem((first + k) & 0xFFFF) for k in range(count)]

    def avail_event(self) -> int:
        return self.mem.read_u16(self.device + 4 + 8 * self.size)

    def used_flags(self) -> int:
        return self.mem.read_u16(self.device)
