"""The device side of a split virtqueue over guest memory (protocol.md 1.x).

Theory of operation: the queue never owns memory; it holds three guest addresses and two
indices (``last_avail_idx``, the next available entry to consume, and ``used_idx``, the next
used entry to fill). ``pop_many`` reads the available index once, takes the new heads with one
numpy read, snapshots the descriptor table once per batch (so a guest changing descriptors
mid-walk cannot make us see two versions of one: conventions 6), and walks each chain with every
loop bounded by the queue or table size. Single-descriptor chains (all hints, most balloon
buffers) are checked as one numpy batch; other chains take the general walk.

Two kinds of guest error:
- a malformed *chain* (V-3..V-8): the chain is returned with ``error`` set; the device uses it
  with len 0, and the counter named in ``counters`` goes up;
- a broken *ring* (V-1 pending > N, V-2 head >= N, ring areas outside guest memory): ``RingBroken``
  is raised; the device must set DEVICE_NEEDS_RESET (QEMU's virtio_error()).
``GuestMemoryError`` never escapes this module.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guestmem.memory import GuestMemory, GuestMemoryError
from guestmem.units import U64_LIMIT
from protocol.virtqueue import (
    DESC_DTYPE,
    DESC_SIZE,
    USED_ELEM_DTYPE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_CHAIN_LEN_LIMIT = 1 << 32  # a chain's total length must stay below 2^32 (protocol.md 1.2)


class RingBroken(Exception):
    """The ring as a whole is unusable; the device must set DEVICE_NEEDS_RESET."""


@dataclass(frozen=True, slots=True)
class Chain:
    head: int
    out: tuple[tuple[int, int], ...]
    in_: tuple[tuple[int, int], ...]
    error: str | None = None

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.out)

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.in_)


class _ChainError(Exception):
    def __init__(self, counter: str, detail: str) -> None:
        super().__init__(detail)
        self.counter = counter


class DeviceVirtqueue:
    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = True,
                 reject_zero_len: bool = True, name: str = "vq") -> None:
        if size <= 0 or size > VIRTQ_MAX_SIZE or size & (size - 1):
            raise RingBroken(f"{name}: queue size {size} is not a power of two <= 32768")
        self.mem = mem
        self.size = size
        self.desc = desc
        self.driver = driver
        self.device = device
        self.event_idx = event_idx
        self.indirect = indirect
        self.reject_zero_len = reject_zero_len
        self.name = name
        self.last_avail_idx = 0
        self.used_idx = 0
        self._notified_used_idx = 0  # used_idx at the last should_notify() decision
        self.counters: dict[str, int] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    def reset(self) -> None:
        self.last_avail_idx = 0
        self.used_idx = 0
        self._notified_used_idx = 0

    def _count(self, counter: str, detail: str) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1
        log.warning("%s: guest error %s: %s", self.name, counter, detail)

    def _broken(self, counter: str, detail: str) -> RingBroken:
        self._count(counter, detail)
        return RingBroken(f"{self.name}: {detail}")

    # -- available side --------------------------------------------------------------------
    def _avail_idx(self) -> int:
        try:
            return self.mem.read_u16(self.driver + 2)
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"avail ring at {self.driver:#x}: {e}") from None

    def pending(self) -> int:
        """Available entries not yet consumed; RingBroken when more than the queue size (V-1)."""
        n = (self._avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            # virtio 1.x 2.7.13 / protocol.md V-1: the driver moved avail.idx by more than N.
            raise self._broken("avail_idx_jump",
                               f"avail idx moved from {self.last_avail_idx:#x} by {n} > size {self.size}")
        return n

    def pop(self) -> Chain | None:
        chains = self.pop_many(1)
        return chains[0] if chains else None

    def pop_many(self, max_n: int | None = None) -> list[Chain]:
        n = self.pending()
        if max_n is not None:
            n = min(n, max_n)
        if n == 0:
            return []
        heads = self._read_heads(n)
        bad = np.nonzero(heads >= self.size)[0]
        if bad.size:
            # V-2 ("Guest says index %u is available"): the ring is unusable from here on.
            k = int(bad[0])
            raise self._broken("head_out_of_range",
                               f"avail entry {(self.last_avail_idx + k) & 0xFFFF:#x} names head "
                               f"{int(heads[k])} >= size {self.size}")
        chains = self._walk_heads(heads)
        self.last_avail_idx = (self.last_avail_idx + n) & 0xFFFF
        return chains

    def _read_heads(self, n: int) -> np.ndarray:
        start = self.last_avail_idx & (self.size - 1)
        ring = self.driver + 4
        try:
            first = min(n, self.size - start)
            parts = [self.mem.array(ring + 2 * start, "<u2", first)]
            if first < n:
                parts.append(self.mem.array(ring, "<u2", n - first))
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"avail ring at {self.driver:#x}: {e}") from None
        return np.concatenate(parts).astype(np.int64)

    def _snapshot_table(self) -> np.ndarray:
        try:
            return self.mem.array(self.desc, DESC_DTYPE, self.size).copy()
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"descriptor table at {self.desc:#x}: {e}") from None

    def _walk_heads(self, heads: np.ndarray) -> list[Chain]:
        table = self._snapshot_table()
        rows = table[heads]
        flags = rows["flags"].astype(np.int64)
        simple = (flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) == 0
        ok = simple.copy()
        addrs = rows["addr"]
        lens = rows["len"].astype(np.int64)
        if self.reject_zero_len:
            ok &= lens > 0
        ok &= self._in_memory(addrs, lens)
        head_l = heads.tolist()
        ok_l = ok.tolist()
        addr_l = addrs.tolist()
        len_l = lens.tolist()
        wr_l = ((flags & VIRTQ_DESC_F_WRITE) != 0).tolist()
        out: list[Chain] = []
        for k, head in enumerate(head_l):
            if ok_l[k]:
                buf = ((addr_l[k], len_l[k]),)
                out.append(Chain(head, (), buf) if wr_l[k] else Chain(head, buf, ()))
            else:
                out.append(self._walk_one(table, head))
        return out

    def _in_memory(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Per buffer: does [addr, addr+len) lie inside one guest memory region? (vectorised)"""
        regions = self.mem.regions
        if not regions:
            return np.zeros(addrs.shape, dtype=np.bool_)
        starts = np.array([r.gpa for r in regions], dtype=np.uint64)
        lasts = np.array([r.end - 1 for r in regions], dtype=np.uint64)  # end may be 2^64
        a = addrs.astype(np.uint64)
        n = lens.astype(np.uint64)
        idx = np.searchsorted(starts, a, side="right") - 1
        found = idx >= 0
        last = lasts[np.where(found, idx, 0)]
        # a + n <= last + 1 without overflow: n == 0, or n - 1 <= last - a (given a <= last).
        inside = found & (a <= last)
        fits = (n == 0) | (np.where(inside, last - a, 0) >= n - np.where(n > 0, 1, 0).astype(np.uint64))
        return inside & fits

    def _walk_one(self, table: np.ndarray, head: int) -> Chain:
        out: list[tuple[int, int]] = []
        in_: list[tuple[int, int]] = []
        try:
            self._walk(table, head, out, in_)
        except _ChainError as e:
            self._count(e.counter, f"chain at head {head}: {e}")
            return Chain(head, tuple(out), tuple(in_), f"{e.counter}: {e}")
        return Chain(head, tuple(out), tuple(in_))

    def _walk(self, table: np.ndarray, head: int,
              out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> None:
        limit = self.size
        in_table = False
        i = head
        seen = 0
        total = 0
        while True:
            seen += 1
            if seen > limit:
                # V-4: more descriptors than the table holds means a loop.
                raise _ChainError("desc_loop", f"more than {limit} descriptors (looped)")
            d = table[i]
            addr, length, flags, nxt = int(d["addr"]), int(d["len"]), int(d["flags"]), int(d["next"])
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_table:
                    raise _ChainError("indirect_nested", f"desc {i}: INDIRECT inside a table (V-6)")
                if not self.indirect:
                    raise _ChainError("indirect_not_negotiated", f"desc {i}: INDIRECT not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _ChainError("indirect_with_next", f"desc {i}: INDIRECT with NEXT (V-6)")
                if length == 0 or length % DESC_SIZE:
                    raise _ChainError("indirect_bad_len",
                                      f"desc {i}: indirect table length {length:#x} (V-6)")
                count = length // DESC_SIZE
                if count > VIRTQ_MAX_SIZE:
                    raise _ChainError("indirect_too_long", f"desc {i}: {count} entries > 32768")
                try:
                    table = self.mem.array(addr, DESC_DTYPE, count).copy()
                except GuestMemoryError as e:
                    raise _ChainError("buffer_outside_memory", f"indirect table: {e} (V-8)") from None
                limit, in_table, i, seen = count, True, 0, 0
                continue
            if length == 0 and self.reject_zero_len:
                raise _ChainError("zero_len_buffer", f"desc {i}: zero sized buffer (V-7)")
            if addr + length > U64_LIMIT or not self.mem.contains(addr, length):
                raise _ChainError("buffer_outside_memory",
                                  f"desc {i}: [{addr:#x}, +{length:#x}) outside guest memory (V-8)")
            total += length
            if total >= _CHAIN_LEN_LIMIT:
                raise _ChainError("chain_too_long", f"total length {total:#x} >= 2^32")
            if flags & VIRTQ_DESC_F_WRITE:
                in_.append((addr, length))
            else:
                if in_:
                    raise _ChainError("readable_after_writable",
                                      f"desc {i}: readable after writable (V-5)")
                out.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            if nxt >= limit:
                raise _ChainError("next_out_of_range", f"desc {i}: next {nxt} >= {limit} (V-3)")
            i = nxt

    def read_out(self, chain: Chain, max_len: int) -> bytes:
        """The chain's readable bytes (up to max_len), read now; b"" if memory vanished since pop."""
        parts = []
        left = max_len
        try:
            for addr, length in chain.out:
                if left <= 0:
                    break
                take = min(length, left)
                parts.append(self.mem.read(addr, take))
                left -= take
        except GuestMemoryError as e:
            self._count("buffer_vanished", f"chain at head {chain.head}: {e}")
            return b""
        return b"".join(parts)

    # -- used side -------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        self.push_many(((head, written),))

    def push_many(self, elems: Sequence[tuple[int, int]]) -> None:
        n = len(elems)
        if n == 0:
            return
        if n > self.size:
            raise ValueError(f"{self.name}: pushing {n} used elements > queue size {self.size}")
        arr = np.array(elems, dtype=np.int64).reshape(n, 2)
        start = self.used_idx & (self.size - 1)
        ring = self.device + 4
        try:
            first = min(n, self.size - start)
            for off, lo, hi in ((start, 0, first), (0, first, n)):
                if hi <= lo:
                    continue
                view = self.mem.array(ring + 8 * off, USED_ELEM_DTYPE, hi - lo, writable=True)
                view["id"] = arr[lo:hi, 0]
                view["len"] = arr[lo:hi, 1]
                self.mem.mark_dirty(ring + 8 * off, 8 * (hi - lo))
            self.used_idx = (self.used_idx + n) & 0xFFFF
            # The used elements are written before the index moves (the driver reads idx first).
            self.mem.write(self.device + 2, _U16.pack(self.used_idx))
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"used ring at {self.device:#x}: {e}") from None

    def should_notify(self) -> bool:
        """Whether the used entries pushed since the last decision call for an interrupt."""
        old, new = self._notified_used_idx, self.used_idx
        self._notified_used_idx = new
        if old == new:
            return False
        try:
            if self.event_idx:
                used_event = self.mem.read_u16(self.driver + 4 + 2 * self.size)
                return vring_need_event(used_event, new, old)
            return not self.mem.read_u16(self.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"avail ring at {self.driver:#x}: {e}") from None

    def enable_notifications(self) -> None:
        try:
            if self.event_idx:
                # Ask for a kick when the driver adds the entry we will consume next.
                self.mem.write(self.device + 4 + 8 * self.size, _U16.pack(self._avail_idx()))
            else:
                self.mem.write(self.device, _U16.pack(0))
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"used ring at {self.device:#x}: {e}") from None

    def disable_notifications(self) -> None:
        if self.event_idx:
            return  # avail_event left behind: the driver kicks at most once more (spurious is fine)
        try:
            self.mem.write(self.device, _U16.pack(VIRTQ_USED_F_NO_NOTIFY))
        except GuestMemoryError as e:
            raise self._broken("ring_outside_memory", f"used ring at {self.device:#x}: {e}") from None
