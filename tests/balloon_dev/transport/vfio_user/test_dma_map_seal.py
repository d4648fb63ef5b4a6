"""VFIO_USER_DMA_MAP: the DMA fd is sealed against shrinking before it is mapped, so a client
cannot SIGBUS the server by truncating guest RAM later (balloon_dev/transport/guest_ram.py); an fd
that cannot be sealed is mapped anyway, logged and counted as ``dma_map_unsealed``."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile

import pytest

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client, memfd
from tests.fdutil import sealable_memfd

C = vu.Command.DMA_MAP
RW = vu.VFIO_DMA_MAP_FLAG_READ | vu.VFIO_DMA_MAP_FLAG_WRITE
MIB = 1 << 20


def test_sealable_memfd_is_sealed_by_dma_map(client: Client,
                                             caplog: pytest.LogCaptureFixture) -> None:
    fd = sealable_memfd(4 * MIB)
    mine = os.dup(fd)
    try:
        with caplog.at_level(logging.WARNING):
            client.ok(C, vu.build_dma_map(RW, 0, 0, 4 * MIB), [fd])
        assert fcntl.fcntl(mine, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(OSError) as e:
            os.ftruncate(mine, 4096)  # the attack: shrink guest RAM under the mapping
        assert e.value.errno == errno.EPERM
        client.mem.write(4 * MIB - 8, b"still ok")  # the last page is still there
        assert os.pread(mine, 8, 4 * MIB - 8) == b"still ok"
        assert client.session.counters["dma_map_unsealed"] == 0
        assert not [r for r in caplog.records if "SIGBUS" in r.getMessage()]
    finally:
        os.close(mine)


def test_memfd_already_sealed_is_accepted(client: Client) -> None:
    fd = sealable_memfd(MIB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    client.ok(C, vu.build_dma_map(RW, 0, 0x200000, MIB), [fd])
    assert client.mem.contains(0x200000, MIB)
    assert client.session.counters["dma_map_unsealed"] == 0


def test_unsealable_regular_file_is_mapped_warned_and_counted(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(2 * MIB)
        with caplog.at_level(logging.WARNING):
            client.ok(C, vu.build_dma_map(RW, 0, 0x400000, 2 * MIB), [os.dup(f.fileno())])
        assert client.mem.contains(0x400000, 2 * MIB)
        client.mem.write(0x400000, b"file")
        assert os.pread(f.fileno(), 4, 0) == b"file"
    assert client.session.counters["dma_map_unsealed"] == 1
    warned = [r.getMessage() for r in caplog.records if "SIGBUS" in r.getMessage()]
    assert len(warned) == 1 and "DMA_MAP [0x400000, +0x200000)" in warned[0]


def test_unsealable_memfd_is_counted_once_per_mapping(client: Client) -> None:
    # The helpers' memfd() has no MFD_ALLOW_SEALING (F_SEAL_SEAL from birth).
    client.ok(C, vu.build_dma_map(RW, 0, 0, MIB), [memfd(MIB)])
    client.ok(C, vu.build_dma_map(RW, 0, MIB, MIB), [memfd(MIB)])
    assert client.session.counters["dma_map_unsealed"] == 2


def test_rejected_map_of_an_unsealable_fd_is_not_counted(client: Client) -> None:
    # The range runs past the end of the file: refused (EINVAL), so no mapping to warn about.
    assert client.error(C, vu.build_dma_map(RW, 0, 0, 2 * MIB), [memfd(MIB)]) == errno.EINVAL
    assert client.session.counters["dma_map_unsealed"] == 0
