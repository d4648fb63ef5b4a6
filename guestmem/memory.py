"""Guest physical memory as both sides see it.

Theory of operation: a ``GuestMemory`` is a sorted set of non-overlapping regions, each backing a
guest-physical range with a buffer (a ``bytearray`` in simulations, an ``mmap`` of a file
descriptor for a real guest). Every access names a guest range; the range must lie wholly inside
one region, else ``GuestMemoryError`` is raised (never ``IndexError``, never a wrap past 2^64).
Accessors return copies (``read``) or bounds-checked views (``view``, ``array``) so hot paths can
use numpy over rings without copying.

A simulated guest's RAM is far larger than its byte-backed part: page *contents* are modelled as
versions in ``guestmem.pages.PageVersions`` (see there); only rings and driver buffers are bytes.

Writes made through ``write`` (and views whose users call ``mark_dirty``) are recorded in the
dirty log when one is attached, as a hypervisor's dirty tracking would see them.
"""
from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from guestmem.units import U64_LIMIT
from protocol.errors import GuestFault

if TYPE_CHECKING:
    from guestmem.dirty import DirtyLog


class GuestMemoryError(GuestFault):
    """A guest-supplied address or length that does not lie inside guest memory (a guest fault:
    the device turns it into a broken ring or a refused request and counts it)."""

    def __init__(self, gpa: int, length: int, why: str = "outside guest memory") -> None:
        super().__init__(f"guest range [{gpa:#x}, +{length:#x}) {why}")
        self.gpa = gpa
        self.length = length


@dataclass(slots=True)
class Region:
    gpa: int
    size: int
    buf: memoryview  # format 'B', writable unless the region is read-only
    name: str = ""
    readonly: bool = False

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self.dirty_log: DirtyLog | None = None

    # -- regions ---------------------------------------------------------------------------
    def add_region(self, gpa: int, buf: Any, name: str = "", readonly: bool = False) -> Region:
        """Back ``[gpa, gpa+len(buf))`` with ``buf`` (anything exposing the buffer protocol)."""
        mv = memoryview(buf).cast("B")
        size = mv.nbytes
        if gpa < 0 or size <= 0 or gpa + size > U64_LIMIT:
            raise ValueError(f"region {name!r} at {gpa:#x} size {size:#x} is not a valid range")
        for r in self._regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"region {name!r} at {gpa:#x} overlaps {r.name!r} at {r.gpa:#x}")
        region = Region(gpa, size, mv, name, readonly)
        i = bisect.bisect(self._starts, gpa)
        self._regions.insert(i, region)
        self._starts.insert(i, gpa)
        return region

    def remove_region(self, gpa: int) -> Region:
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa:
            raise KeyError(f"no region starts at {gpa:#x}")
        del self._starts[i]
        return self._regions.pop(i)

    def clear(self) -> None:
        self._regions.clear()
        self._starts.clear()

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def _find(self, gpa: int, length: int) -> tuple[Region, int]:
        if gpa < 0 or length < 0 or gpa + length > U64_LIMIT:
            raise GuestMemoryError(gpa, length, "wraps past 2^64")
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            off = gpa - r.gpa
            if off + length <= r.size and (off < r.size or length == 0):
                return r, off
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # -- access ----------------------------------------------------------------------------
    def view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        r, off = self._find(gpa, length)
        if writable and r.readonly:
            raise GuestMemoryError(gpa, length, f"is in read-only region {r.name!r}")
        return r.buf[off:off + length]

    def array(self, gpa: int, dtype: Any, count: int, *, writable: bool = False) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` at ``gpa`` (no copy)."""
        dt = np.dtype(dtype)
        mv = self.view(gpa, dt.itemsize * count, writable=writable)
        return np.frombuffer(mv, dtype=dt, count=count)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        self.view(gpa, n, writable=True)[:] = data
        self.mark_dirty(gpa, n)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        mv = self.view(gpa, length, writable=True)
        np.frombuffer(mv, dtype=np.uint8)[:] = byte
        self.mark_dirty(gpa, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        if self.dirty_log is not None and length > 0:
            self.dirty_log.mark_bytes(gpa, length)

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack_from("<H", self.view(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack_from("<I", self.view(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.view(gpa, 8))[0])

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))
