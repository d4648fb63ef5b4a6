"""Guest RAM for our test clients (the vfio-user client and the vhost-user front-end): a memfd
made the way QEMU's memory-backend-memfd makes it (sealable, then sealed against growing and
shrinking), so a server sees what it would see from QEMU and need not seal it itself."""
from __future__ import annotations

import fcntl
import mmap
import os


def create_guest_ram(size: int, name: str = "balloon-hint-guest-ram") -> tuple[int, mmap.mmap]:
    """A sealed memfd of ``size`` bytes and a shared read-write mapping of it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
        ram = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, ram
