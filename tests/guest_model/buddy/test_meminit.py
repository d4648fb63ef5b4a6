"""guest_model.buddy.meminit: page poisoning takes precedence over init_on_alloc and
init_on_free, as Linux's mem_debugging_and_hardening_init() decides at boot, and the allocator
writes what is in force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from guest_model.buddy import BuddyAllocator, MemInit
from guestmem.pages import POISON, ZERO, PageVersions

PRECEDENCE = ("mem auto-init: CONFIG_PAGE_POISONING is on, will take precedence over "
              "init_on_alloc and init_on_free")
COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(("ioa", "iof", "poison"), COMBOS)
def test_resolution_of_every_combination(ioa: bool, iof: bool, poison: bool) -> None:
    m = MemInit.resolve(init_on_alloc=ioa, init_on_free=iof, page_poisoning=poison)
    assert m.requested == (ioa, iof, poison)
    assert m.page_poisoning == poison
    assert m.init_on_alloc == (ioa and not poison)
    assert m.init_on_free == (iof and not poison)
    assert (PRECEDENCE in m.boot_log) == (poison and (ioa or iof))
    heap = (f"mem auto-init: stack:off, heap alloc:{'on' if m.init_on_alloc else 'off'}, "
            f"heap free:{'on' if m.init_on_free else 'off'}")
    assert heap in m.boot_log
    assert m.free_version == (POISON if poison else ZERO if iof else None)


@pytest.mark.parametrize(("ioa", "iof", "poison"), COMBOS)
def test_allocator_writes_what_is_in_force(ioa: bool, iof: bool, poison: bool) -> None:
    pv = PageVersions(16 << 8)
    a = BuddyAllocator(16 << 20, pages=pv, init_on_alloc=ioa, init_on_free=iof,
                       page_poisoning=poison)
    assert a.meminit.boot_log and (a.init_on_alloc, a.init_on_free, a.page_poisoning) == (
        a.meminit.init_on_alloc, a.meminit.init_on_free, a.meminit.page_poisoning)
    p = a.alloc_pages(3)
    assert p is not None
    pv.write_range(p, 8)  # the guest uses the pages
    a.free_pages(p, 3)
    a.drain_pcp()
    free = a.free_mask()
    want = a.meminit.free_version
    if want is not None:
        # Every free page, boot memory and the block just freed alike, holds it.
        assert (pv.version[free] == want).all()
    else:
        assert not (pv.version[p:p + 8] == ZERO).any()  # nothing cleared the freed block
    q = a.alloc_pages(3)
    assert q is not None
    got = pv.version[q:q + 8]
    if a.init_on_alloc:
        assert (got == ZERO).all()
    elif poison:
        assert (got == POISON).all()  # no zeroing on allocation: the poison stays
    assert np.count_nonzero(a.free_mask()) == np.count_nonzero(free) - 8
