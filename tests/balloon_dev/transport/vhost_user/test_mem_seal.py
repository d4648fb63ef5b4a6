"""SET_MEM_TABLE / ADD_MEM_REG: each region fd is sealed against shrinking before it is mapped
(balloon_dev/transport/guest_ram.py), so a front-end cannot SIGBUS the back-end by truncating guest
RAM later; an fd that cannot be sealed is mapped anyway, logged and counted as
``dma_map_unsealed``."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator

import pytest

from protocol import vhost_user as vu
from tests.balloon_dev.transport.vhost_user.frontend import RAM_UADDR, Frontend
from tests.fdutil import sealable_memfd

R = vu.VhostUserRequest
MIB = 1 << 20


@pytest.fixture
def fe() -> Iterator[Frontend]:
    f = Frontend()
    f.init()
    yield f
    f.close()


def table(*sizes: int) -> bytes:
    regs, gpa = [], 0
    for s in sizes:
        regs.append(vu.MemoryRegion(gpa, s, RAM_UADDR + gpa, 0))
        gpa += s
    return vu.build_memory_table(regs)


def test_set_mem_table_seals_a_sealable_memfd(fe: Frontend) -> None:
    fd = sealable_memfd(2 * MIB)
    try:
        r = fe.request(R.SET_MEM_TABLE, table(2 * MIB), fds=[fd], need_reply=True)
        assert r is not None and r.u64 == 0
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 0)
        assert e.value.errno == errno.EPERM
        fe.be_mem.write(2 * MIB - 4, b"last")
        assert os.pread(fd, 4, 2 * MIB - 4) == b"last"
        assert fe.session.counters["dma_map_unsealed"] == 0
    finally:
        os.close(fd)


def test_add_mem_reg_seals_and_accepts_an_already_sealed_memfd(fe: Frontend) -> None:
    mine, qemu = sealable_memfd(MIB), sealable_memfd(MIB)
    fcntl.fcntl(qemu, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    try:
        for gpa, fd in ((0, mine), (MIB, qemu)):
            reg = vu.MemoryRegion(gpa, MIB, RAM_UADDR + gpa, 0)
            r = fe.request(R.ADD_MEM_REG, vu.build_mem_reg(reg), fds=[fd], need_reply=True)
            assert r is not None and r.u64 == 0
        assert fcntl.fcntl(mine, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        assert [(x.gpa, x.size) for x in fe.be_mem.regions] == [(0, MIB), (MIB, MIB)]
        assert fe.session.counters["dma_map_unsealed"] == 0
    finally:
        os.close(mine)
        os.close(qemu)


def test_unsealable_regions_are_mapped_warned_and_counted(
        fe: Frontend, caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(MIB)
        plain = os.memfd_create("no-sealing")  # F_SEAL_SEAL from birth
        os.ftruncate(plain, MIB)
        with caplog.at_level(logging.WARNING):
            r = fe.request(R.SET_MEM_TABLE, table(MIB, MIB), fds=[f.fileno(), plain],
                           need_reply=True)
        os.close(plain)
        assert r is not None and r.u64 == 0
        assert [(x.gpa, x.size) for x in fe.be_mem.regions] == [(0, MIB), (MIB, MIB)]
        fe.be_mem.write(8, b"file")
        assert os.pread(f.fileno(), 4, 8) == b"file"
    assert fe.session.counters["dma_map_unsealed"] == 2
    warned = [r.getMessage() for r in caplog.records if "SIGBUS" in r.getMessage()]
    assert len(warned) == 2 and "region 1 [0x100000, +0x100000)" in warned[1]


def test_rejected_table_counts_nothing(fe: Frontend) -> None:
    plain = os.memfd_create("small")
    os.ftruncate(plain, MIB)
    try:
        r = fe.request(R.SET_MEM_TABLE, table(2 * MIB), fds=[plain], need_reply=True)
        assert r is not None and r.u64 == 1  # past the end of its file
        assert fe.session.counters["bad_mem_table"] == 1
        assert fe.session.counters["dma_map_unsealed"] == 0
    finally:
        os.close(plain)
