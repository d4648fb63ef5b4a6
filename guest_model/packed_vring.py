"""The driver side of a packed virtqueue (VIRTIO_F_RING_PACKED, protocol.md 1.8).

Theory of operation
-------------------
Written apart from the device side (balloon_dev/packed_virtqueue.py); the two agree only through
the layouts in ``protocol.virtqueue``. The public surface is ``guest_model.vring.DriverVring``'s,
so the balloon driver uses either ring without knowing which: ``desc_gpa`` is the descriptor
ring, ``avail_gpa`` the *driver* event suppression area (we write it) and ``used_gpa`` the
*device* event suppression area (the device writes it) -- the transport's queue_desc /
queue_driver / queue_device.

State, as Linux's virtio_ring keeps it: ``next_avail`` (slot) with ``avail_wrap`` (starts at 1),
``last_used`` (slot) with ``used_wrap`` (starts at 1), a stack of free buffer ids, and per id
the ring slots its chain took, its token, its indirect table and its writable byte count (a
private shadow: nothing the device writes is trusted when a buffer comes back).

Adding a buffer of k elements takes k consecutive slots (or one slot pointing to an indirect
table of k packed descriptors when RING_INDIRECT_DESC was negotiated and k >= ``indirect_min``).
Every descriptor carries the buffer id; flags carry NEXT (all but the last), WRITE, and
``AVAIL = avail_wrap, USED = !avail_wrap`` for the lap of *its own* slot. The head's flags are
written last: that single write makes the whole chain available.

Reaping reads the descriptor at ``last_used``: it is used when ``AVAIL == USED == used_wrap``.
Its id must name a buffer in flight (else the ring is broken: counted, logged, the device is at
fault); ``last_used`` then moves on by the slots that buffer's chain took. Since one-slot
buffers (hints, pfn arrays) sit in consecutive slots, a run of them is checked and released as
one numpy batch; a longer chain or a bad id is taken one descriptor at a time, in order.

What both ring layouts share (argument checks, indirect tables, tokens, breaking the ring) is
``guest_model.vring.DriverRingBase``.

Notifications: ``kick_prepare`` reads the device area: DISABLE -> no kick, ENABLE -> kick, DESC
(with EVENT_IDX) -> kick when the slots published since the last kick passed ``off_wrap`` (a
wrap bit unlike ours means the previous lap: ``off - N``). ``disable_cb`` writes DISABLE into the
driver area; ``enable_cb`` writes ENABLE, or with EVENT_IDX ``DESC`` at ``(last_used,
used_wrap)``, re-armed after every reap.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import numpy as np

from guest_model.vring import Buf, DriverArea, DriverRingBase
from guestmem import GuestMemory
from guestmem.units import Gpa
from protocol.errors import UsageError
from protocol.virtqueue import (
    DESC_SIZE,
    PACKED_DESC_DTYPE,
    PACKED_EVENT_SUPPRESS_SIZE,
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

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_BOTH = VIRTQ_PACKED_DESC_F_AVAIL | VIRTQ_PACKED_DESC_F_USED


class PackedDriverVring(DriverRingBase):
    """The driver side of one packed virtqueue; same methods as ``DriverVring`` (argument
    checks, indirect-table allocation, tokens and breaking come from ``DriverRingBase``)."""

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int,
                 event_idx: bool = False, indirect: bool = False, *,
                 area: DriverArea | None = None, indirect_min: int = 2, name: str = "") -> None:
        if not 0 < size <= VIRTQ_MAX_SIZE:
            raise UsageError(f"packed queue size {size} not in 1..{VIRTQ_MAX_SIZE}")
        if desc % 16 or driver % 4 or device % 4:
            raise UsageError(f"ring areas misaligned: desc {desc:#x} driver {driver:#x} "
                             f"device {device:#x} (need 16/4/4)")
        self._init_common(mem, size, event_idx, indirect, area, indirect_min, name)
        self.desc_gpa, self.avail_gpa, self.used_gpa = Gpa(desc), Gpa(driver), Gpa(device)
        mem.fill(desc, DESC_SIZE * size, 0)
        mem.fill(driver, PACKED_EVENT_SUPPRESS_SIZE, 0)
        mem.fill(device, PACKED_EVENT_SUPPRESS_SIZE, 0)
        self._ring = mem.array(desc, PACKED_DESC_DTYPE, size, writable=True)
        self.next_avail, self.avail_wrap = 0, 1
        self.last_used, self.used_wrap = 0, 1
        self._free_ids = list(range(size - 1, -1, -1))  # stack of buffer ids
        self._nfree = size                               # free ring slots
        self._slots = np.zeros(size, dtype=np.int64)     # ring slots per id (0 = id free)
        self._tbl = np.zeros(size, dtype=np.int64)
        self._in_bytes = np.zeros(size, dtype=np.int64)
        self._num_added = 0
        self._cb_enabled = True

    # -- state ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free ring slots (a buffer of k direct elements needs k of them)."""
        return min(self._nfree, len(self._free_ids))

    @property
    def in_flight(self) -> int:
        return self.size - len(self._free_ids)

    def more_used(self) -> bool:
        if self.in_flight == 0:
            return False
        f = int(self._ring["flags"][self.last_used])
        return self._is_used(f, self.used_wrap)

    @staticmethod
    def _is_used(flags: int, wrap: int) -> bool:
        return (flags & _BOTH) == (_BOTH if wrap else 0)

    # -- adding ----------------------------------------------------------------------------
    def _take_slots(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` slots and each one's avail flag bits; moves next_avail on."""
        pos = self.next_avail + np.arange(n)
        slots = pos % self.size
        wraps = (self.avail_wrap + pos // self.size) & 1
        end = self.next_avail + n
        self.next_avail = end % self.size
        self.avail_wrap = (self.avail_wrap + end // self.size) & 1
        self._nfree -= n
        bits = np.where(wraps == 1, VIRTQ_PACKED_DESC_F_AVAIL, VIRTQ_PACKED_DESC_F_USED)
        return slots, bits.astype(np.uint16)

    def _mark(self, slots: np.ndarray) -> None:
        lo, hi = int(slots.min()), int(slots.max())
        self.mem.mark_dirty(self.desc_gpa + DESC_SIZE * lo, DESC_SIZE * (hi - lo + 1))

    def add_buf(self, out: Sequence[Buf] = (), in_: Sequence[Buf] = (),
                token: object = None) -> int:
        """Post one buffer (readable ``out`` then writable ``in_``); returns its buffer id.

        ``VringFull`` when slots or ids are short, ``UsageError`` for an empty or over-long
        chain, ``VringBroken`` once the ring is broken."""
        elems = self._chain_elems(out, in_)
        total = len(elems)
        tbl = self._indirect_table(total)
        need = 1 if tbl else total
        self._check_room(need, tbl)
        bid = self._free_ids.pop()
        slots, bits = self._take_slots(need)
        if tbl:
            t = self.mem.array(tbl, PACKED_DESC_DTYPE, total, writable=True)
            t["addr"] = [a for a, _, _ in elems]
            t["len"] = [n for _, n, _ in elems]
            t["id"] = 0
            t["flags"] = [f for _, _, f in elems]  # WRITE is the only flag in a table
            self.mem.mark_dirty(tbl, DESC_SIZE * total)
            self._ring[["addr", "len", "id"]][slots[0]] = (tbl, DESC_SIZE * total, bid)
            flags = np.array([VIRTQ_DESC_F_INDIRECT], dtype=np.uint16)
            self.counters["added_indirect"] += 1
        else:
            r = self._ring
            r["addr"][slots] = [a for a, _, _ in elems]
            r["len"][slots] = [n for _, n, _ in elems]
            r["id"][slots] = bid
            flags = np.array([f for _, _, f in elems], dtype=np.uint16)
            flags[:-1] |= VIRTQ_DESC_F_NEXT
        flags = flags | bits
        # The rest of the chain first, the head last: the head's flags publish the buffer.
        self._ring["flags"][slots[1:]] = flags[1:]
        self._ring["flags"][slots[0]] = flags[0]
        self._mark(slots)
        self._slots[bid] = need
        self._tbl[bid] = tbl
        self._in_bytes[bid] = sum(n for _, n, f in elems if f)
        self._tokens[bid] = bid if token is None else token
        self._num_added += need
        self.counters["added"] += 1
        return bid

    def add_single_bufs(self, addrs: np.ndarray, lens: np.ndarray, *, writable: bool,
                        tokens: Sequence[object] | np.ndarray | None = None) -> np.ndarray:
        """Post ``len(addrs)`` one-descriptor buffers in one batch; returns their ids.
        All or nothing (``VringFull``); tokens default to the buffer's address."""
        addrs, lens = self._single_args(addrs, lens)
        k = int(addrs.size)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        ids = np.array(self._free_ids[len(self._free_ids) - k:][::-1], dtype=np.int64)
        del self._free_ids[len(self._free_ids) - k:]
        slots, bits = self._take_slots(k)
        r = self._ring
        r["addr"][slots] = addrs
        r["len"][slots] = lens
        r["id"][slots] = ids
        flags = bits | (VIRTQ_DESC_F_WRITE if writable else 0)
        r["flags"][slots[1:]] = flags[1:]
        r["flags"][slots[0]] = flags[0]
        self._mark(slots)
        self._slots[ids] = 1
        self._tbl[ids] = 0
        self._in_bytes[ids] = lens if writable else 0
        self._set_tokens(ids, addrs, tokens)
        self._num_added += k
        self.counters["added"] += k
        return ids

    # -- notifications ---------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """True when the device wants a notification for the slots published since last time."""
        added = self._num_added
        self._num_added = 0
        if added == 0:
            return False
        off_wrap = self.mem.read_u16(self.used_gpa)
        flags = self.mem.read_u16(self.used_gpa + 2) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            need = False
        elif flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            new = self.next_avail
            old = new - added  # linear: may be negative after a wrap
            off, wrap = unpack_off_wrap(off_wrap)
            if wrap != self.avail_wrap:
                off -= self.size
            need = vring_need_event(off & 0xFFFF, new & 0xFFFF, old & 0xFFFF)
        else:
            need = True
        self.counters["kicks" if need else "kicks_suppressed"] += 1
        return need

    def _write_driver_event(self, off_wrap: int | None, flags: int) -> None:
        if off_wrap is not None:
            self.mem.write(self.avail_gpa, _U16.pack(off_wrap))
        self.mem.write(self.avail_gpa + 2, _U16.pack(flags))

    def disable_cb(self) -> None:
        """Ask the device not to interrupt for used buffers (advisory)."""
        self._cb_enabled = False
        self._write_driver_event(None, RING_EVENT_FLAGS_DISABLE)

    def enable_cb(self) -> bool:
        """Re-enable used interrupts; False if used buffers arrived meanwhile."""
        self._cb_enabled = True
        self._arm()
        return not self.more_used()

    def _arm(self) -> None:
        if self.event_idx:
            self._write_driver_event(pack_off_wrap(self.last_used, self.used_wrap),
                                     RING_EVENT_FLAGS_DESC)
        else:
            self._write_driver_event(None, RING_EVENT_FLAGS_ENABLE)

    # -- reaping ---------------------------------------------------------------------------
    def get_bufs(self, max_n: int | None = None) -> tuple[list[object], list[int]]:
        """Reap up to ``max_n`` used buffers: (tokens, lens) in the order the device used them.

        Runs of used one-slot buffers (every hint, every pfn buffer) are checked and released
        as numpy batches (``_reap_run``); a buffer the batch cannot take -- a chain of several
        slots, or an id not in flight -- gets one step in order (``_reap_one``), then batching
        resumes."""
        if self.broken:
            return [], []
        limit = self.in_flight if max_n is None else min(max_n, self.in_flight)
        toks: list[object] = []
        lens: list[int] = []
        idx, wrap = self.last_used, self.used_wrap
        while len(toks) < limit:
            idx, wrap = self._reap_run(idx, wrap, limit - len(toks), toks, lens)
            if len(toks) >= limit:
                break
            step = self._reap_one(idx, wrap, toks, lens)
            if step is None:
                break  # not used yet, or the ring broke
            idx, wrap = step
        self.last_used, self.used_wrap = idx, wrap
        self.counters["reaped"] += len(toks)
        if toks and self.event_idx and self._cb_enabled:
            self._arm()
        return toks, lens

    def _reap_run(self, idx: int, wrap: int, max_n: int, toks: list[object],
                  lens: list[int]) -> tuple[int, int]:
        """Reap the used one-slot buffers from slot ``idx`` (lap ``wrap``) on, at most
        ``max_n``; returns the slot and lap after them. Stops before the first slot that is not
        used, names an id not in flight or of a longer chain, or repeats an id of the run."""
        if not self._is_used(int(self._ring["flags"][idx]), wrap):
            return idx, wrap  # the common poll: nothing new, no batch to build
        pos = idx + np.arange(max_n)
        slots = pos % self.size
        laps = (wrap + pos // self.size) & 1
        d = self._ring[slots]  # a copy: the device may keep writing
        ids = d["id"].astype(np.int64)
        known = ids < self.size
        ok = ((d["flags"] & _BOTH) == np.where(laps == 1, _BOTH, 0)) & known
        ok &= self._slots[np.where(known, ids, 0)] == 1
        k = max_n if ok.all() else int(np.argmin(ok))
        ids = ids[:k]
        if k > 1:
            uniq, first = np.unique(ids, return_index=True)
            if uniq.size != k:  # the second use of an id is of a buffer already reaped
                dup = np.ones(k, dtype=bool)
                dup[first] = False
                k = int(np.argmax(dup))
                ids = ids[:k]
        if k == 0:
            return idx, wrap
        ln = d["len"][:k].astype(np.int64)
        cap = self._in_bytes[ids]
        too_big = ln > cap
        if too_big.any():
            # The device may under-report, never over-report (protocol.md 1.2): clamp, count.
            self.counters["used_len_too_big"] += int(too_big.sum())
            log.warning("vring %s: %d used lengths exceed their buffers' writable bytes",
                        self.name, int(too_big.sum()))
            ln = np.minimum(ln, cap)
        toks.extend(self._tokens[ids].tolist())
        lens.extend(ln.tolist())
        self._release(ids)
        end = idx + k
        return end % self.size, (wrap + end // self.size) & 1

    def _reap_one(self, idx: int, wrap: int, toks: list[object],
                  lens: list[int]) -> tuple[int, int] | None:
        """Reap the buffer at slot ``idx`` if the device used it; the slot and lap after its
        chain, or None when it is not used or names an id not in flight (the ring breaks)."""
        # Flags first: only a used descriptor's id and len are the device's answer.
        if not self._is_used(int(self._ring["flags"][idx]), wrap):
            return None
        bid, ln = int(self._ring["id"][idx]), int(self._ring["len"][idx])
        if bid >= self.size or self._slots[bid] == 0:
            self._break("bad_used_id", f"used descriptor at slot {idx:#x} names id "
                        f"{bid:#x}, which is not in flight")
            return None
        if ln > self._in_bytes[bid]:
            self.counters["used_len_too_big"] += 1
            log.warning("vring %s: used len %#x exceeds id %#x's writable bytes %#x",
                        self.name, ln, bid, int(self._in_bytes[bid]))
            ln = int(self._in_bytes[bid])
        toks.append(self._tokens[bid])
        lens.append(ln)
        end = idx + int(self._slots[bid])
        self._release(np.array([bid], dtype=np.int64))
        return end % self.size, (wrap + end // self.size) & 1

    def _release(self, ids: np.ndarray) -> None:
        """Give the slots, tables and ids of reaped buffers back (ids in reap order)."""
        self._nfree += int(self._slots[ids].sum())
        if self.area is not None:
            tbls = self._tbl[ids]
            for tbl in tbls[tbls != 0].tolist():
                self.area.free(int(tbl))
        self._slots[ids] = 0
        self._tbl[ids] = 0
        self._tokens[ids] = None
        self._free_ids.extend(ids.tolist())

    # -- teardown --------------------------------------------------------------------------
    def detach_unused(self) -> list[object]:
        """After a device reset: drop every buffer in flight, return their tokens, and start
        the ring over (slots and wrap counters as after set-up)."""
        ids = np.nonzero(self._slots)[0]
        toks = self._tokens[ids].tolist()
        for bid in ids.tolist():
            tbl = int(self._tbl[bid])
            if tbl and self.area is not None:
                self.area.free(tbl)
        self._slots[:] = 0
        self._tbl[:] = 0
        self._tokens[:] = None
        self._free_ids = list(range(self.size - 1, -1, -1))
        self._nfree = self.size
        self.next_avail, self.avail_wrap = 0, 1
        self.last_used, self.used_wrap = 0, 1
        self.mem.fill(self.desc_gpa, DESC_SIZE * self.size, 0)
        return toks


def alloc_packed_vring(mem: GuestMemory, area: DriverArea, size: int, *,
                       event_idx: bool = False, indirect: bool = False,
                       name: str = "") -> PackedDriverVring:
    """Carve a packed ring (16-aligned) and its two 4-byte event areas out of ``area``."""
    desc = area.alloc(DESC_SIZE * size, 16)
    driver = area.alloc(PACKED_EVENT_SUPPRESS_SIZE, 4)
    device = area.alloc(PACKED_EVENT_SUPPRESS_SIZE, 4)
    return PackedDriverVring(mem, size, desc, driver, device, event_idx, indirect, area=area,
                             name=name)
