"""guestmem: bounds on every access, dirty logging, page versions, unit conversions."""
from __future__ import annotations

import numpy as np
import pytest

from guestmem import DirtyLog, GuestMemory, GuestMemoryError, PageVersions
from guestmem.pages import POISON, ZERO
from guestmem.units import bytes_to_pages, gpa_to_pfn, pfn_to_gpa, whole_pages_in


def mem2() -> GuestMemory:
    m = GuestMemory()
    m.add_region(0x1000, bytearray(0x2000), "a")
    m.add_region(0x10000, bytearray(0x1000), "b")
    return m


@pytest.mark.parametrize("gpa,n", [(0, 1), (0xFFF, 2), (0x2FFF, 2), (0x3000, 1), (0x2000, 0xE001),
                                   (2**64 - 1, 2), (-1, 1), (0x1000, -1)])
def test_out_of_bounds_raises_guest_memory_error(gpa, n):
    m = mem2()
    with pytest.raises(GuestMemoryError):
        m.read(gpa, n)
    if n > 0:
        with pytest.raises(GuestMemoryError):
            m.write(gpa, b"x" * n)
    assert not m.contains(gpa, n)


def test_access_inside_regions():
    m = mem2()
    m.write_u64(0x2FF8, 0x0102030405060708)
    assert m.read_u64(0x2FF8) == 0x0102030405060708
    a = m.array(0x10000, "<u4", 4, writable=True)
    a[:] = [1, 2, 3, 4]
    assert m.read_u32(0x1000C) == 4


def test_overlapping_regions_refused_and_removal():
    m = mem2()
    with pytest.raises(ValueError):
        m.add_region(0x2000, bytearray(0x1000))
    m.remove_region(0x10000)
    assert not m.contains(0x10000, 1)


def test_readonly_region_refuses_writes():
    m = GuestMemory()
    m.add_region(0, bytes(0x1000), "rom", readonly=True)
    assert m.read(0, 4) == b"\0" * 4
    with pytest.raises(GuestMemoryError):
        m.write(0, b"x")


def test_dirty_log_records_writes_between_syncs():
    m = GuestMemory()
    m.add_region(0, bytearray(0x10000))
    log = DirtyLog(16)
    m.dirty_log = log
    m.write(0x1FFF, b"ab")  # straddles pages 1 and 2
    assert not log.sync().any()  # logging was off
    log.start()
    m.write(0x1FFF, b"ab")
    bits = log.sync()
    assert np.nonzero(bits)[0].tolist() == [1, 2]
    assert not log.sync().any()


def test_page_versions_kinds_and_logging():
    log = DirtyLog(8)
    log.start()
    pv = PageVersions(8, log)
    pv.write_range(2, 2)
    v = pv.version.copy()
    assert v[2] >= 2 and v[3] >= 2 and v[2] != v[3]
    pv.write_range(2, 1)
    assert pv.version[2] != v[2]
    pv.write_pfns(np.array([5]), "poison")
    pv.write_pfns(np.array([3]), "zero")
    assert pv.version[5] == POISON and pv.version[3] == ZERO
    assert np.nonzero(log.sync())[0].tolist() == [2, 3, 5]
    with pytest.raises(ValueError):
        pv.write_range(0, 1, "garbage")


def test_units():
    assert gpa_to_pfn(0x1FFF) == 1 and pfn_to_gpa(3) == 0x3000 and bytes_to_pages(0x2FFF) == 2
    assert whole_pages_in(0x1800, 0x2000) == (2, 1)
    assert whole_pages_in(0x1000, 0x800) == (1, 0)
