"""The device side of a packed virtqueue over guest memory (VIRTIO_F_RING_PACKED, protocol.md 1.8).

Theory of operation
-------------------
A packed queue has one ring of N 16-byte descriptors (``addr, len, id, flags``) shared by both
directions, plus two 4-byte event suppression areas: the *driver* area (written by the driver,
read by us: when does it want interrupts) and the *device* area (written by us: when do we want
kicks). N is any size in 1..32768, not only a power of two.

There are no indices in memory. Each side keeps a position in the ring and a *wrap counter*
that starts at 1 and flips whenever its position passes the end. The driver makes descriptor
``i`` available by writing ``AVAIL = its wrap, USED = !its wrap`` into its flags; we therefore
see slot ``last_avail_idx`` as available when ``AVAIL == avail_wrap`` and ``USED != avail_wrap``.
A chain occupies consecutive slots (``NEXT`` means "the following slot"); the buffer id is the
``id`` of the chain's last descriptor, and the driver writes the head's flags last, so once the
head is available the whole chain is. We do not look at the availability of the other slots of
a chain (QEMU does not either); the head decides.

Using a chain writes one used descriptor at slot ``used_idx`` (id = buffer id, len = bytes
written, ``AVAIL = USED = used_wrap``) and moves ``used_idx`` on by the number of ring slots that
chain occupied, as QEMU and Linux do. Chains may be used out of order, so we remember the slot
count per buffer id while the chain is in flight. A batch of used descriptors is written with
the first one's flags last, so the driver never sees half a batch.

Reads are snapshots (conventions 6): ``pop`` reads the chain's descriptors one at a time and only
once; ``pop_many`` copies the whole ring once and works on the copy; an indirect table is copied
once before it is checked. Walks are bounded (conventions 9): a chain may span at most the slots
not held by chains in flight (at most N, V-4), an indirect table has at most 32768 entries.

Guest errors, mirroring balloon_dev/virtqueue.py:

* a malformed *chain* whose extent is known (V-5..V-8, and the packed rules on INDIRECT: only a
  chain of one descriptor may point to a table, no flag but WRITE inside it): returned as a
  ``Chain`` with ``error = "<counter>: <detail>"``, counted, logged; the device uses it with len 0;
* a broken *ring*: a ring area outside guest memory, or a chain whose ``NEXT`` flags run on past
  every free slot (V-4: the chain's end, hence where the next chain starts, is unknowable;
  QEMU's "Looped descriptor"): ``RingBroken``, counted; the call consumes nothing.

V-1 and V-2 have no packed counterpart (there is no index to jump and no head index to range
check); the buffer id is opaque to the device, so any 16-bit id is accepted.

Event suppression (protocol.md 1.8). Our device area: with notifications enabled and EVENT_IDX
negotiated we write ``flags = DESC`` and ``off_wrap`` = the slot and wrap we will consume next,
republished after every pop (as QEMU); enabled without EVENT_IDX: ``flags = ENABLE``; disabled:
``flags = DISABLE``. ``should_notify`` reads the driver area: ``DISABLE`` -> no, ``ENABLE`` -> yes,
``DESC`` (only meaningful with EVENT_IDX; treated as ENABLE without it) -> whether the used
descriptors written since the last decision passed the named slot. An ``off_wrap`` whose wrap
bit differs from ours names a slot of the previous lap, i.e. ``off - N`` (Linux and QEMU agree).
"""
from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from balloon_dev.queue_common import (
    _U32_LIMIT,
    Chain,
    ChainBatch,
    QueueCommon,
    RingBroken,
    _ChainError,
)
from guestmem.memory import GuestMemory, GuestMemoryError
from protocol.virtqueue import (
    DESC_SIZE,
    PACKED_DESC_DTYPE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_PACKED_DESC_F_AVAIL,
    VIRTQ_PACKED_DESC_F_USED,
    pack_off_wrap,
    unpack_off_wrap,
    vring_need_event,
)

__all__ = ["CHAIN_ERROR_COUNTERS", "RING_ERROR_COUNTERS", "Chain", "PackedDeviceVirtqueue",
           "PackedVirtqueueState", "RingBroken"]

log = logging.getLogger(__name__)

_PDESC = struct.Struct("<QIHH")  # addr, len, id, flags (protocol.md 1.8)
_U16 = struct.Struct("<H")
_LEN_ID = struct.Struct("<IH")  # len le32 @8, id le16 @12 of a used descriptor
_AVAIL_BIT = 7
_USED_BIT = 15

#: Guest-error counters of a chain, all present from the start so stats show zeros too.
CHAIN_ERROR_COUNTERS = (
    "readable_after_writable",  # V-5
    "indirect_nested",          # V-6: INDIRECT inside a table
    "indirect_with_next",       # V-6 / packed: INDIRECT only on a chain of one descriptor
    "indirect_bad_len",         # V-6
    "indirect_too_long",        # V-6 (our bound on the table copy)
    "indirect_not_negotiated",  # INDIRECT only with RING_INDIRECT_DESC
    "zero_len_buffer",          # V-7
    "buffer_outside_memory",    # V-8
    "chain_too_long",           # total length < 2^32
)
RING_ERROR_COUNTERS = ("chain_unterminated", "ring_outside_memory")
OTHER_COUNTERS = ("buffer_vanished",)

_Row = tuple[int, int, int, int]  # addr, len, id, flags


class _InFlight:
    """Ring slots held by each in-flight chain, by buffer id, oldest first per id.

    numpy arrays over all 2^16 ids (``first``: slots of the oldest chain, ``count``: chains) so a
    batch is booked in a few numpy operations; chains beyond the first of one id (a driver
    reusing an id still in flight: its bug, but we still return every chain once) wait in
    ``more``."""

    def __init__(self) -> None:
        self.first = np.zeros(1 << 16, dtype=np.int64)
        self.count = np.zeros(1 << 16, dtype=np.int64)
        self.more: dict[int, deque[int]] = {}
        self.chains = 0
        self.slots = 0

    def add_many(self, ids: np.ndarray, nslots: np.ndarray) -> None:
        if ids.size == 0:
            return
        if np.unique(ids).size == ids.size and not self.count[ids].any():
            self.first[ids] = nslots
            self.count[ids] = 1
        else:
            for i, n in zip(ids.tolist(), nslots.tolist(), strict=True):
                if self.count[i]:
                    self.more.setdefault(i, deque()).append(n)
                else:
                    self.first[i] = n
                self.count[i] += 1
        self.chains += int(ids.size)
        self.slots += int(nslots.sum())

    def missing(self, ids: np.ndarray) -> int | None:
        """An id of ``ids`` that is not in flight as often as it appears, or None."""
        uniq, times = np.unique(ids, return_counts=True)
        short = np.flatnonzero(self.count[uniq] < times)
        return int(uniq[short[0]]) if short.size else None

    def take_one(self, i: int) -> int:
        """Slots of the oldest chain of id ``i`` (in flight: checked by the caller)."""
        n = int(self.first[i])
        self.count[i] -= 1
        q = self.more.get(i)
        if q:
            self.first[i] = q.popleft()
            if not q:
                del self.more[i]
        self.chains -= 1
        self.slots -= n
        return n

    def peek_many(self, ids: np.ndarray) -> np.ndarray:
        """What ``take_many(ids)`` would return, changing nothing."""
        if np.unique(ids).size == ids.size:
            return self.first[ids].copy()
        seen: dict[int, int] = {}
        ns = np.empty(ids.size, dtype=np.int64)
        for k, i in enumerate(ids.tolist()):
            c = seen.get(i, 0)
            ns[k] = self.first[i] if c == 0 else self.more[i][c - 1]
            seen[i] = c + 1
        return ns

    def take_many(self, ids: np.ndarray) -> np.ndarray:
        """Slots of the oldest chain of each id, in order (``missing`` checked first)."""
        if np.unique(ids).size == ids.size and (self.count[ids] == 1).all():
            ns = self.first[ids].copy()
            self.count[ids] = 0
            self.chains -= int(ids.size)
            self.slots -= int(ns.sum())
            return ns
        return np.array([self.take_one(i) for i in ids.tolist()], dtype=np.int64)

    def items(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        return tuple((i, (int(self.first[i]), *self.more.get(i, ())))
                     for i in np.flatnonzero(self.count).tolist())


@dataclass(frozen=True, slots=True)
class PackedVirtqueueState:
    """Everything a packed queue remembers besides guest memory (conventions 8)."""

    last_avail_idx: int
    avail_wrap: int
    used_idx: int
    used_wrap: int
    notifications: bool
    signalled_used: int
    signalled_wrap: int
    signalled_valid: bool
    in_flight: tuple[tuple[int, tuple[int, ...]], ...] = field(default=())  # id -> slot counts


class PackedDeviceVirtqueue(QueueCommon):
    """The device side of one packed virtqueue of ``size`` descriptors.

    ``desc`` is the descriptor ring, ``driver`` the driver event suppression area, ``device`` the
    device event suppression area (the transport's queue_desc / queue_driver / queue_device)."""

    _chain_label = "chain of id"

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = True, reject_zero_len: bool = True,
                 name: str = "vq", ram: Sequence[tuple[int, int]] | None = None) -> None:
        if not 0 < size <= VIRTQ_MAX_SIZE:
            # protocol.md 1.8: any size up to 2^15; the transport refuses others first.
            raise RingBroken(f"{name}: packed queue size {size} not in 1..32768")
        super().__init__(mem, size, desc, driver, device, event_idx=event_idx, indirect=indirect,
                         reject_zero_len=reject_zero_len, name=name, ram=ram,
                         counters=CHAIN_ERROR_COUNTERS + RING_ERROR_COUNTERS + OTHER_COUNTERS)
        self.reset()

    # -- bookkeeping ----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all ring state (device reset). Counters are cumulative and kept."""
        self.last_avail_idx = 0
        self.avail_wrap = 1   # protocol.md 1.8: both wrap counters start at 1
        self.used_idx = 0
        self.used_wrap = 1
        self._notifications = True
        self._signalled = (0, 1)
        self._signalled_valid = True
        # buffer id -> ring slots of each in-flight chain with that id (FIFO; a driver reusing an
        # id still in flight is its own bug, but we still return every chain once).
        self._inflight = _InFlight()

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back."""
        return self._inflight.chains

    def state(self) -> PackedVirtqueueState:
        return PackedVirtqueueState(
            self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap,
            self._notifications, self._signalled[0], self._signalled[1], self._signalled_valid,
            self._inflight.items())

    def restore(self, st: PackedVirtqueueState) -> None:
        """Resume from ``state()``; counters are kept."""
        self.last_avail_idx, self.avail_wrap = st.last_avail_idx % self.size, st.avail_wrap & 1
        self.used_idx, self.used_wrap = st.used_idx % self.size, st.used_wrap & 1
        self._notifications = st.notifications
        self._signalled = (st.signalled_used, st.signalled_wrap & 1)
        self._signalled_valid = st.signalled_valid
        self._inflight = _InFlight()
        pairs = [(i, n) for i, d in st.in_flight for n in d]
        self._inflight.add_many(np.array([i for i, _ in pairs], dtype=np.int64),
                                np.array([n for _, n in pairs], dtype=np.int64))

    # -- available side --------------------------------------------------------------------
    def _room(self) -> int:
        """Slots not held by chains in flight: the most a new walk may look at."""
        return self.size - self._inflight.slots

    def _snapshot(self) -> np.ndarray:
        """One copy of the whole descriptor ring (the only version pop_many looks at)."""
        try:
            return self.mem.array(self.desc, PACKED_DESC_DTYPE, self.size).copy()
        except GuestMemoryError as e:
            raise self._area_broken("descriptor ring", self.desc, e) from None

    def _avail_mask(self, flags: np.ndarray, room: int) -> np.ndarray:
        """For the next ``room`` slots from last_avail_idx (in order): is each available?"""
        k = np.arange(room)
        slots = self.last_avail_idx + k
        wrap = np.where(slots < self.size, self.avail_wrap, self.avail_wrap ^ 1)
        f = flags[slots % self.size].astype(np.int64)
        return ((f >> _AVAIL_BIT) & 1 == wrap) & ((f >> _USED_BIT) & 1 != wrap)

    def _available(self, room: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One snapshot of the ring, which of the next ``room`` slots are available, and the
        length of the available run from last_avail_idx (what pending and pop_many start from)."""
        snap = self._snapshot()
        avail = self._avail_mask(snap["flags"], room)
        run = room if avail.all() else int(np.argmin(avail))
        return snap, avail, run

    def _is_avail(self, flags: int, k: int) -> bool:
        wrap = self.avail_wrap if self.last_avail_idx + k < self.size else self.avail_wrap ^ 1
        return (flags >> _AVAIL_BIT & 1) == wrap and (flags >> _USED_BIT & 1) != wrap

    def pending(self) -> int:
        """Available chains not yet consumed (0 when the next slot is not available).

        RingBroken when a chain runs past every free slot (see the module docstring)."""
        room = self._room()
        if room <= 0:
            return 0
        snap, avail, run = self._available(room)
        if run == 0:
            return 0
        flags = snap["flags"]
        order = (self.last_avail_idx + np.arange(room)) % self.size
        nxt = (flags[order] & VIRTQ_DESC_F_NEXT) != 0
        if not nxt[:run].any():
            return run  # one-descriptor chains, the usual case
        n = k = 0
        while k < room and avail[k]:
            k = self._chain_end(lambda j: int(flags[order[j]]), k, room) + 1
            n += 1
        return n

    def _chain_end(self, flag_at: Callable[[int], int], k: int, room: int) -> int:
        """Offset of the last descriptor of the chain whose head is at offset ``k``."""
        j = k
        while flag_at(j) & VIRTQ_DESC_F_NEXT:
            j += 1
            if j >= room:
                raise self._unterminated(k, j, room)
        return j

    def _unterminated(self, k: int, j: int, room: int) -> RingBroken:
        # V-4 (QEMU "Looped descriptor"): no end within the free slots, so where the next
        # chain starts is unknowable.
        return self._broken(
            "chain_unterminated",
            f"chain at slot {(self.last_avail_idx + k) % self.size:#x} still has NEXT after "
            f"{j - k:#x} descriptors ({room:#x} slots free, size {self.size:#x})")

    def _read_row(self, k: int) -> _Row:
        slot = (self.last_avail_idx + k) % self.size
        try:
            return _PDESC.unpack(self.mem.read(self.desc + DESC_SIZE * slot, DESC_SIZE))
        except GuestMemoryError as e:
            raise self._area_broken("descriptor ring", self.desc, e) from None

    def pop(self) -> Chain | None:
        """The next available chain, or None. Reads only that chain's descriptors, each once."""
        room = self._room()
        if room <= 0:
            return None
        head = self._read_row(0)
        if not self._is_avail(head[3], 0):
            return None
        rows = [head]
        while rows[-1][3] & VIRTQ_DESC_F_NEXT:
            if len(rows) >= room:
                raise self._unterminated(0, len(rows), room)
            rows.append(self._read_row(len(rows)))
        chain = self._check(rows)
        self._publish_avail_event(self._advance(self.last_avail_idx, self.avail_wrap, len(rows)))
        self._take([chain], [len(rows)])
        return chain

    def pop_batch(self, max_n: int | None = None) -> ChainBatch:
        """``pop_many`` in the shape of the split ring's batch (every chain walked)."""
        return ChainBatch.of_chains(self.pop_many(max_n))

    def pop_many(self, max_n: int | None = None) -> list[Chain]:
        """Every available chain (at most ``max_n``) from one snapshot of the ring. Same results
        as repeated pop(); a RingBroken anywhere consumes nothing."""
        room = self._room()
        if room <= 0 or (max_n is not None and max_n <= 0):
            return []
        snap, avail, run = self._available(room)
        if run == 0:
            return []
        flags = snap["flags"]
        order = (self.last_avail_idx + np.arange(run)) % self.size
        rows = snap[order]
        rf = rows["flags"]
        # Fast path: a prefix of plain one-descriptor chains that pass every check, in one batch.
        plain = (rf & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT)) == 0
        lens = rows["len"].astype(np.uint64)
        plain &= lens > 0
        plain &= self._contains_many(rows["addr"], lens)
        nfast = run if plain.all() else int(np.argmin(plain))
        if max_n is not None:
            nfast = min(nfast, max_n)
        chains: list[Chain] = []
        slots: list[int] = []
        if nfast:
            wr = ((rf[:nfast] & VIRTQ_DESC_F_WRITE) != 0).tolist()
            for bid, a, ln, w in zip(rows["id"][:nfast].tolist(), rows["addr"][:nfast].tolist(),
                                     lens[:nfast].tolist(), wr, strict=True):
                chains.append(Chain(bid, (), ((a, ln),)) if w else Chain(bid, ((a, ln),), ()))
            slots = [1] * nfast
        k = nfast
        full: list[_Row] | None = None  # the snapshot as tuples, made only if a walk needs it
        # Heads are judged one by one (as pop does): a chain's later slots need not be marked
        # available, so the next head may lie past the end of the available run.
        while k < room and avail[k] and (max_n is None or len(chains) < max_n):
            end = self._chain_end(lambda j: int(flags[(self.last_avail_idx + j) % self.size]),
                                  k, room)
            if full is None:
                full = snap.tolist()
            chains.append(self._check([full[(self.last_avail_idx + j) % self.size]
                                       for j in range(k, end + 1)]))
            slots.append(end + 1 - k)
            k = end + 1
        self._publish_avail_event(self._advance(self.last_avail_idx, self.avail_wrap, k))
        self._take(chains, slots)
        return chains

    def _advance(self, idx: int, wrap: int, n: int) -> tuple[int, int]:
        idx += n
        if idx >= self.size:
            idx -= self.size
            wrap ^= 1
        return idx, wrap

    def _take(self, chains: list[Chain], slots: list[int]) -> None:
        """Commit popped chains: move last_avail_idx, book them in flight, count their errors."""
        self.last_avail_idx, self.avail_wrap = self._advance(self.last_avail_idx,
                                                             self.avail_wrap, sum(slots))
        self._inflight.add_many(np.fromiter((c.head for c in chains), dtype=np.int64,
                                            count=len(chains)),
                                np.asarray(slots, dtype=np.int64))
        for chain in chains:
            if chain.error is not None:
                counter, _, detail = chain.error.partition(": ")
                self._count(counter, detail)

    # -- chain checks ----------------------------------------------------------------------
    def _check(self, rows: list[_Row]) -> Chain:
        bid = rows[-1][2]  # protocol.md 1.8: the buffer id lives in the chain's last descriptor
        out: list[tuple[int, int]] = []
        in_: list[tuple[int, int]] = []
        try:
            self._check_into(rows, out, in_)
        except _ChainError as e:
            # Counted by _take, once the chain is really consumed (a RingBroken later in the
            # same batch consumes nothing, and then counts nothing of it either).
            return Chain(bid, tuple(out), tuple(in_), f"{e.counter}: chain of id {bid:#x}: {e}")
        return Chain(bid, tuple(out), tuple(in_))

    def _check_into(self, rows: list[_Row], out: list[tuple[int, int]],
                    in_: list[tuple[int, int]]) -> None:
        total = 0
        for i, (addr, length, _, flags) in enumerate(rows):
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise _ChainError("indirect_not_negotiated",
                                      f"desc +{i:#x}: INDIRECT without RING_INDIRECT_DESC")
                if len(rows) > 1:
                    # virtio 1.3 2.8.19: no INDIRECT descriptor in a list linked by NEXT.
                    raise _ChainError("indirect_with_next",
                                      f"desc +{i:#x}: INDIRECT in a chain of {len(rows)} (V-6)")
                self._check_table(addr, length, out, in_)
                return
            total = self._buffer("desc +", i, addr, length, flags, total, out, in_)

    def _check_table(self, addr: int, length: int, out: list[tuple[int, int]],
                     in_: list[tuple[int, int]]) -> None:
        if length == 0 or length % DESC_SIZE:
            raise _ChainError("indirect_bad_len", f"indirect table length {length:#x} (V-6)")
        count = length // DESC_SIZE
        if count > VIRTQ_MAX_SIZE:
            raise _ChainError("indirect_too_long",
                              f"indirect table of {count:#x} entries > 0x8000")
        if not self.mem.contains(addr, length):
            raise _ChainError("buffer_outside_memory",
                              f"indirect table [{addr:#x}, +{length:#x}) outside guest memory"
                              " (V-8)")
        # One copy: each entry is read once. All entries belong to the buffer (packed tables have
        # no NEXT links); WRITE is the only flag that means anything there.
        table = np.frombuffer(self.mem.read(addr, length), dtype=PACKED_DESC_DTYPE)
        if count >= self.indirect_batch_min and self._table_buffers(table, 0, out, in_):
            return
        total = 0
        where = f"indirect[{addr:#x}] "
        for i, (a, ln, _, f) in enumerate(table.tolist()):
            if f & VIRTQ_DESC_F_INDIRECT:
                raise _ChainError("indirect_nested",
                                  f"{where}{i:#x}: INDIRECT inside a table (V-6)")
            total = self._buffer(where, i, a, ln, f, total, out, in_)

    # -- used side -------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return the chain of buffer id ``head`` with ``written`` bytes written: one used
        descriptor at used_idx (len and id first, flags last)."""
        if not (0 <= head <= 0xFFFF and 0 <= written < _U32_LIMIT):
            raise ValueError(f"{self.name}: bad used element id={head} len={written}")
        if not self._inflight.count[head]:
            # Our own caller's bug (usage error).
            raise ValueError(f"{self.name}: pushing id {head:#x}, which is not in flight")
        gpa = self.desc + DESC_SIZE * self.used_idx
        used_flags = (VIRTQ_PACKED_DESC_F_AVAIL | VIRTQ_PACKED_DESC_F_USED) if self.used_wrap else 0
        try:
            self.mem.write(gpa + 8, _LEN_ID.pack(written, head))
            self.mem.write(gpa + 14, _U16.pack(used_flags))
        except GuestMemoryError as e:
            raise self._area_broken("descriptor ring", self.desc, e) from None
        n = self._inflight.take_one(head)
        self.used_idx, self.used_wrap = self._advance(self.used_idx, self.used_wrap, n)

    def push_heads(self, heads: np.ndarray) -> None:
        """``push_many`` of (head, 0) for every head, in order."""
        self.push_many(np.column_stack((heads, np.zeros(heads.size, np.int64))))

    def push_many(self, elems: Sequence[tuple[int, int]] | np.ndarray) -> None:
        """Return chains: one used descriptor each, in order, the first one's flags last."""
        n = len(elems)
        if n == 0:
            return
        arr = np.asarray(elems, dtype=np.int64).reshape(n, 2)
        ids, lens = arr[:, 0], arr[:, 1]
        if ids.min() < 0 or ids.max() > 0xFFFF or lens.min() < 0 or lens.max() >= _U32_LIMIT:
            raise ValueError(f"{self.name}: used elements out of range (id < 2^16, "
                             "0 <= len < 2^32)")
        bad = self._inflight.missing(ids)
        if bad is not None:
            # Our own caller's bug (usage error): this id is not in flight that often.
            raise ValueError(f"{self.name}: pushing id {bad:#x} more often than it is in flight")
        nslots = self._inflight.peek_many(ids)
        # Linear positions: used descriptor k goes where the slots of the chains before it end.
        pos = self.used_idx + np.concatenate(([0], np.cumsum(nslots[:-1])))
        slots = pos % self.size
        wraps = (self.used_wrap + pos // self.size) & 1
        used_flags = np.where(wraps == 1, VIRTQ_PACKED_DESC_F_AVAIL | VIRTQ_PACKED_DESC_F_USED,
                              0).astype(np.uint16)
        end = int(pos[-1] + nslots[-1])
        try:
            ring = self.mem.array(self.desc, PACKED_DESC_DTYPE, self.size, writable=True)
        except GuestMemoryError as e:
            raise self._area_broken("descriptor ring", self.desc, e) from None
        ring["len"][slots] = lens
        ring["id"][slots] = ids
        # Flags publish a used descriptor: the later ones first, the first one last, so the
        # driver (which reads from the first) never sees half a batch.
        ring["flags"][slots[1:]] = used_flags[1:]
        ring["flags"][slots[0]] = used_flags[0]
        lo, hi = int(slots.min()), int(slots.max())
        self.mem.mark_dirty(self.desc + DESC_SIZE * lo, DESC_SIZE * (hi - lo + 1))
        self._inflight.take_many(ids)
        self.used_idx, self.used_wrap = end % self.size, (self.used_wrap + end // self.size) & 1

    # -- notifications -------------------------------------------------------------------
    def should_notify(self) -> bool:
        """Whether the used descriptors written since the previous decision call for an
        interrupt, per the driver's event suppression area."""
        old, old_wrap = self._signalled
        new, new_wrap = self.used_idx, self.used_wrap
        valid = self._signalled_valid
        self._signalled, self._signalled_valid = (new, new_wrap), True
        if valid and (old, old_wrap) == (new, new_wrap):
            return False
        try:
            off_wrap = self.mem.read_u16(self.driver)
            flags = self.mem.read_u16(self.driver + 2) & 3
        except GuestMemoryError as e:
            raise self._area_broken("driver event area", self.driver, e) from None
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or not valid:
            return True  # ENABLE (and DESC without EVENT_IDX, or after a restore: be safe)
        if old_wrap != new_wrap:
            old -= self.size  # the previous decision was on the previous lap
            if old < new - self.size:
                return True
        off, ewrap = unpack_off_wrap(off_wrap)
        if ewrap != new_wrap:
            off -= self.size  # the driver names a slot of the previous lap
        return vring_need_event(off & 0xFFFF, new & 0xFFFF, old & 0xFFFF)

    def _write_event(self, off_wrap: int | None, flags: int) -> None:
        try:
            if off_wrap is not None:
                self.mem.write(self.device, _U16.pack(off_wrap))
            self.mem.write(self.device + 2, _U16.pack(flags))
        except GuestMemoryError as e:
            raise self._area_broken("device event area", self.device, e) from None

    def _publish_avail_event(self, nxt: tuple[int, int]) -> None:
        # Published before committing, so a bad device area consumes nothing.
        if self.event_idx and self._notifications:
            self._write_event(pack_off_wrap(*nxt), RING_EVENT_FLAGS_DESC)

    def enable_notifications(self) -> None:
        """Ask the driver to kick again. Callers re-check ``pending()`` afterwards."""
        self._notifications = True
        if self.event_idx:
            self._write_event(pack_off_wrap(self.last_avail_idx, self.avail_wrap),
                              RING_EVENT_FLAGS_DESC)
        else:
            self._write_event(None, RING_EVENT_FLAGS_ENABLE)

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (advisory)."""
        self._notifications = False
        self._write_event(None, RING_EVENT_FLAGS_DISABLE)
