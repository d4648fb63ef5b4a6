"""What the split and the packed device-side rings share: chains, their errors and checks.

Theory of operation
-------------------
A popped chain is a ``Chain`` (one chain's readable and writable buffers, or the error that
made it malformed) or, from a batched pop, a ``ChainBatch`` (plain one-descriptor chains as
arrays, the rest as ``Chain`` objects). A broken ring raises ``RingBroken``; a malformed chain
is ``_ChainError`` inside a walk, turned into ``Chain.error`` by the queue. ``QueueCommon``
holds what both ring formats check the same way: counters and their log lines, the V-8 bounds
(``ram`` ranges or ``mem``'s regions, one buffer or a numpy batch), the per-buffer rules of a
chain (V-5, V-7, V-8, total length), the batched check of an indirect table's buffers and
``read_out``. ``balloon_dev.virtqueue.DeviceVirtqueue`` and
``balloon_dev.packed_virtqueue.PackedDeviceVirtqueue`` add their ring layouts on top.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guestmem.memory import GuestMemory, GuestMemoryError
from guestmem.units import U64_LIMIT
from protocol.errors import GuestFault
from protocol.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE

# The rings' guest-error log lines keep the name they always had.
log = logging.getLogger("balloon_dev.virtqueue")

_CHAIN_LEN_LIMIT = 1 << 32  # a chain's total length must stay below 2^32 (protocol.md 1.2)
_U32_LIMIT = 1 << 32


#: Guest-error counters, all present from the start so stats show zeros too.
CHAIN_ERROR_COUNTERS = (
    "next_out_of_range",        # V-3
    "desc_loop",                # V-4
    "readable_after_writable",  # V-5
    "indirect_nested",          # V-6
    "indirect_with_next",       # V-6
    "indirect_bad_len",         # V-6
    "indirect_too_long",        # V-6 (our bound on the table copy)
    "indirect_not_negotiated",  # protocol.md 1.5: INDIRECT only with RING_INDIRECT_DESC
    "zero_len_buffer",          # V-7
    "buffer_outside_memory",    # V-8
    "chain_too_long",           # protocol.md 1.2: total length < 2^32
)
RING_ERROR_COUNTERS = ("avail_idx_jump", "head_out_of_range", "ring_outside_memory")
OTHER_COUNTERS = ("buffer_vanished",)  # a buffer left guest memory between pop and use


class RingBroken(GuestFault):
    """The ring as a whole is unusable (V-1, V-2, ring area outside memory): the device must set
    DEVICE_NEEDS_RESET and stop using the queue until it is reset. ``counter`` names the
    queue counter the breach was counted under."""

    def __init__(self, message: str, *, counter: str = "ring_broken") -> None:
        super().__init__(message, counter=counter)


@dataclass(frozen=True, slots=True)
class Chain:
    """One popped descriptor chain. ``head`` goes back in the used element."""

    head: int
    out: tuple[tuple[int, int], ...]   # readable (gpa, len), in order
    in_: tuple[tuple[int, int], ...]   # writable (gpa, len), in order
    error: str | None = None           # "<counter>: <detail>" for a malformed chain

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.out)

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.in_)


@dataclass(frozen=True, slots=True)
class ChainBatch:
    """The chains one ``pop_batch`` took, in ring order, as arrays.

    Chain ``k`` goes back with used element ``heads[k]``. It is *plain* (``plain[k]``) when it
    is one descriptor that passed every check: its one buffer is ``addrs[k]``, ``lens[k]``,
    writable when ``writable[k]``. Any other chain was walked like ``pop`` walks it and is
    ``walked[k]`` (a ``Chain``, with ``error`` set when malformed). The arrays are the batch's
    own copies (never views of guest memory)."""

    heads: np.ndarray     # intp (n,)
    addrs: np.ndarray     # uint64 (n,)
    lens: np.ndarray      # uint64 (n,)
    writable: np.ndarray  # bool (n,)
    plain: np.ndarray     # bool (n,)
    walked: dict[int, Chain]

    def __len__(self) -> int:
        return int(self.heads.size)

    def chain(self, k: int) -> Chain:
        """Chain ``k`` as a ``Chain`` (what ``pop_many`` returns in position ``k``)."""
        if not self.plain[k]:
            return self.walked[k]
        buf = ((int(self.addrs[k]), int(self.lens[k])),)
        return Chain(int(self.heads[k]), (), buf) if self.writable[k] else \
            Chain(int(self.heads[k]), buf, ())

    def chains(self) -> list[Chain]:
        if not self.walked:
            return [Chain(h, (), ((a, ln),)) if w else Chain(h, ((a, ln),), ())
                    for h, a, ln, w in zip(self.heads.tolist(), self.addrs.tolist(),
                                           self.lens.tolist(), self.writable.tolist(),
                                           strict=True)]
        return [self.chain(k) for k in range(len(self))]

    @classmethod
    def of_chains(cls, chains: Sequence[Chain]) -> ChainBatch:
        """A batch of already walked chains (a ring format without a batched pop)."""
        n = len(chains)
        zeros = np.zeros(n, np.uint64)
        return cls(np.fromiter((c.head for c in chains), np.intp, n), zeros, zeros.copy(),
                   np.zeros(n, np.bool_), np.zeros(n, np.bool_), dict(enumerate(chains)))


_EMPTY_BATCH = ChainBatch.of_chains(())


class _ChainError(GuestFault):
    """One malformed chain (raised inside a chain walk, caught by the same queue, which counts
    it under ``counter`` and hands the chain out with its ``error`` set)."""

    def __init__(self, counter: str, detail: str) -> None:
        super().__init__(detail, counter=counter)


class QueueCommon:
    """What the split and the packed device queue share: the queue's addresses and options, the
    guest-error counters and their log lines, the V-8 bounds checks (one buffer or a numpy batch),
    the per-buffer checks of a chain walk (V-5, V-7, V-8, total length) and ``read_out``. The
    ring formats themselves (popping, pushing, notifications) live in the subclasses."""

    #: How a chain is named in log lines: split chains by head index, packed ones by buffer id.
    _chain_label = "chain at head"

    def __init__(self, mem: GuestMemory, size: int, desc: int, driver: int, device: int, *,
                 event_idx: bool, indirect: bool, reject_zero_len: bool, name: str,
                 ram: Sequence[tuple[int, int]] | None, counters: Sequence[str]) -> None:
        self.mem = mem
        self.size = size
        self.desc = desc
        self.driver = driver
        self.device = device
        self.event_idx = event_idx
        self.indirect = indirect
        self.reject_zero_len = reject_zero_len
        self.name = name
        self.ram: tuple[tuple[int, int], ...] | None = (
            None if ram is None else tuple(sorted((int(g), int(s)) for g, s in ram)))
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)
        #: Indirect tables with at least this many entries are checked as one numpy batch.
        #: The batch costs a fixed ~15 numpy calls, so below this the entry-by-entry walk is
        #: cheaper (measured per split chain: 32 entries walk 42 us / batch 68 us, 64: 93 / 79,
        #: 512: 692 / 225). Linux's 32-entry reporting tables therefore take the walk.
        self.indirect_batch_min = 64

    # -- guest errors ------------------------------------------------------------------------
    def _count(self, counter: str, detail: str) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1
        log.warning("%s: guest error %s: %s", self.name, counter, detail)

    def _broken(self, counter: str, detail: str) -> RingBroken:
        self._count(counter, detail)
        return RingBroken(f"{self.name}: {counter}: {detail}", counter=counter)

    def _area_broken(self, area: str, gpa: int, e: GuestMemoryError) -> RingBroken:
        return self._broken("ring_outside_memory", f"{area} at {gpa:#x}: {e}")

    # -- bounds (V-8) ------------------------------------------------------------------------
    def _ranges(self) -> tuple[tuple[int, int], ...]:
        if self.ram is not None:
            return self.ram
        return tuple((r.gpa, r.size) for r in self.mem.regions)

    def _contains(self, addr: int, length: int) -> bool:
        """Does [addr, addr+length) lie inside one RAM range (or region)? Never wraps past 2^64."""
        if addr + length > U64_LIMIT:
            return False
        if self.ram is None:
            return self.mem.contains(addr, length)
        for gpa, size in self.ram:
            off = addr - gpa
            if 0 <= off and off + length <= size and (off < size or length == 0):
                return True
        return False

    def _contains_many(self, addrs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Vectorised ``_contains`` for non-zero lengths (uint64 arithmetic)."""
        ok: np.ndarray | None = None
        for gpa, size in self._ranges():
            start, sz = np.uint64(gpa), np.uint64(size)
            # a >= start and (a - start) + n <= size, as n <= size and (a - start) <= size - n.
            # The two differences may wrap in uint64, but only where a term beside them in the
            # conjunction is already false.
            if gpa == 0:  # RAM from 0 (the common range): a - 0 needs no check nor subtraction
                fits = (lens <= sz) & (addrs <= sz - lens)
            else:
                fits = (lens <= sz) & (addrs >= start) & (addrs - start <= sz - lens)
            ok = fits if ok is None else ok | fits
            if ok.all():
                break  # the common case: every buffer in the first range (RAM)
        return ok if ok is not None else np.zeros(addrs.shape, dtype=np.bool_)

    # -- chain contents ----------------------------------------------------------------------
    def _buffer(self, where: str, i: int, addr: int, length: int, flags: int, total: int,
                out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> int:
        """Check descriptor ``i`` of a chain or table and append its buffer to ``out`` or
        ``in_``; returns the chain's total length so far. Raises ``_ChainError``, named by
        ``where`` + ``i`` (formatted only then: this runs per descriptor of every walk)."""
        if length == 0 and self.reject_zero_len:
            raise _ChainError("zero_len_buffer", f"{where}{i:#x}: zero sized buffer (V-7)")
        if not self._contains(addr, length):
            raise _ChainError("buffer_outside_memory",
                              f"{where}{i:#x}: [{addr:#x}, +{length:#x}) outside guest memory"
                              " (V-8)")
        total += length
        if total >= _CHAIN_LEN_LIMIT:
            raise _ChainError("chain_too_long", f"{where}{i:#x}: total length {total:#x} >= 2^32")
        if flags & VIRTQ_DESC_F_WRITE:
            in_.append((addr, length))
        else:
            if in_:
                raise _ChainError("readable_after_writable",
                                  f"{where}{i:#x}: readable after writable (V-5)")
            out.append((addr, length))
        return total

    def _table_buffers(self, table: np.ndarray, total: int, out: list[tuple[int, int]],
                       in_: list[tuple[int, int]]) -> bool:
        """The buffers of an indirect table (split or packed dtype: both have addr, len, flags)
        whose entries all pass, checked as one numpy batch and appended to out/in_. False, with
        out/in_ untouched, for anything else: the entry-by-entry check then gives the exact
        answer (and the error, counter and log of a malformed table). Links are the caller's."""
        flags = table["flags"]
        if (flags & VIRTQ_DESC_F_INDIRECT).any():
            return False  # nested (V-6)
        writable = (flags & VIRTQ_DESC_F_WRITE) != 0
        if in_ and not writable.all():
            return False  # readable after the writable part before the table (V-5)
        if (writable[:-1] & ~writable[1:]).any():
            return False  # readable after writable inside the table (V-5)
        lens = table["len"].astype(np.uint64)
        if not lens.all() or total + int(lens.sum()) >= _CHAIN_LEN_LIMIT:
            return False
        addrs = table["addr"]
        if not self._contains_many(addrs, lens).all():
            return False
        bufs = list(zip(addrs.tolist(), lens.tolist(), strict=True))
        nr = len(bufs) - int(writable.sum())
        out.extend(bufs[:nr])
        in_.extend(bufs[nr:])
        return True

    def read_out(self, chain: Chain, max_len: int) -> bytes:
        """Up to ``max_len`` of the chain's readable bytes, gathered now.

        Bounds are checked again at the moment of use (conventions 6): if a buffer is no longer
        in guest memory, ``buffer_vanished`` is counted and b"" returned (callers treat a short
        read as a malformed buffer)."""
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
            self._count("buffer_vanished", f"{self._chain_label} {chain.head:#x}: {e}")
            return b""
        return b"".join(parts)
