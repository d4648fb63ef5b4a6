"""The device side of a split virtqueue over guest memory (protocol.md section 1).

Theory of operation
-------------------
The queue never owns memory: it holds three guest addresses (descriptor table, driver area =
available ring, device area = used ring) and two free-running ``uint16`` indices,
``last_avail_idx`` (the next available entry to consume) and ``used_idx`` (the next used entry to
fill). Slots are ``idx & (N - 1)``; every index wraps at 65536 (protocol.md 1.3).

Popping. ``pending()`` reads ``avail.idx`` and checks that it moved by at most N (V-1).
``pop_many`` then reads all new heads with one numpy read, checks them against N (V-2), and
copies the heads' descriptors out of the table with one fancy-indexing read. Chains made of one
plain descriptor (every free page hint, every inflate/deflate/stats buffer Linux posts) are
validated as one numpy batch; anything else (``NEXT``, ``INDIRECT``, zero length, a buffer that
fails the bounds check) goes through the general walk, which produces the same answer a single
``pop`` would, including the error and the counter. ``pop_batch`` returns that result as a
``ChainBatch`` (the plain chains as arrays, the walked ones as ``Chain`` objects), which the
device's free page path consumes without a Python object per hint; ``pop_many`` is the same
batch as a list of ``Chain``. ``pop`` takes the general walk directly: it reads only the
descriptors of one chain, so it costs O(chain) and not O(N).

Each descriptor is read from guest memory exactly once per pop and only that copy is used; an
indirect table is copied once before it is walked. A guest that rewrites descriptors while we
walk therefore cannot make us see two versions of one (no TOCTOU, conventions 6). Every walk is
bounded (conventions 9): at most N descriptors in the main table and at most the table's entry
count inside an indirect table (V-3, V-4); indirect tables are capped at 32768 entries so the
copy is bounded too. Tables of at least ``indirect_batch_min`` entries laid out the usual way
(entry k links to k+1) are checked as one numpy batch; any other table takes the walk.

Two kinds of guest error (architecture "Errors name whose fault it is"):

* a malformed *chain* (V-3..V-8): the chain is returned with ``error`` set to
  ``"<counter>: <detail>"``, ``out``/``in_`` hold the buffers validated before the fault, the
  named counter in ``counters`` goes up and a warning with hex detail is logged. The device
  returns it with len 0 and carries on;
* a broken *ring* (V-1 pending > N, V-2 head >= N, a ring area outside guest memory):
  ``RingBroken`` is raised and counted; the device must set DEVICE_NEEDS_RESET (QEMU's
  ``virtio_error()``). The call that raises consumes nothing.

``GuestMemoryError`` never escapes this module.

Shared with the packed ring (``balloon_dev.queue_common``): ``Chain``, ``ChainBatch``,
``RingBroken`` and ``QueueCommon``, which holds what both ring formats check the same way
(counters and log lines, V-8 bounds, the per-buffer rules of a chain, ``read_out``); they are
importable from here too. ``DeviceVirtqueue`` (here) and
``balloon_dev.packed_virtqueue.PackedDeviceVirtqueue`` add their ring layout on top.

Guest RAM vs readable memory. V-8 asks that every buffer lie in guest RAM. By default that is
``mem``'s regions (wholly inside one of them). A host whose ``GuestMemory`` holds only the bytes
it reads (the driver area) while hints point at RAM modelled by ``PageVersions`` passes
``ram=[(gpa, size), ...]``, and buffers are checked against those ranges instead (vmsim does:
only its driver area is byte-backed, and ``BalloonDevice`` passes RAM plus the byte-backed
regions when ``DeviceConfig.ram_pages`` is set). Descriptor and indirect tables are read, so
they must always lie in ``mem``.

Pushing. ``push``/``push_many`` write used elements, then publish ``used.idx`` once, through
``GuestMemory`` so the dirty log sees them. The device writes nothing but the used ring
(elements, ``flags``, ``idx`` and ``avail_event``): never a readable buffer, never the
descriptor table (V-9).

Notifications (protocol.md 1.4). Without EVENT_IDX the device sets ``used.flags`` NO_NOTIFY to
suppress kicks and honours ``avail.flags`` NO_INTERRUPT. With EVENT_IDX, ``used.flags`` stays 0;
while notifications are enabled each pop republishes ``avail_event = last_avail_idx`` (QEMU
does the same), so the driver kicks for the first entry we have not seen; disabling simply stops
updating it. ``should_notify`` applies ``vring_need_event(used_event, new, old)`` over the used
entries written since the previous decision, and answers True the first time after an external
change of ``used_idx`` (as QEMU's ``signalled_used_valid`` after a load).
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from balloon_dev.queue_common import (
    _EMPTY_BATCH,
    _U32_LIMIT,
    CHAIN_ERROR_COUNTERS,
    OTHER_COUNTERS,
    RING_ERROR_COUNTERS,
    Chain,
    ChainBatch,
    QueueCommon,
    RingBroken,
    _ChainError,
)
from guestmem.memory import GuestMemory, GuestMemoryError
from protocol.virtqueue import (
    DESC_DTYPE,
    DESC_SIZE,
    USED_ELEM_DTYPE,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

__all__ = ["CHAIN_ERROR_COUNTERS", "OTHER_COUNTERS", "RING_ERROR_COUNTERS", "Chain", "ChainBatch",
           "DeviceVirtqueue", "QueueCommon", "RingBroken", "VirtqueueState"]

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next (protocol.md 1.2)
_USED_ELEM = struct.Struct("<II")
_NEXT_OR_INDIRECT = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
_ZERO_LEN = np.zeros(1, np.int64)


@dataclass(frozen=True, slots=True)
class VirtqueueState:
    """Everything a queue remembers besides guest memory (conventions 8): enough to save a
    device and resume it elsewhere (vhost-user GET/SET_VRING_BASE carry ``last_avail_idx``)."""

    last_avail_idx: int
    used_idx: int
    notifications: bool
    signalled_used: int
    signalled_valid: bool


class DeviceVirtqueue(QueueCommon):
    """The device side of one split virtqueue of ``size`` entries at the given guest addresses."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool = False, indirect: bool = True, reject_zero_len: bool = True,
                 name: str = "vq", ram: Sequence[tuple[int, int]] | None = None) -> None:
        if size <= 0 or size > VIRTQ_MAX_SIZE or size & (size - 1):
            # The transport must refuse such a size before it gets here; reaching us is a broken
            # ring (a split queue size is a power of two <= 32768, protocol.md 1.1).
            raise RingBroken(f"{name}: queue size {size} is not a power of two <= 32768")
        super().__init__(mem, size, desc, driver, device, event_idx=event_idx, indirect=indirect,
                         reject_zero_len=reject_zero_len, name=name, ram=ram,
                         counters=CHAIN_ERROR_COUNTERS + RING_ERROR_COUNTERS + OTHER_COUNTERS)
        self.last_avail_idx = 0
        self._used_idx = 0
        self._signalled_used = 0
        # QEMU's signalled_used_valid: False only when used_idx was set from outside, then the next
        # decision notifies unconditionally. A fresh queue knows nothing was signalled before 0.
        self._signalled_valid = True
        self._notifications = True

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        # Set from outside (restore, vhost-user SET_VRING_BASE, tests): the last notify decision
        # no longer describes this index, so the next decision must not suppress.
        self._used_idx = value & 0xFFFF
        self._signalled_valid = False

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back."""
        return (self.last_avail_idx - self._used_idx) & 0xFFFF

    def state(self) -> VirtqueueState:
        return VirtqueueState(self.last_avail_idx, self._used_idx, self._notifications,
                              self._signalled_used, self._signalled_valid)

    def restore(self, st: VirtqueueState) -> None:
        """Resume from ``state()``; counters are not part of the state and are kept."""
        self.last_avail_idx = st.last_avail_idx & 0xFFFF
        self._used_idx = st.used_idx & 0xFFFF
        self._notifications = st.notifications
        self._signalled_used = st.signalled_used & 0xFFFF
        self._signalled_valid = st.signalled_valid

    def reset(self) -> None:
        """Forget all ring state (device reset). Counters are cumulative and kept."""
        self.last_avail_idx = 0
        self._used_idx = 0
        self._signalled_used = 0
        self._signalled_valid = True
        self._notifications = True

    # -- available side --------------------------------------------------------------------
    def _avail_idx(self) -> int:
        try:
            return self.mem.read_u16(self.driver + 2)
        except GuestMemoryError as e:
            raise self._area_broken("avail ring", self.driver, e) from None

    def pending(self) -> int:
        """Available entries not yet consumed; RingBroken when more than the queue size (V-1)."""
        n = (self._avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            # V-1 (QEMU "Guest moved used index from %u to %u"): avail.idx moved by more than N.
            new = (self.last_avail_idx + n) & 0xFFFF
            raise self._broken("avail_idx_jump", f"avail idx {new:#x} is {n:#x} ahead of "
                               f"{self.last_avail_idx:#x} > size {self.size:#x}")
        return n

    def _table(self) -> memoryview:
        try:
            return self.mem.view(self.desc, DESC_SIZE * self.size)
        except GuestMemoryError as e:
            raise self._area_broken("descriptor table", self.desc, e) from None

    def pop(self) -> Chain | None:
        """The next available chain, or None. Reads only that chain's descriptors."""
        if self.pending() == 0:
            return None
        slot = self.last_avail_idx & (self.size - 1)
        try:
            head = self.mem.read_u16(self.driver + 4 + 2 * slot)
        except GuestMemoryError as e:
            raise self._area_broken("avail ring", self.driver, e) from None
        if head >= self.size:
            raise self._head_broken(0, head)
        table = self._table()
        chain = self._walk(head, _DESC.unpack_from(table, DESC_SIZE * head), table)
        self._consume(1)
        return chain

    def _head_broken(self, k: int, head: int) -> RingBroken:
        # V-2 (QEMU "Guest says index %u is available"): the ring is unusable from here on.
        idx = (self.last_avail_idx + k) & 0xFFFF
        return self._broken("head_out_of_range",
                            f"avail entry {idx:#x} names head {head:#x} >= size {self.size:#x}")

    def pop_many(self, max_n: int | None = None) -> list[Chain]:
        """Every available chain (at most ``max_n``), batched. Same results as repeated pop().

        A bad head (V-2) anywhere in the batch raises RingBroken and consumes nothing."""
        return self.pop_batch(max_n).chains()

    def pop_batch(self, max_n: int | None = None) -> ChainBatch:
        """``pop_many`` as arrays (``ChainBatch``): the same chains, checks, counters and log
        lines, without a ``Chain`` object per plain chain."""
        n = self.pending()
        if max_n is not None:
            n = min(n, max_n)
        if n <= 0:
            return _EMPTY_BATCH
        heads = self._read_heads(n)
        if heads.max() >= self.size:
            k = int(np.argmax(heads >= self.size))
            raise self._head_broken(k, int(heads[k]))
        table = self._table()
        # One copy of just the heads' descriptors: each is read once (the snapshot we use).
        rows = np.frombuffer(table, dtype=DESC_DTYPE, count=self.size)[heads]
        flags = rows["flags"]
        lens = rows["len"].astype(np.uint64)
        addrs = rows["addr"]
        # Plain one-descriptor chains that pass every check stay arrays; the rest are walked
        # one by one, in ring order, which also produces their error, counter and log line.
        ok = ((flags & _NEXT_OR_INDIRECT) == 0) & (lens > 0)
        ok &= self._contains_many(addrs, lens)
        walked: dict[int, Chain] = {}
        if not ok.all():
            for k in np.flatnonzero(~ok).tolist():
                walked[k] = self._walk(int(heads[k]), rows[k].item(), table)
        self._consume(n)
        return ChainBatch(heads, addrs, lens, (flags & VIRTQ_DESC_F_WRITE) != 0, ok, walked)

    def _consume(self, n: int) -> None:
        new = (self.last_avail_idx + n) & 0xFFFF
        if self.event_idx and self._notifications:
            # Published before committing, so a used ring outside memory consumes nothing.
            self._write_used_word(self.device + 4 + USED_ELEM_SIZE * self.size, new)
        self.last_avail_idx = new

    def _read_heads(self, n: int) -> np.ndarray:
        start = self.last_avail_idx & (self.size - 1)
        ring = self.driver + 4
        try:
            first = min(n, self.size - start)
            part = self.mem.array(ring + 2 * start, "<u2", first)
            if first == n:
                return part.astype(np.intp)
            rest = self.mem.array(ring, "<u2", n - first)
        except GuestMemoryError as e:
            raise self._area_broken("avail ring", self.driver, e) from None
        return np.concatenate((part, rest)).astype(np.intp)

    # -- the general walk -------------------------------------------------------------------
    def _walk(self, head: int, first: tuple[int, int, int, int], table: memoryview) -> Chain:
        out: list[tuple[int, int]] = []
        in_: list[tuple[int, int]] = []
        try:
            self._walk_into(head, first, table, out, in_)
        except _ChainError as e:
            self._count(e.counter, f"chain at head {head:#x}: {e}")
            return Chain(head, tuple(out), tuple(in_), f"{e.counter}: {e}")
        return Chain(head, tuple(out), tuple(in_))

    def _walk_into(self, head: int, d: tuple[int, int, int, int], src: memoryview | bytes,
                   out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> None:
        limit = self.size          # entries in the table being walked
        where = "desc "            # for messages: main table or indirect table
        in_table = False
        i = head
        seen = 1                   # descriptors visited in the current table
        total = 0
        while True:
            addr, length, flags, nxt = d
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_table:
                    raise _ChainError("indirect_nested",
                                      f"{where}{i:#x}: INDIRECT inside an indirect table (V-6)")
                if not self.indirect:
                    raise _ChainError("indirect_not_negotiated",
                                      f"{where}{i:#x}: INDIRECT without RING_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise _ChainError("indirect_with_next",
                                      f"{where}{i:#x}: INDIRECT with NEXT (V-6)")
                if length == 0 or length % DESC_SIZE:
                    raise _ChainError("indirect_bad_len",
                                      f"{where}{i:#x}: indirect table length {length:#x} (V-6)")
                count = length // DESC_SIZE
                if count > VIRTQ_MAX_SIZE:
                    raise _ChainError("indirect_too_long",
                                      f"{where}{i:#x}: indirect table of {count:#x} entries"
                                      " > 0x8000")
                # Bounds first (the table is read, so it must be byte-backed memory), then one
                # copy of the whole table: its entries are read once (no TOCTOU).
                if not self.mem.contains(addr, length):
                    raise _ChainError("buffer_outside_memory",
                                      f"{where}{i:#x}: indirect table [{addr:#x}, +{length:#x})"
                                      " outside guest memory (V-8)")
                src = self.mem.read(addr, length)
                if count >= self.indirect_batch_min and self._table_batch(src, total, out, in_):
                    return
                limit, in_table, where, i, seen = count, True, f"indirect[{addr:#x}] ", 0, 1
                d = _DESC.unpack_from(src, 0)
                continue
            total = self._buffer(where, i, addr, length, flags, total, out, in_)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            if nxt >= limit:
                raise _ChainError("next_out_of_range",
                                  f"{where}{i:#x}: next {nxt:#x} >= {limit:#x} (V-3)")
            if seen >= limit:
                # V-4: more descriptors than the table holds can only be a loop.
                raise _ChainError("desc_loop",
                                  f"{where}{i:#x}: more than {limit:#x} descriptors (V-4)")
            seen += 1
            i = nxt
            d = _DESC.unpack_from(src, DESC_SIZE * i)

    def _table_batch(self, src: bytes, total: int, out: list[tuple[int, int]],
                     in_: list[tuple[int, int]]) -> bool:
        """An indirect table laid out as drivers write it (entry k -> k+1, the last without
        NEXT) whose buffers all pass ``_table_buffers``; False, with out/in_ untouched, for
        anything else (the entry-by-entry walk then gives the exact answer)."""
        t = np.frombuffer(src, dtype=DESC_DTYPE)
        flags = t["flags"]
        if flags[-1] & VIRTQ_DESC_F_NEXT:
            return False
        if not ((flags[:-1] & VIRTQ_DESC_F_NEXT).all()
                and (t["next"][:-1] == np.arange(1, t.shape[0])).all()):
            return False
        return self._table_buffers(t, total, out, in_)

    # -- used side -------------------------------------------------------------------------
    def _check_push(self, n: int) -> None:
        if n > self.in_flight:
            # Our own caller's bug (usage error): more used elements than chains popped.
            raise ValueError(f"{self.name}: pushing {n} used elements with only "
                             f"{self.in_flight} chains in flight")

    def push(self, head: int, written: int) -> None:
        """Return one chain: used element {head, written}, then publish used.idx."""
        if not (0 <= head < self.size and 0 <= written < _U32_LIMIT):
            raise ValueError(f"{self.name}: bad used element head={head} len={written}")
        self._check_push(1)
        slot = self._used_idx & (self.size - 1)
        gpa = self.device + 4 + USED_ELEM_SIZE * slot
        new = (self._used_idx + 1) & 0xFFFF
        try:
            # Element first, index last: the driver reads used.idx, then the elements below it.
            self.mem.write(gpa, _USED_ELEM.pack(head, written))
            self.mem.write(self.device + 2, _U16.pack(new))
        except GuestMemoryError as e:
            raise self._area_broken("used ring", self.device, e) from None
        self._used_idx = new

    def push_heads(self, heads: np.ndarray) -> None:
        """``push_many`` of (head, 0) for every head, in order."""
        if heads.size and (heads.min() < 0 or heads.max() >= self.size):
            raise ValueError(f"{self.name}: used element heads out of range (< {self.size})")
        self._push(heads, _ZERO_LEN)

    def push_many(self, elems: Sequence[tuple[int, int]] | np.ndarray) -> None:
        """Return many chains with one numpy write per contiguous run and one used.idx publish."""
        n = len(elems)
        if n == 0:
            return
        arr = np.asarray(elems, dtype=np.int64).reshape(n, 2)
        heads, lens = arr[:, 0], arr[:, 1]
        if (heads.min() < 0 or heads.max() >= self.size
                or lens.min() < 0 or lens.max() >= _U32_LIMIT):
            raise ValueError(f"{self.name}: used elements out of range (head < {self.size}, "
                             "0 <= len < 2^32)")
        self._push(heads, lens)

    def _push(self, heads: np.ndarray, lens: np.ndarray) -> None:
        """Used elements (heads[k], lens[k]), checked by the caller; ``lens`` may be one value
        for every head."""
        n = int(heads.size)
        if n == 0:
            return
        self._check_push(n)
        start = self._used_idx & (self.size - 1)
        ring = self.device + 4
        new = (self._used_idx + n) & 0xFFFF
        try:
            first = min(n, self.size - start)
            for slot, lo, hi in ((start, 0, first), (0, first, n)):
                if hi <= lo:
                    continue
                gpa = ring + USED_ELEM_SIZE * slot
                view = self.mem.array(gpa, USED_ELEM_DTYPE, hi - lo, writable=True)
                view["id"] = heads[lo:hi]
                view["len"] = lens if lens.size == 1 else lens[lo:hi]
                self.mem.mark_dirty(gpa, USED_ELEM_SIZE * (hi - lo))
            self.mem.write(self.device + 2, _U16.pack(new))
        except GuestMemoryError as e:
            raise self._area_broken("used ring", self.device, e) from None
        self._used_idx = new

    # -- notifications -------------------------------------------------------------------
    def should_notify(self) -> bool:
        """Whether the used entries written since the previous decision call for an interrupt."""
        old, new, valid = self._signalled_used, self._used_idx, self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        if valid and old == new:
            return False  # nothing new since the last decision
        try:
            if self.event_idx:
                if not valid:
                    return True
                used_event = self.mem.read_u16(self.driver + 4 + 2 * self.size)
                return vring_need_event(used_event, new, old)
            return not self.mem.read_u16(self.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT
        except GuestMemoryError as e:
            raise self._area_broken("avail ring", self.driver, e) from None

    def _write_used_word(self, gpa: int, value: int) -> None:
        try:
            self.mem.write(gpa, _U16.pack(value & 0xFFFF))
        except GuestMemoryError as e:
            raise self._area_broken("used ring", self.device, e) from None

    def enable_notifications(self) -> None:
        """Ask the driver to kick again. Callers re-check ``pending()`` afterwards: entries
        published before this call do not cause a kick."""
        self._notifications = True
        if self.event_idx:
            # Kick me when the driver publishes the entry I will consume next.
            self._write_used_word(self.device + 4 + USED_ELEM_SIZE * self.size,
                                  self.last_avail_idx)
        else:
            self._write_used_word(self.device, 0)

    def disable_notifications(self) -> None:
        """Tell the driver kicks are not needed (advisory; spurious kicks stay harmless)."""
        self._notifications = False
        if not self.event_idx:
            self._write_used_word(self.device, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX avail_event simply stops moving: once the driver passes it, it does not
        # kick again until the index wraps all the way round.
