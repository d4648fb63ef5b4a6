"""Memory auto-initialisation: which of init_on_alloc, init_on_free and page poisoning is in force.

Linux decides this once at boot, in ``mem_debugging_and_hardening_init()`` (mm/mm_init.c; in
mm/page_alloc.c as ``init_mem_debugging_and_hardening`` before 6.4): when page poisoning is
requested and either init_on_alloc or init_on_free is too, poisoning wins, both init options are
turned off, and the kernel logs that it did so. ``report_meminit()`` then logs the heap settings
in force. (torvalds/linux at 00c010e1, mm/mm_init.c.)

What a free page holds follows from it: the poison pattern under poisoning (``free_pages_prepare``
poisons every freed page), zeros under init_on_free, anything otherwise. The balloon driver tells
the device the same thing through ``poison_val`` (0 with init_on_free, the poison pattern with
poisoning; Linux ``virtballoon_probe`` reads ``want_init_on_free()``, which is off when poisoning
took precedence), and the migration verifier checks free pages against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from guestmem.pages import POISON, ZERO


@dataclass(frozen=True, slots=True)
class MemInit:
    """The settings in force after boot and the kernel log lines that announced them."""

    init_on_alloc: bool
    init_on_free: bool
    page_poisoning: bool
    #: What asked for; the fields above are what Linux keeps of it.
    requested: tuple[bool, bool, bool]
    boot_log: tuple[str, ...]

    @classmethod
    def resolve(cls, *, init_on_alloc: bool, init_on_free: bool,
                page_poisoning: bool) -> MemInit:
        """The boot-time decision for the requested ``init_on_alloc=``, ``init_on_free=`` and
        ``page_poison=`` (all three as kernel command-line switches)."""
        log: list[str] = []
        ioa, iof = init_on_alloc, init_on_free
        if page_poisoning and (ioa or iof):
            log.append("mem auto-init: CONFIG_PAGE_POISONING is on, will take precedence over "
                       "init_on_alloc and init_on_free")
            ioa = iof = False
        log.append(f"mem auto-init: stack:off, heap alloc:{'on' if ioa else 'off'}, "
                   f"heap free:{'on' if iof else 'off'}")
        if iof:
            log.append("mem auto-init: clearing system memory may take some time...")
        return cls(ioa, iof, page_poisoning, (init_on_alloc, init_on_free, page_poisoning),
                   tuple(log))

    @property
    def free_version(self) -> int | None:
        """The page version every free page holds (``POISON`` or ``ZERO``), or None when free
        pages may hold anything."""
        if self.page_poisoning:
            return POISON
        if self.init_on_free:
            return ZERO
        return None
