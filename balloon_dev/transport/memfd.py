"""Guarding a peer's guest-RAM fd against being shrunk under our mappings.

Theory of operation
-------------------
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

``close_quietly(fd)`` is the one fd-closing helper of the transports: a peer's fd we no longer
want is closed, and an fd the peer (or an earlier error path) already made invalid is no error.
``received_fds(ancillary)`` takes the fds out of what ``recvmsg`` returned (both servers read
messages that carry fds this way).
"""
from __future__ import annotations

import array
import enum
import errno
import fcntl
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

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


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring an error (EBADF: already closed; nothing to do about EIO here)."""
    try:
        os.close(fd)
    except OSError:
        pass


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of the SCM_RIGHTS control messages in ``recvmsg``'s ancillary data (a partial
    trailing int, as a truncated buffer can leave, is ignored)."""
    fds: list[int] = []
    for level, typ, cdata in ancillary:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[:len(cdata) - len(cdata) % got.itemsize])
            fds.extend(got)
    return fds


def report_unsealed(res: SealResult, counters: Counter[str], what: str) -> None:
    """Once a transport has *accepted* a mapping whose fd ``seal_against_shrink`` could not
    protect: one warning naming the risk, and ``counters[UNSEALED_COUNTER]`` bumped (the
    session's counters, which its server's ``stats`` show). Nothing for a protected fd.
    ``what`` names the mapping for the log (e.g. "DMA_MAP [0x0, +0x1000)")."""
    if not res.protected:
        counters[UNSEALED_COUNTER] += 1
        log.warning("%s: guest RAM fd %s: %s", what, res.detail, UNSEALED_RISK)
