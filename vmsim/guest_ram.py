"""Guest RAM for our test clients (the vfio-user client and the vhost-user front-end): a memfd
made the way QEMU's memory-backend-memfd makes it (sealable, then sealed against growing and
shrinking), so a server sees what it would see from QEMU and need not seal it itself.
``release_guest_ram`` undoes it when a client closes: the ``GuestMemory`` regions go first, then
the mapping (kept alive if numpy views of the rings still exist), then the fd."""
from __future__ import annotations

import fcntl
import mmap
import os

from guestmem import GuestMemory


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


def release_guest_ram(mem: GuestMemory, ram: mmap.mmap | None, fd: int | None) -> None:
    """Remove every region of ``mem``, close the mapping ``ram`` and the memfd ``fd``."""
    for r in list(mem.regions):
        mem.remove_region(r.gpa).buf.release()
    if ram is not None:
        try:
            ram.close()
        except BufferError:
            pass  # a numpy view of the rings still exists; the mapping goes with it
    if fd is not None:
        os.close(fd)
