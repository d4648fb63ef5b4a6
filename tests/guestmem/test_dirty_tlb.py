"""The dirty log's policies: ``exact`` logs every write; ``qemu-7.2-tcg`` loses the writes a
vCPU makes through a TLB write entry that outlived a bitmap sync (guestmem.dirty)."""
from __future__ import annotations

import numpy as np
import pytest

from guestmem.dirty import SYNC_WORD_PAGES, DirtyLog
from guestmem.pages import PageVersions

RAM = 4096  # pages: a whole number of 64-page words


def _synced(policy: str, ram: int = RAM, **kw) -> tuple[DirtyLog, PageVersions]:
    """A guest wrote page 7 before migration; logging started; the set-up sync ran."""
    log = DirtyLog(ram, policy, **kw)
    pages = PageVersions(ram, log)
    pages.switch_mm("init")
    pages.write_range(7, 1)
    log.start()
    log.sync()
    return log, pages


def test_exact_logs_a_write_after_a_sync() -> None:
    log, pages = _synced("exact")
    pages.write_range(7, 1)
    assert log.sync()[7]
    assert log.unlogged_writes == 0


def test_qemu72_loses_a_write_through_an_entry_that_outlived_the_sync() -> None:
    log, pages = _synced("qemu-7.2-tcg")
    pages.write_pfns(np.array([7, 8]))
    bits = log.sync()
    assert not bits[7] and bits[8]  # 7's entry was filled before the sync; 8 is new
    assert log.unlogged_writes == 1
    # Written again after another sync: still through the same entry, still lost.
    pages.write_range(7, 1)
    assert not log.sync()[7]


def test_qemu72_a_process_switch_flushes_the_tlb() -> None:
    log, pages = _synced("qemu-7.2-tcg")
    pages.switch_mm("dd")
    pages.write_range(7, 1)
    assert log.sync()[7]
    assert log.tlb_flushes == 2 and log.unlogged_writes == 0


def test_qemu72_kernel_work_and_the_same_process_do_not_flush() -> None:
    log, pages = _synced("qemu-7.2-tcg")
    pages.switch_mm(None)     # a kernel thread borrows the current address space
    pages.switch_mm("init")   # back to the same process
    pages.write_range(7, 1)
    assert not log.sync()[7]
    assert log.tlb_flushes == 1


def test_qemu72_an_evicted_entry_is_filled_again_and_logs() -> None:
    log, pages = _synced("qemu-7.2-tcg", tlb_entries=16)
    pages.write_range(100, 40)  # more pages than the TLB holds, written after page 7
    log.sync()
    pages.write_range(7, 1)
    assert log.sync()[7]
    # The 16 most recently written stay: a page among them is lost again.
    pages.write_range(139, 1)
    assert not log.sync()[139]


def test_qemu72_hot_page_outlives_a_bulk_write_smaller_than_the_tlb() -> None:
    log, pages = _synced("qemu-7.2-tcg", tlb_entries=2048)
    for _ in range(3):   # a 4 MiB block zeroed between two writes of a hot page
        pages.write_range(1024, 1024, "zero")
        pages.write_range(7, 1)
    assert not log.sync()[7]


def test_qemu72_ram_not_whole_words_is_synced_page_by_page_and_loses_nothing() -> None:
    log, pages = _synced("qemu-7.2-tcg", ram=RAM + SYNC_WORD_PAGES // 2)
    assert not log.stale_tlb
    pages.write_range(7, 1)
    assert log.sync()[7]


def test_writes_to_the_driver_area_bytes_are_always_logged() -> None:
    log, _ = _synced("qemu-7.2-tcg")
    log.mark_bytes(7 << 12, 16)  # the device writes rings there too: QEMU logs those itself
    assert log.sync()[7]


@pytest.mark.parametrize("kw", [{"policy": "qemu-9"}, {"tlb_entries": 0}])
def test_bad_policy_or_tlb_is_refused(kw) -> None:
    with pytest.raises(ValueError):
        DirtyLog(RAM, **kw)
