"""A dirty log the host can switch on, as KVM's dirty-page tracking: one bit per guest page.

Writers mark pages; the host's ``sync()`` takes the pages written since the previous sync and
clears them, so "written since the last sync" is a separate record from anything the host keeps
(protocol.md 5.7: hints may never erase it).

Policies (``[host] dirty_log``)
-------------------------------
* ``exact`` (the default): every write is logged. KVM's log, and QEMU's under TCG since 9.0.
* ``qemu-7.2-tcg``: QEMU before 9.0 under TCG, which loses writes. TCG writes guest RAM through
  a software TLB whose write entries carry a "not dirty" flag while their page is clean: the
  first store takes the slow path, sets the page's dirty bits and drops the flag; later stores
  go straight to RAM. A bitmap sync must put the flag back on the pages it cleans. QEMU's sync
  of a whole RAM block a bitmap word (64 pages) at a time did not (QEMU commit 03bfc2188f,
  "physmem: Fix migration dirty bitmap coherency with TCG memory access", fixed it in 9.0), so
  a page whose TLB entry outlives a sync is written unlogged until the entry goes: a TLB flush
  (x86 TCG flushes it whole when the guest switches between two processes' address spaces) or
  an eviction. That word-at-a-time path is only taken for a RAM block of whole words; a block
  of any other length is synced page by page, which does reset the TLB, and loses nothing.

The TLB model (``qemu-7.2-tcg`` only): one vCPU's write entries, as the set of pages written
since the last flush, at most ``tlb_entries`` of them, the least recently written evicted.
TCG's TLB is direct-mapped, with an 8-entry victim TLB that keeps hot entries through
collisions, and resizes itself at each flush by how full it was (2^6 to 2^22 entries per MMU
mode, 2^8 at first); a guest that has written hundreds of MiB has grown it. Its size during a
migration was not measured: ``TLB_ENTRIES`` (4,096) is an assumption, large enough that the
kernel's hot pages outlive a 4 MiB block's zeroing between two allocations, as the lab's lost
pages say they did. A write
to a page with a live entry is not logged; any other write is logged and fills an entry.
Entries fill also while logging is off (a guest writes before migration starts), and neither
``start`` nor a sync touches them: 7.2's set-up sync takes the same path. Writers say which
address space they run in with ``switch_mm``; kernel work borrows the current one (as Linux's
lazy TLB does), so it never flushes. ``mark_bytes`` always logs: it covers the byte-backed
driver area, which the device writes too, and QEMU logs a device's writes directly.
"""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from guestmem.units import PAGE_SHIFT

#: Dirty-log policies (the module docstring).
DIRTY_LOGS = ("exact", "qemu-7.2-tcg")
#: Pages QEMU's word-at-a-time sync takes at once: a RAM block of a multiple of this many pages
#: is synced that way.
SYNC_WORD_PAGES = 64
#: Write entries the model's TLB holds (the module docstring says why this many).
TLB_ENTRIES = 4096


class DirtyLog:
    def __init__(self, ram_pages: int, policy: str = "exact",
                 tlb_entries: int = TLB_ENTRIES) -> None:
        if policy not in DIRTY_LOGS:
            raise ValueError(f"unknown dirty log {policy!r} (known: {', '.join(DIRTY_LOGS)})")
        if tlb_entries < 1:
            raise ValueError(f"tlb_entries={tlb_entries}: must be at least 1")
        self.ram_pages = ram_pages
        self.policy = policy
        self.enabled = False
        self._bits = np.zeros(ram_pages, dtype=np.bool_)
        #: The policy loses writes here: 7.2's word-at-a-time sync is used for this RAM size.
        self.stale_tlb = policy == "qemu-7.2-tcg" and ram_pages % SYNC_WORD_PAGES == 0
        #: Page writes made through a stale TLB entry while logging was on: not logged and the
        #: page not otherwise dirty (each may lose an update; the verifier says which did).
        self.unlogged_writes = 0
        self.tlb_flushes = 0
        self.tlb_entries = tlb_entries
        if self.stale_tlb:
            # _tlb_gen[p] == _gen: page p has a live write entry (0: none). A flush bumps _gen.
            self._tlb_gen = np.zeros(ram_pages, dtype=np.uint32)
            self._tlb_use = np.zeros(ram_pages, dtype=np.uint32)  # last write, for eviction
            self._gen = 1
            self._clock = 0
            self._filled: list[np.ndarray] = []  # pages that got an entry since the last trim
            self._nfilled = 0
            self._mm: Hashable | None = None

    def start(self) -> None:
        self.enabled = True
        self._bits[:] = False

    def stop(self) -> None:
        self.enabled = False

    # -- writes ---------------------------------------------------------------------------------
    def mark_bytes(self, gpa: int, length: int) -> None:
        if self.enabled and length > 0:
            first = gpa >> PAGE_SHIFT
            last = (gpa + length - 1) >> PAGE_SHIFT
            self._bits[max(first, 0):min(last + 1, self.ram_pages)] = True

    def mark_range(self, first_pfn: int, count: int) -> None:
        if count <= 0:
            return
        if self.stale_tlb:
            self._tlb_write(slice(first_pfn, first_pfn + count), first_pfn)
        elif self.enabled:
            self._bits[first_pfn:first_pfn + count] = True

    def mark_pfns(self, pfns: np.ndarray) -> None:
        if self.stale_tlb:
            if pfns.size:
                self._tlb_write(pfns, None)
        elif self.enabled:
            self._bits[pfns] = True

    def _tlb_write(self, where: slice | np.ndarray, first: int | None) -> None:
        """A store to ``where`` (a slice from ``first``, or pfns) through the TLB."""
        gen = self._gen
        live = self._tlb_gen[where] == gen
        if self.enabled:
            bits = self._bits[where]
            self.unlogged_writes += int(np.count_nonzero(live & ~bits))
            self._bits[where] = bits | ~live
        self._clock += 1
        self._tlb_gen[where] = gen
        self._tlb_use[where] = self._clock
        new = np.flatnonzero(~live)
        if new.size:
            self._filled.append(new + first if first is not None
                                else np.asarray(where)[new])
            self._nfilled += int(new.size)
            if self._nfilled > 2 * self.tlb_entries:
                self._evict()

    def _evict(self) -> None:
        """Keep the ``tlb_entries`` most recently written live entries (amortised: runs once
        the pages filled since the last trim reach twice the TLB)."""
        cand = np.unique(np.concatenate(self._filled))
        cand = cand[self._tlb_gen[cand] == self._gen]
        if cand.size > self.tlb_entries:
            order = np.argsort(self._tlb_use[cand], kind="stable")
            cut = cand.size - self.tlb_entries
            self._tlb_gen[cand[order[:cut]]] = 0
            cand = cand[order[cut:]]
        self._filled = [cand]
        self._nfilled = int(cand.size)

    # -- the guest's address spaces -------------------------------------------------------------
    def switch_mm(self, mm: Hashable | None) -> None:
        """The vCPU now runs in address space ``mm`` (a process); None: kernel work, which
        keeps the current one. Loading another process's page tables flushes the TLB."""
        if self.stale_tlb and mm is not None and mm != self._mm:
            self._mm = mm
            self.flush_tlb()

    def flush_tlb(self) -> None:
        if self.stale_tlb:
            self.tlb_flushes += 1
            self._gen += 1
            if self._gen == 0xFFFFFFFF:  # never in practice: start the generations again
                self._tlb_gen[:] = 0
                self._gen = 1
            self._filled = []
            self._nfilled = 0

    # -- the host's side ------------------------------------------------------------------------
    def peek(self) -> np.ndarray:
        """The current bits, read-only (for tests and verifiers)."""
        v = self._bits.view()
        v.flags.writeable = False
        return v

    def merge_into(self, target: np.ndarray) -> int:
        """``target |= pages written since the previous sync``, then clear the log, as
        ``sync`` does but with no copy of the log; returns how many pages were written.
        (The TLB is left as it is: the exact policy does not need it, 7.2 did not reset it.)"""
        n = int(np.count_nonzero(self._bits))
        if n:
            np.logical_or(target, self._bits, out=target)
            self._bits[:] = False
        return n

    def sync(self) -> np.ndarray:
        """Pages written since the previous sync (a copy); the log is cleared."""
        out = self._bits.copy()
        self._bits[:] = False
        return out
