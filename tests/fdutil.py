"""File-descriptor helpers shared by the vfio-user and vhost-user tests: eventfds as a front-end
passes them (non-blocking, so an unsignalled read returns at once), their counters, and whether
an fd the device was handed is still open (the device must close what it rejects or drops), and
how many fds the process holds (leak checks compare it before and after a peer)."""
from __future__ import annotations

import os


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 if it was not signalled."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def sealable_memfd(size: int) -> int:
    """A memfd of ``size`` bytes created with MFD_ALLOW_SEALING and no seal yet: what a server
    must seal against shrinking itself before mapping it."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    """How many fds this process has open now."""
    return len(os.listdir("/proc/self/fd"))
