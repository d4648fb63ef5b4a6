"""``balloon_dev.transport.guest_ram``: a peer's guest-RAM fd sealed against shrinking.

The property that matters is the kernel's: once ``seal_against_shrink`` says the fd is protected,
nobody can ``ftruncate`` the file smaller (EPERM), which is what keeps a hostile peer from making
the server's next access to its mapping a SIGBUS.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from collections import Counter

import pytest

from balloon_dev.transport.guest_ram import (
    UNSEALED_COUNTER,
    SealState,
    report_unsealed,
    seal_against_shrink,
)
from tests.fdutil import sealable_memfd

SIZE = 1 << 20


def test_sealable_memfd_gets_sealed_and_can_no_longer_shrink() -> None:
    fd = sealable_memfd(SIZE)
    try:
        res = seal_against_shrink(fd)
        assert res.state is SealState.SEALED and res.protected
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, SIZE // 2)
        assert e.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == SIZE
        # Only shrinking is sealed: guest RAM may still grow and be written.
        os.ftruncate(fd, 2 * SIZE)
        os.pwrite(fd, b"x", 0)
        # A second look finds the seal already there.
        assert seal_against_shrink(fd).state is SealState.ALREADY_SEALED
    finally:
        os.close(fd)


def test_guest_ramed_as_qemu_does_is_accepted_as_it_is() -> None:
    # memory-backend-memfd seal=on (QEMU's default): GROW | SHRINK | SEAL.
    fd = sealable_memfd(SIZE)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        res = seal_against_shrink(fd)
        assert res.state is SealState.ALREADY_SEALED and res.protected
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == (
            fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    finally:
        os.close(fd)


def test_memfd_without_allow_sealing_is_unsealable() -> None:
    fd = os.memfd_create("ram")  # F_SEAL_SEAL from birth
    os.ftruncate(fd, SIZE)
    try:
        res = seal_against_shrink(fd)
        assert res.state is SealState.UNSEALABLE and not res.protected
        assert "F_SEAL_SEAL" in res.detail
        os.ftruncate(fd, SIZE // 2)  # the risk is real: it can still shrink
    finally:
        os.close(fd)


def test_sealed_memfd_with_seal_seal_but_no_shrink_is_unsealable() -> None:
    fd = sealable_memfd(SIZE)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        assert seal_against_shrink(fd).state is SealState.UNSEALABLE
    finally:
        os.close(fd)


def test_read_only_fd_of_a_sealable_memfd_is_unsealable() -> None:
    fd = sealable_memfd(SIZE)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        res = seal_against_shrink(ro)
        assert res.state is SealState.UNSEALABLE and "read-only" in res.detail
        assert not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        os.close(ro)
        os.close(fd)


def test_regular_file_and_pipe_are_unsealable_and_nothing_raises() -> None:
    with tempfile.TemporaryFile() as f:
        f.truncate(SIZE)
        res = seal_against_shrink(f.fileno())
        assert res.state is SealState.UNSEALABLE and res.detail.startswith("F_")
    r, w = os.pipe()
    try:
        assert seal_against_shrink(r).state is SealState.UNSEALABLE
    finally:
        os.close(r)
        os.close(w)


def test_report_counts_and_warns_only_for_unprotected_fds(
        caplog: pytest.LogCaptureFixture) -> None:
    counters: Counter[str] = Counter()
    fd = sealable_memfd(SIZE)
    try:
        with caplog.at_level(logging.WARNING):
            report_unsealed(seal_against_shrink(fd), counters, "DMA_MAP [0x0, +0x100000)")
        assert counters[UNSEALED_COUNTER] == 0 and not caplog.records
        with tempfile.TemporaryFile() as f, caplog.at_level(logging.WARNING):
            report_unsealed(seal_against_shrink(f.fileno()), counters, "DMA_MAP [0x0, +0x1000)")
        assert counters == Counter({UNSEALED_COUNTER: 1})
        assert len(caplog.records) == 1
        msg = caplog.records[0].getMessage()
        assert "DMA_MAP [0x0, +0x1000)" in msg and "SIGBUS" in msg
    finally:
        os.close(fd)
