"""The driver checker: which driver requirements (protocol.md 4.6 DR-n) the driver broke.

Theory of operation
-------------------
``BalloonDevice`` calls ``DriverChecker`` at each moment where a driver requirement becomes
visible to a device (a feature set at DRIVER_OK, a deflate, a stats buffer, a free page command,
a hint outside a round, a config write). The checker judges, logs each breach at warning with its
id and detail, and counts it twice: in ``violations`` (DR id -> count, the device's
``dr_violations``) and in the device's guest-error counters, which it shares. It decides nothing
for the device: the device serves the buffer whatever the verdict.

What it remembers (``DriverCheckerState``, cleared by a device reset): the tag set of the last
statistics buffer, the last command id the driver started a round with, and whether the driver
has stopped its hint round.

Observable here:

- DR-1: MUST_TELL_HOST offered and not accepted (a "should").
- DR-6: a deflate names a pfn that is not in the balloon (never inflated, or deflated already).
- DR-7 (legacy interface only): a write to ``actual`` that is not one 4-byte write.
- DR-8: a second stats buffer while the device holds one; a duplicate tag in one buffer; a
  buffer whose tag set differs from the previous buffer's.
- DR-9: a free_page_vq out buffer that is not exactly 4 bytes; a second start for an id.
- DR-10: a hint after the driver's own STOP (or before its first start) and before its next
  matching start. Hints that race with a host-published STOP are not counted: the driver may
  not have seen the change yet.
- DR-12: ``poison_val`` changed after DRIVER_OK; PAGE_POISON negotiated but ``poison_val``
  never written before DRIVER_OK.
- DR-13 (in part): free page reporting kicked before DRIVER_OK.

Not observable from the device (it cannot see guest page contents, page use or intentions):
DR-2 (whether the guest poisons or zeroes freed pages, and what it expects of them), DR-3 and
the rest of DR-7 (inflate/deflate/actual timing: the driver may batch, so no single moment is
wrong), DR-4, DR-5, DR-11 and the rest of DR-13 (page use and page contents).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("balloon_dev.device")


@dataclass(slots=True)
class DriverCheckerState:
    """What the checker remembers between buffers; a device reset starts it afresh."""

    stats_tags: frozenset[int] | None = None
    last_started_id: int | None = None
    driver_stopped: bool = True  # no hint round opened by the driver yet


class DriverChecker:
    def __init__(self, counters: dict[str, int]) -> None:
        #: The device's guest-error counters: every DR breach is counted there too.
        self._counters = counters
        #: DR id -> times broken, over the device's whole life (kept across reset).
        self.violations: dict[str, int] = {}
        self.state = DriverCheckerState()

    def reset(self) -> None:
        self.state = DriverCheckerState()

    def broke(self, dr_id: str, fmt: str, *args: object, n: int = 1) -> None:
        """The driver broke requirement ``dr_id`` (``n`` times); ``fmt % args`` says how."""
        self.violations[dr_id] = self.violations.get(dr_id, 0) + n
        self._counters[dr_id] = self._counters.get(dr_id, 0) + n
        log.warning("driver broke %s: " + fmt, dr_id, *args)

    # -- features and config -------------------------------------------------------------------
    def must_tell_host_declined(self, features: int, legacy: bool) -> None:
        kind = "legacy features" if legacy else "features"
        self.broke("DR-1", "MUST_TELL_HOST offered and not accepted (%s %#x)", kind, features)

    def poison_not_written(self) -> None:
        self.broke("DR-12", "PAGE_POISON negotiated but poison_val not written before DRIVER_OK")

    def poison_changed(self, old: int, new: int) -> None:
        """A ``poison_val`` write after DRIVER_OK: DR-12 if it changes the value."""
        if new != old:
            self.broke("DR-12", "poison_val changed after DRIVER_OK (%#x -> %#x, ignored)",
                       old, new)

    def legacy_actual_write(self, lo: int, hi: int, whole: bool) -> None:
        """A legacy write touching bytes [lo, hi) of ``actual``; ``whole``: all 4 at once."""
        if not whole:
            # Old Linux wrote the bytes one by one.
            self.broke("DR-7", "legacy write of `actual` bytes [%#x, %#x) is not one 4-byte "
                       "write", lo, hi)

    # -- queues --------------------------------------------------------------------------------
    def reporting_before_driver_ok(self) -> None:
        self.broke("DR-13", "free page reporting kicked before DRIVER_OK")

    def deflate_not_in_balloon(self, n: int, first: int) -> None:
        self.broke("DR-6", "deflate of %d pfns not in the balloon, first %#x (skipped)", n, first)

    def second_stats_buffer(self, head: int, held: int) -> None:
        self.broke("DR-8", "second stats buffer (head %d) while holding head %d; the old one is "
                   "returned", head, held)

    def stats_tags(self, head: int, tags: list[int]) -> None:
        """The tags of one stats buffer: no duplicates, the same set as the previous buffer."""
        if len(set(tags)) != len(tags):
            self.broke("DR-8", "stats head %d: duplicate tags %s", head, tags)
        tagset = frozenset(tags)
        prev = self.state.stats_tags
        if prev is not None and tagset != prev:
            self.broke("DR-8", "stats head %d: tag set %s differs from the previous %s", head,
                       sorted(tagset), sorted(prev))
        self.state.stats_tags = tagset

    def command_length(self, head: int, n: int) -> bool:
        """A free_page_vq out buffer of ``n`` bytes; False (DR-9) unless exactly 4."""
        if n == 4:
            return True
        self.broke("DR-9", "free_page head %d: out buffer of %d bytes, not 4 (ignored)", head, n)
        return False

    def command(self, head: int, value: int, *, opened: bool, ended: bool) -> None:
        """The driver sent command ``value``: it ``opened`` a round (REQUESTED -> START), or
        ``ended`` one (its STOP, or any out buffer that closed START)."""
        if value >= 2 and value == self.state.last_started_id:
            self.broke("DR-9", "free_page head %d: second start for cmd id %#x", head, value)
        if opened:
            self.state.last_started_id = value
            self.state.driver_stopped = False
        elif ended:
            self.state.driver_stopped = True

    def hints_outside_round(self, n: int, head: int, ranges: str, hint_state: str) -> bool:
        """``n`` hints arrived outside START: DR-10 (True) if the driver itself had stopped or
        not yet started; False if the host closed the round and the driver may not know yet."""
        if not self.state.driver_stopped:
            return False
        # protocol.md 4.4 rule 4 / D-10: not a hint outside START.
        self.broke("DR-10", "%d hints from head %d (%s) after the driver's STOP / before its "
                   "start (cmd_id state %s)", n, head, ranges, hint_state, n=n)
        return True
