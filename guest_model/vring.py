"""The driver side of a split virtqueue, over ``guestmem.GuestMemory`` (protocol.md section 1).

Theory of operation
-------------------
The guest owns three areas per queue (descriptor table, available ring, used ring), carved out
of the *driver area*, a byte-backed region of guest RAM (docs/interfaces.md "A simulated VM's
memory layout") by ``DriverArea``, a small bump allocator with per-size free lists that also
serves indirect tables and the driver's own buffers. The ring talks to the device only through
those bytes: it never imports the device side (balloon_dev/virtqueue.py), they agree only on the
layouts in ``protocol.virtqueue``.

``DriverVring`` keeps numpy views over the three areas and a private shadow of everything it
writes (free descriptor stack, per-head chain length and ``next`` links, tokens, its own avail
index), so nothing the device could scribble over is trusted when buffers come back, as Linux's
``desc_extra`` shadow does. Adding a buffer:

1. take descriptors from the free stack (or one descriptor plus an indirect table when
   ``VIRTIO_F_RING_INDIRECT_DESC`` was negotiated and the chain has >= ``indirect_min`` elements),
2. write them: readable ("out") elements first, then writable ("in") ones (protocol.md 1.2),
3. write the head into ``avail.ring[idx % N]`` and then publish ``avail.idx = idx + 1``.

Writes are ordered data first, index last; in one Python process that is all a barrier means.
``kick_prepare()`` decides whether the device wants a notification: with EVENT_IDX it asks
``vring_need_event(avail_event, new, old)`` over the indices published since the last kick,
without it it honours ``VIRTQ_USED_F_NO_NOTIFY``. Reaping (``get_buf``/``get_bufs``) reads
used elements from ``last_used_idx`` up to ``used.idx``, checks each id against the shadow
(a bad id marks the ring broken, counts it and logs it: the device is the peer at fault), frees
the chain and, with EVENT_IDX, re-arms ``used_event`` so the device interrupts on the next entry.
All indices are free-running ``uint16`` and wrap at 65536; slots are ``idx & (N - 1)``.

Hot paths batch: ``add_single_bufs`` posts many one-descriptor buffers (free page hints) with a
few numpy assignments, and ``get_bufs`` reaps every pending used element at once.

``DriverRingBase`` holds what this ring and the packed one (``guest_model.packed_vring``) share:
the checks of ``add_buf`` / ``add_single_bufs`` arguments, the indirect table with its fall-back
to a direct chain, tokens, ``get_buf`` and marking the ring broken.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from guestmem import GuestMemory
from guestmem.units import PAGE_MASK, Gpa, gpa_to_pfn
from protocol.errors import Fault, UsageError
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
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

log = logging.getLogger(__name__)

Buf = tuple[int, int]  # (gpa, length)


class DriverAreaFull(UsageError):
    """The driver area has no room left for an allocation (a sizing problem, not a guest bug)."""


class VringFull(UsageError):
    """Not enough free descriptors for the buffer (Linux: -ENOSPC). Reap used buffers first."""


class VringBroken(Fault):
    """The ring was marked broken after the device returned something impossible (the
    device's fault, seen from the guest; the driver counts it under ``vring_broken``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, counter="vring_broken")


class DriverArea:
    """Allocator for the byte-backed driver area ``[gpa, gpa+size)`` of guest RAM.

    Bump allocation with free lists per rounded size, so the indirect tables and control buffers
    a driver keeps allocating and freeing are recycled instead of exhausting the area. Sizes are
    rounded up to a power of two (at least 16 bytes) so a freed block fits any later request of
    the same class; alignment is at most the block size, which every ring area needs (16/2/4).
    """

    def __init__(self, mem: GuestMemory, gpa: int, size: int) -> None:
        if not mem.contains(gpa, size):
            raise UsageError(f"driver area [{gpa:#x}, +{size:#x}) is not backed by guest memory")
        self.mem = mem
        self.gpa = gpa
        self.size = size
        self._next = gpa
        self._free: dict[int, list[Gpa]] = {}
        self._sizes: dict[int, int] = {}
        self.in_use = 0

    @staticmethod
    def _class(nbytes: int) -> int:
        return max(16, 1 << (max(nbytes, 1) - 1).bit_length())

    def alloc(self, nbytes: int, align: int = 16, *, zero: bool = True) -> Gpa:
        """A block of at least ``nbytes`` bytes, aligned to ``align`` (a power of two)."""
        cls = self._class(max(nbytes, align))
        lst = self._free.get(cls)
        if lst:
            gpa = lst.pop()
        else:
            # Classes are powers of two >= align, so aligning the bump pointer to the class keeps
            # every block aligned; large areas (rings) are rare and waste little.
            start = (self._next + cls - 1) & ~(cls - 1) if cls <= 4096 else \
                (self._next + 4095) & ~4095
            if start + cls > self.gpa + self.size:
                raise DriverAreaFull(f"driver area of {self.size:#x} bytes cannot hold "
                                     f"{nbytes:#x} more bytes ({self.in_use:#x} in use)")
            gpa = Gpa(start)
            self._next = start + cls
        self._sizes[gpa] = cls
        self.in_use += cls
        if zero:
            self.mem.fill(gpa, cls, 0)
        return gpa

    def free(self, gpa: int) -> None:
        cls = self._sizes.pop(gpa, None)
        if cls is None:
            raise UsageError(f"driver area: {gpa:#x} is not an allocated block (double free?)")
        self.in_use -= cls
        self._free.setdefault(cls, []).append(Gpa(gpa))

    def pfns(self) -> tuple[int, int]:
        """(first pfn, page count) of the whole area, for the allocator to keep reserved."""
        first = gpa_to_pfn(self.gpa)
        last = gpa_to_pfn(self.gpa + self.size + PAGE_MASK)
        return first, last - first


class DriverRingBase:
    """What the split and packed driver rings share, so the two ring classes hold only what
    differs between the layouts: the checks of ``add_buf`` / ``add_single_bufs`` arguments (usage
    errors, raised), the indirect table's allocation with its fall-back to a direct chain, the
    tokens handed back by ``get_bufs``, ``get_buf`` and marking the ring broken."""

    def _init_common(self, mem: GuestMemory, size: int, event_idx: bool, indirect: bool,
                     area: DriverArea | None, indirect_min: int, name: str) -> None:
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect and area is not None
        self.area = area
        self.indirect_min = max(2, indirect_min)
        self.name = name
        self._tokens = np.empty(size, dtype=object)  # per head / buffer id
        self.broken = False
        self.counters: dict[str, int] = {
            "added": 0, "added_indirect": 0, "reaped": 0, "kicks": 0, "kicks_suppressed": 0,
            "bad_used_id": 0, "used_len_too_big": 0, "bad_used_idx": 0,
        }

    @property
    def num_free(self) -> int:
        raise NotImplementedError

    def get_bufs(self, max_n: int | None = None) -> tuple[list[object], list[int]]:
        raise NotImplementedError

    def _check_usable(self) -> None:
        if self.broken:
            raise VringBroken(f"vring {self.name!r} is broken")

    def _chain_elems(self, out: Sequence[Buf], in_: Sequence[Buf]) -> list[tuple[int, int, int]]:
        """One buffer's elements as (gpa, length, WRITE or 0), readable ones first
        (protocol.md 1.2); ``UsageError`` for an empty or over-long chain or a bad length."""
        self._check_usable()
        elems = [(a, n, 0) for a, n in out] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in in_]
        total = len(elems)
        if total == 0:
            raise UsageError("a buffer needs at least one element")
        if total > self.size:
            # virtio 1.x 2.7.5.3.1 / 2.7.13.3.1: no chain longer than the queue size.
            raise UsageError(f"chain of {total} elements exceeds queue size {self.size}")
        for _, n, _ in elems:
            if n <= 0 or n >= 1 << 32:
                raise UsageError(f"element length {n:#x} must be in (0, 2^32) (V-7)")
        return elems

    def _indirect_table(self, total: int) -> int:
        """gpa of a fresh table for a chain of ``total`` elements, or 0 for a direct chain
        (indirect not negotiated, chain too short, no free slot, or the area is full)."""
        if not (self.indirect and total >= self.indirect_min and self.num_free >= 1):
            return 0
        assert self.area is not None
        try:
            return self.area.alloc(DESC_SIZE * total, 16, zero=False)
        except DriverAreaFull:
            return 0  # fall back to a direct chain, as Linux does when kmalloc fails

    def _check_room(self, need: int, tbl: int) -> None:
        """``VringFull`` (giving the table back) when fewer than ``need`` slots are free."""
        if self.num_free >= need:
            return
        if tbl:
            assert self.area is not None
            self.area.free(tbl)
        raise VringFull(f"vring {self.name!r}: {need} descriptors needed, "
                        f"{self.num_free} free")

    def _single_args(self, addrs: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``add_single_bufs``'s arguments checked and typed; ``VringFull`` if they do not fit
        (all or nothing)."""
        self._check_usable()
        addrs = np.asarray(addrs, dtype=np.uint64)
        lens = np.asarray(lens, dtype=np.int64)
        if lens.shape != addrs.shape:
            raise UsageError("addrs and lens differ in length")
        if (lens <= 0).any() or (lens >= 1 << 32).any():
            raise UsageError("every element length must be in (0, 2^32) (V-7)")
        self._check_room(int(addrs.size), 0)
        return addrs, lens

    def _set_tokens(self, ids: np.ndarray, addrs: np.ndarray,
                    tokens: Sequence[object] | np.ndarray | None) -> None:
        """Tokens for a batch of one-descriptor buffers; by default each buffer's address."""
        if tokens is None:
            self._tokens[ids] = addrs.astype(np.int64).tolist()
        else:
            tok = np.empty(ids.size, dtype=object)
            tok[:] = list(tokens)
            self._tokens[ids] = tok

    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as ``(token, len)``, or None when none is pending (or broken)."""
        toks, lens = self.get_bufs(1)
        if not toks:
            return None
        return toks[0], lens[0]

    def _break(self, counter: str, detail: str) -> None:
        self.counters[counter] += 1
        self.broken = True
        log.warning("vring %s: device error, ring marked broken: %s", self.name, detail)


class DriverVring(DriverRingBase):
    """The driver side of one split virtqueue of size ``size`` at the given guest addresses.

    ``event_idx`` / ``indirect`` say whether VIRTIO_F_RING_EVENT_IDX / RING_INDIRECT_DESC were
    negotiated. ``area`` is needed only for indirect tables. The areas are zeroed here (the
    driver must start with a clean used ring, protocol.md 1.2).
    """

    def __init__(self, mem: GuestMemory, size: int, desc: int, avail: int, used: int,
                 event_idx: bool = False, indirect: bool = False, *,
                 area: DriverArea | None = None, indirect_min: int = 2, name: str = "") -> None:
        if size <= 0 or size & (size - 1) or size > VIRTQ_MAX_SIZE:
            raise UsageError(f"queue size {size} is not a power of two <= {VIRTQ_MAX_SIZE}")
        if desc % 16 or avail % 2 or used % 4:
            raise UsageError(f"ring areas misaligned: desc {desc:#x} avail {avail:#x} "
                             f"used {used:#x} (need 16/2/4)")
        self._init_common(mem, size, event_idx, indirect, area, indirect_min, name)
        self.desc_gpa, self.avail_gpa, self.used_gpa = Gpa(desc), Gpa(avail), Gpa(used)
        for gpa, n in ((desc, desc_table_size(size)), (avail, avail_ring_size(size)),
                       (used, used_ring_size(size))):
            mem.fill(gpa, n, 0)
        self._desc = mem.array(desc, DESC_DTYPE, size, writable=True)
        # avail as u16 words: [0] flags, [1] idx, [2:2+N] ring, [2+N] used_event
        self._avail = mem.array(avail, "<u2", 3 + size, writable=True)
        self._used_hdr = mem.array(used, "<u2", 2)  # [0] flags, [1] idx (device-written)
        self._used_ring = mem.array(used + 4, USED_ELEM_DTYPE, size)
        self._avail_event_gpa = used + 4 + 8 * size

        # Private shadow state (never read back from guest memory).
        self._free = np.arange(size - 1, -1, -1, dtype=np.int64)  # stack; top = _free[nfree-1]
        self._nfree = size
        self._chain_len = np.zeros(size, dtype=np.int64)  # direct descriptors per head (0=free)
        self._next = np.zeros(size, dtype=np.int64)
        self._indirect_tbl = np.zeros(size, dtype=np.int64)  # gpa of the head's table or 0
        self._in_bytes = np.zeros(size, dtype=np.int64)  # writable bytes, to check used len
        self.avail_idx = 0  # shadow of avail.idx
        self.last_used_idx = 0
        self._num_added = 0  # published since the last kick_prepare
        self._avail_flags = 0

    # -- state ------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._nfree

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet reaped."""
        return (self.avail_idx - self.last_used_idx) & 0xFFFF

    def _used_idx(self) -> int:
        return int(self._used_hdr[1])

    def more_used(self) -> bool:
        return self._used_idx() != self.last_used_idx

    def _set_avail_idx(self, idx: int) -> None:
        self._avail[1] = idx
        self.mem.mark_dirty(self.avail_gpa + 2, 2)

    # -- adding ----------------------------------------------------------------------------
    def add_buf(self, out: Sequence[Buf] = (), in_: Sequence[Buf] = (),
                token: object = None) -> int:
        """Post one buffer: device-readable ``out`` elements, then device-writable ``in_``.

        Returns the head descriptor index. ``token`` comes back from ``get_buf`` (defaults to the
        head). Raises ``VringFull`` when descriptors are short, ``UsageError`` for an empty or
        over-long chain (usage errors), ``VringBroken`` once the ring is broken.
        """
        elems = self._chain_elems(out, in_)
        total = len(elems)
        tbl = self._indirect_table(total)
        need = 1 if tbl else total
        self._check_room(need, tbl)
        ids = self._free[self._nfree - need:self._nfree][::-1].copy()
        self._nfree -= need
        head = int(ids[0])
        if tbl:
            t = self.mem.array(tbl, DESC_DTYPE, total, writable=True)
            t["addr"] = [a for a, _, _ in elems]
            t["len"] = [n for _, n, _ in elems]
            t["flags"] = [f | VIRTQ_DESC_F_NEXT for _, _, f in elems]
            t["flags"][-1] = elems[-1][2]
            t["next"] = np.arange(1, total + 1) % total  # table-relative (protocol.md 1.5)
            t["next"][-1] = 0
            self.mem.mark_dirty(tbl, DESC_SIZE * total)
            self._desc[head] = (tbl, DESC_SIZE * total, VIRTQ_DESC_F_INDIRECT, 0)
            self.mem.mark_dirty(self.desc_gpa + DESC_SIZE * head, DESC_SIZE)
            self.counters["added_indirect"] += 1
        else:
            d = self._desc[ids]
            d["addr"] = [a for a, _, _ in elems]
            d["len"] = [n for _, n, _ in elems]
            flags = np.array([f for _, _, f in elems], dtype=np.uint16)
            flags[:-1] |= VIRTQ_DESC_F_NEXT
            d["flags"] = flags
            nxt = np.zeros(total, dtype=np.int64)
            nxt[:-1] = ids[1:]
            d["next"] = nxt
            self._desc[ids] = d
            self._next[ids] = nxt
            for i in ids:
                self.mem.mark_dirty(self.desc_gpa + DESC_SIZE * int(i), DESC_SIZE)
        self._chain_len[head] = need
        self._indirect_tbl[head] = tbl
        self._in_bytes[head] = sum(n for _, n, f in elems if f)
        self._tokens[head] = head if token is None else token
        self._publish(np.array([head]))
        return head

    def add_single_bufs(self, addrs: np.ndarray, lens: np.ndarray, *, writable: bool,
                        tokens: Sequence[object] | np.ndarray | None = None) -> np.ndarray:
        """Post ``len(addrs)`` buffers of one descriptor each, in one batch; returns the heads.

        All or nothing: raises ``VringFull`` if fewer descriptors are free than buffers given.
        Tokens default to the buffer's address.
        """
        addrs, lens = self._single_args(addrs, lens)
        k = int(addrs.size)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        ids = self._free[self._nfree - k:self._nfree][::-1].copy()
        self._nfree -= k
        d = self._desc[ids]
        d["addr"] = addrs
        d["len"] = lens
        d["flags"] = VIRTQ_DESC_F_WRITE if writable else 0
        d["next"] = 0
        self._desc[ids] = d
        self._mark_desc(ids)
        self._chain_len[ids] = 1
        self._indirect_tbl[ids] = 0
        self._in_bytes[ids] = lens if writable else 0
        self._set_tokens(ids, addrs, tokens)
        self._publish(ids)
        return ids

    def _mark_desc(self, ids: np.ndarray) -> None:
        if self.mem.dirty_log is None:
            return
        lo, hi = int(ids.min()), int(ids.max())
        self.mem.mark_dirty(self.desc_gpa + DESC_SIZE * lo, DESC_SIZE * (hi - lo + 1))

    def _publish(self, heads: np.ndarray) -> None:
        """Write heads into avail.ring, then move avail.idx past them (protocol.md 1.2)."""
        k = int(heads.size)
        n = self.size
        slots = (self.avail_idx + np.arange(k)) & (n - 1)
        self._avail[2 + slots] = heads
        first = int(slots[0]) if k else 0
        if k and first + k <= n:
            self.mem.mark_dirty(self.avail_gpa + 4 + 2 * first, 2 * k)
        else:
            self.mem.mark_dirty(self.avail_gpa + 4, 2 * n)
        self.avail_idx = (self.avail_idx + k) & 0xFFFF
        self._set_avail_idx(self.avail_idx)
        self._num_added += k
        self.counters["added"] += k

    # -- notifications ---------------------------------------------------------------------
    def kick_prepare(self) -> bool:
        """True when the device wants a notification for what was published since last time.

        Linux kicks at the latest every 65535 additions; our callers kick after each batch, and
        a batch cannot exceed the queue size, so ``_num_added`` never nears the 16-bit limit.
        """
        added = self._num_added
        self._num_added = 0
        if added == 0:
            return False
        new = self.avail_idx
        old = (new - added) & 0xFFFF
        if self.event_idx:
            need = vring_need_event(self.mem.read_u16(self._avail_event_gpa), new, old)
        else:
            need = not (int(self._used_hdr[0]) & VIRTQ_USED_F_NO_NOTIFY)
        self.counters["kicks" if need else "kicks_suppressed"] += 1
        return need

    def disable_cb(self) -> None:
        """Ask the device not to interrupt for used buffers (advisory; it may anyway)."""
        self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            # With EVENT_IDX the flags word must stay 0 (protocol.md 1.4); instead point
            # used_event just behind us, so the device would have to wrap all 65536 indices
            # before it matches again.
            self._write_used_event((self.last_used_idx - 1) & 0xFFFF)
        else:
            self._avail[0] = self._avail_flags
            self.mem.mark_dirty(self.avail_gpa, 2)

    def enable_cb(self) -> bool:
        """Re-enable used interrupts; False if used buffers arrived meanwhile (reap them first:
        the device may not interrupt for them)."""
        self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
        if self.event_idx:
            self._write_used_event(self.last_used_idx)
        else:
            self._avail[0] = self._avail_flags
            self.mem.mark_dirty(self.avail_gpa, 2)
        return not self.more_used()

    def _write_used_event(self, value: int) -> None:
        self._avail[2 + self.size] = value
        self.mem.mark_dirty(self.avail_gpa + 4 + 2 * self.size, 2)

    # -- reaping ---------------------------------------------------------------------------
    def get_bufs(self, max_n: int | None = None) -> tuple[list[object], list[int]]:
        """Reap up to ``max_n`` used buffers at once: (tokens, lens) in used-ring order."""
        if self.broken:
            return [], []
        used_idx = self._used_idx()
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending == 0:
            return [], []
        if pending > self.in_flight:
            # The device claims more used entries than buffers we gave it.
            self._break("bad_used_idx", f"used.idx {used_idx:#x} is {pending} past "
                        f"last_used {self.last_used_idx:#x} with {self.in_flight} in flight")
            return [], []
        if max_n is not None:
            pending = min(pending, max_n)
        slots = (self.last_used_idx + np.arange(pending)) & (self.size - 1)
        elems = self._used_ring[slots]  # copy: the device may keep writing
        ids = elems["id"].astype(np.int64)
        lens = elems["len"].astype(np.int64)
        # Check every id before touching our state; stop at the first bad one.
        bad = (ids >= self.size)
        ok_ids = np.where(bad, 0, ids)
        bad |= self._chain_len[ok_ids] == 0
        # Duplicate heads in one batch: the second one is already free.
        if not bad.any() and np.unique(ids).size != ids.size:
            _, first = np.unique(ids, return_index=True)
            dup = np.ones(ids.size, dtype=bool)
            dup[first] = False
            bad |= dup
        if bad.any():
            k = int(np.argmax(bad))
            toks, out_lens = self._reap(ids[:k], lens[:k])
            self._break("bad_used_id", f"used element {(self.last_used_idx) & 0xFFFF:#x} "
                        f"names head {int(ids[k]):#x}, which is not in flight")
            return toks, out_lens
        return self._reap(ids, lens)

    def _reap(self, ids: np.ndarray, lens: np.ndarray) -> tuple[list[object], list[int]]:
        k = int(ids.size)
        if k == 0:
            return [], []
        too_big = lens > self._in_bytes[ids]
        if too_big.any():
            # The device may under-report, never over-report (protocol.md 1.2); count it and
            # clamp, since the length is only advisory to the balloon driver.
            self.counters["used_len_too_big"] += int(too_big.sum())
            log.warning("vring %s: %d used lengths exceed their buffers' writable bytes",
                        self.name, int(too_big.sum()))
            lens = np.minimum(lens, self._in_bytes[ids])
        toks = self._tokens[ids].tolist()
        single = self._chain_len[ids] == 1
        # One-descriptor chains (the common case) go back to the free stack in one step.
        s_ids = ids[single]
        for head in ids[~single].tolist():
            self._free_chain(head)
        if s_ids.size:
            self._push_free(s_ids)
            tbls = self._indirect_tbl[s_ids]
            for tbl in tbls[tbls != 0].tolist():
                assert self.area is not None
                self.area.free(int(tbl))
            self._indirect_tbl[s_ids] = 0
        self._chain_len[ids] = 0
        self._tokens[ids] = None
        self.last_used_idx = (self.last_used_idx + k) & 0xFFFF
        self.counters["reaped"] += k
        if self.event_idx and not self._avail_flags & VIRTQ_AVAIL_F_NO_INTERRUPT:
            self._write_used_event(self.last_used_idx)
        return toks, lens.tolist()

    def _free_chain(self, head: int) -> None:
        n = int(self._chain_len[head])
        chain = np.empty(n, dtype=np.int64)
        i = head
        for j in range(n):  # bounded by our own shadow length, never by device data
            chain[j] = i
            i = int(self._next[i])
        self._push_free(chain)

    def _push_free(self, ids: np.ndarray) -> None:
        k = int(ids.size)
        self._free[self._nfree:self._nfree + k] = ids
        self._nfree += k

    # -- teardown --------------------------------------------------------------------------
    def detach_unused(self) -> list[object]:
        """After a device reset: drop every buffer still in flight and return their tokens."""
        heads = np.nonzero(self._chain_len)[0]
        toks = self._tokens[heads].tolist()
        for head in heads.tolist():
            tbl = int(self._indirect_tbl[head])
            if tbl and self.area is not None:
                self.area.free(tbl)
        self._free = np.arange(self.size - 1, -1, -1, dtype=np.int64)
        self._nfree = self.size
        self._chain_len[:] = 0
        self._indirect_tbl[:] = 0
        self._tokens[:] = None
        return toks


def alloc_vring(mem: GuestMemory, area: DriverArea, size: int, *, event_idx: bool = False,
                indirect: bool = False, name: str = "") -> DriverVring:
    """Carve the three areas of a size-``size`` queue out of ``area`` and build its driver side.

    Alignments follow protocol.md 1.1 (16 / 2 / 4); each area is its own block, so the device
    must not assume the legacy contiguous layout.
    """
    desc = area.alloc(desc_table_size(size), 16)
    avail = area.alloc(avail_ring_size(size), 2)
    used = area.alloc(used_ring_size(size), 4)
    return DriverVring(mem, size, desc, avail, used, event_idx, indirect, area=area, name=name)
