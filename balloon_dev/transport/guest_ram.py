"""Guest RAM a socket peer hands us: sealed, checked, mapped, unmapped -- for both transports.

Theory of operation
-------------------
``GuestRamMapper.map(fd, ...)`` is the one way a transport maps a peer's guest-RAM fd (vfio-user
DMA_MAP, vhost-user SET_MEM_TABLE / ADD_MEM_REG): seal the file against shrinking, check with
``fstat`` that the range lies inside the file, ``mmap`` it shared from the allocation-granularity
boundary below the offset (so no offset alignment is asked of the peer), and return a
``RamMapping`` whose ``view`` is exactly the range. ``add``  puts it into the ``GuestMemory`` the
device reads and reports an unsealable fd once the mapping is accepted; ``unmap`` takes it out.
The peer's fd is never kept: the caller closes it once ``map`` returned (the mapping keeps the
memory).

Deferred unmap: the device may still hold a view into a mapping (a numpy array over a ring)
when the peer unmaps it; ``mmap.close`` then raises ``BufferError``. Such a mapping is kept on a
list, counted once under ``unmap_deferred``, and closed by a later ``unmap`` or ``close`` once
the view is gone (``reap``); a mapping never becomes unreachable while still open.

Sealing (this is the one place that explains it; other modules link here)
-------------------------------------------------------------------------
A vfio-user client (DMA_MAP) or a vhost-user front-end (SET_MEM_TABLE, ADD_MEM_REG) hands us an
fd for guest RAM and we ``mmap`` it shared. The peer keeps its own copy of the fd. If it later
``ftruncate``s the file below the end of our mapping, the kernel answers any access of ours to
a page past the new end of file with SIGBUS, and SIGBUS kills the whole server process (Python
cannot turn it into an exception). A single hostile or buggy peer could so take down a device
that other connections, and the host's control socket, rely on.

Linux file sealing (``fcntl(2)`` F_ADD_SEALS, memfd_create(2)) closes that hole for memfds: once
F_SEAL_SHRINK is set on the file, nobody (the peer included) can make it smaller;
``ftruncate`` to a smaller size fails with EPERM. So before mapping a peer's fd,
``seal_against_shrink(fd)``:

1. reads the seals (F_GET_SEALS). If F_SEAL_SHRINK is already there, the file is safe. QEMU's
   ``memory-backend-memfd`` seals GROW|SHRINK|SEAL by default (``seal=on``), so that is the
   usual case with a real QEMU;
2. otherwise tries to add F_SEAL_SHRINK (F_ADD_SEALS). That works on a memfd created with
   MFD_ALLOW_SEALING that is not yet F_SEAL_SEAL'd, and opened for writing;
3. if neither works (a regular file on disk, a plain tmpfs or hugetlbfs file, a memfd without
   MFD_ALLOW_SEALING, an fd opened read-only), the file cannot be protected. The lead's decision
   is to accept the mapping anyway (a QEMU ``memory-backend-file`` guest is a legitimate set-up)
   and report it: once the mapping is accepted, ``report_unsealed`` logs one warning naming the
   risk and counts ``dma_map_unsealed`` in the session's counters.
   That residual risk (a peer that shrinks an unsealable file can crash the server) is
   documented in docs/interfaces.md, vfio-user and vhost-user sections.

The seal is added *before* the caller checks the file's size against the requested range
(conventions 6: check at the moment of use): once sealed, the size read by ``fstat`` can only
grow, so a range found inside the file stays inside it.

Sealing changes the peer's file for good (seals cannot be removed). F_SEAL_SHRINK alone is the
least we can ask: the peer may still grow the file and write to it, which is all guest RAM
needs.

Errors: every refusal is a ``PeerError`` with the counter the caller names and the errno of the
failing call (EINVAL for a range past the end of the file). A mapping costs the process one fd
(Python's ``mmap`` keeps a dup of the file's), so ``map`` refuses with ENOSPC while fewer than
``fd_reserve(limit)`` fds are left (``fdstream.FD_GAUGE``), before the process runs out: the fds
that remain serve connections, eventfds and the control socket (``connection`` docstring).
"""
from __future__ import annotations

import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections import Counter
from dataclasses import dataclass

from balloon_dev.transport.core import PeerError
from balloon_dev.transport.fdstream import FD_GAUGE
from guestmem import GuestMemory

log = logging.getLogger(__name__)

#: Fds kept free of guest RAM mappings (see the module docstring): a quarter of the limit, at
#: least 8 and at most 64.
def fd_reserve(limit: int) -> int:
    return max(8, min(64, limit // 4))


#: The counter (in the session's ``counters``, hence in ``stats``) of mappings left unprotected.
UNSEALED_COUNTER = "dma_map_unsealed"


class SealState(enum.Enum):
    """How a peer's fd stands against shrinking, after ``seal_against_shrink``."""

    ALREADY_SEALED = "already_sealed"  # F_SEAL_SHRINK was set by the peer (QEMU's default)
    SEALED = "sealed"                  # we added F_SEAL_SHRINK
    UNSEALABLE = "unsealable"          # cannot be sealed: shrinking it can SIGBUS the server


@dataclass(frozen=True, slots=True)
class SealResult:
    state: SealState
    detail: str  # why it could not be sealed (empty unless UNSEALABLE)

    @property
    def protected(self) -> bool:
        return self.state is not SealState.UNSEALABLE


#: The risk an unsealable mapping carries, worded once for both transports' warnings.
UNSEALED_RISK = ("cannot be sealed against shrinking (F_SEAL_SHRINK); mapped anyway, but if the "
                 "peer truncates it, the server's next access to the lost pages is a SIGBUS "
                 "that kills the whole process")


def seal_against_shrink(fd: int) -> SealResult:
    """Make sure the file behind ``fd`` cannot shrink; say whether that worked. Never raises."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        # EINVAL: not a file type that supports seals at all (regular file on disk, pipe, ...).
        return SealResult(SealState.UNSEALABLE,
                          f"F_GET_SEALS: {errno.errorcode.get(e.errno or 0, e.errno)}")
    if seals & fcntl.F_SEAL_SHRINK:
        return SealResult(SealState.ALREADY_SEALED, "")
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as e:
        # EPERM: F_SEAL_SEAL set (memfd without MFD_ALLOW_SEALING, plain tmpfs/hugetlbfs file)
        # or the fd is not open for writing.
        if seals & fcntl.F_SEAL_SEAL:
            why = "F_SEAL_SEAL is set"
        elif _read_only(fd):
            why = "fd opened read-only"
        else:
            why = "refused"
        return SealResult(SealState.UNSEALABLE,
                          f"F_ADD_SEALS: {errno.errorcode.get(e.errno or 0, e.errno)} ({why})")
    return SealResult(SealState.SEALED, "")


def _read_only(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    except OSError:
        return False


def report_unsealed(res: SealResult, counters: Counter[str], what: str) -> None:
    """Once a transport has *accepted* a mapping whose fd ``seal_against_shrink`` could not
    protect: one warning naming the risk, and ``counters[UNSEALED_COUNTER]`` bumped (the
    session's counters, which its server's ``stats`` show). Nothing for a protected fd.
    ``what`` names the mapping for the log (e.g. "DMA_MAP [0x0, +0x1000)")."""
    if not res.protected:
        counters[UNSEALED_COUNTER] += 1
        log.warning("%s: guest RAM fd %s: %s", what, res.detail, UNSEALED_RISK)


@dataclass(slots=True)
class RamMapping:
    """One mapped range of guest RAM: ``view`` covers ``[gpa, gpa + size)`` exactly."""

    gpa: int
    size: int
    mm: mmap.mmap
    view: memoryview
    seal: SealResult
    writable: bool


class GuestRamMapper:
    """Maps a peer's guest-RAM fds into ``mem`` (see the module docstring); counts into
    ``counters`` (the session's)."""

    def __init__(self, mem: GuestMemory, counters: Counter[str]) -> None:
        self.mem = mem
        self.counters = counters
        self._deferred: list[mmap.mmap] = []

    def map(self, fd: int, *, gpa: int, size: int, offset: int, writable: bool, counter: str,
            what: str) -> RamMapping:
        """Seal, check and map ``size`` bytes of ``fd`` at file ``offset``; not yet in ``mem``.
        Raises ``PeerError(counter, ...)``. The caller still owns (and closes) ``fd``."""
        if size <= 0 or gpa < 0 or gpa + size > 1 << 64 or offset < 0:
            raise PeerError(counter, f"{what}: invalid range [{gpa:#x}, +{size:#x}) "
                            f"at offset {offset:#x}")
        left, limit = FD_GAUGE.headroom(), FD_GAUGE.limit()
        if left < fd_reserve(limit):
            raise PeerError(counter, f"{what}: only {left} file descriptors left (limit "
                            f"{limit}); each mapping keeps one and {fd_reserve(limit)} are "
                            "kept for connections", errno=errno.ENOSPC)
        # Seal before the size check: a sealed file cannot shrink below what fstat saw.
        seal = seal_against_shrink(fd)
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - base
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
                # Touching a mapping past the end of its file is a SIGBUS in the server.
                raise PeerError(counter, f"{what}: [{offset:#x}, +{size:#x}) runs past the end "
                                f"of its fd ({st.st_size:#x} bytes)")
            mm = mmap.mmap(fd, size + delta, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0),
                           offset=base)
        except (OSError, ValueError, OverflowError) as e:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EINVAL
            raise PeerError(counter, f"{what}: cannot map fd {fd} (offset {offset:#x} size "
                            f"{size:#x}): {e}", errno=err) from None
        return RamMapping(gpa, size, mm, memoryview(mm)[delta:delta + size], seal, writable)

    def add(self, m: RamMapping, *, name: str, counter: str, what: str) -> None:
        """Put an accepted mapping into guest memory (``PeerError(counter)`` if it overlaps),
        then report an unsealable fd once."""
        try:
            self.mem.add_region(m.gpa, m.view, name=name, readonly=not m.writable)
        except ValueError as e:
            self.discard(m)
            raise PeerError(counter, f"{what}: {e}", errno=errno.EEXIST) from None
        report_unsealed(m.seal, self.counters, what)

    def unmap(self, m: RamMapping) -> None:
        """Take ``m`` out of guest memory (if it is there) and unmap it, or defer the unmap."""
        try:
            region = self.mem.remove_region(m.gpa)
        except (KeyError, ValueError):
            pass
        else:
            region.buf.release()  # guest memory's own view of ``m.view``
        self.discard(m)

    def discard(self, m: RamMapping) -> None:
        """Unmap a mapping that is not (or no longer) in guest memory."""
        m.view.release()
        try:
            m.mm.close()
        except BufferError:
            # The device still holds a view (a numpy array over a ring): close it later.
            self.counters["unmap_deferred"] += 1
            self._deferred.append(m.mm)
        self.reap()

    def reap(self) -> None:
        """Close the deferred mappings whose views are gone."""
        left = []
        for mm in self._deferred:
            try:
                mm.close()
            except BufferError:
                left.append(mm)
        self._deferred = left
