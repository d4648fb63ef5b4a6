"""Host profiles: the per-page costs of one host's QEMU (``[host] profile`` in a scenario).

* ``xeon-2017``: the published set-up (Xeon E5-2699 v4, KVM, QEMU with free page hinting, 2018),
  the constants docs/cost-model.md derives (one calibrated, the rest estimated).
* ``lab-qemu-11.1``: this project's 2-core machine running QEMU 11.1, fitted from qtest
  migrations (``balloon-hint fidelity --measure-host``; docs/cost-model.md, "Host profiles").
"""
from __future__ import annotations

from dataclasses import fields, replace

from balloon_dev.host.precopy import CostModel
from protocol.errors import UsageError

#: Profile name -> the CostModel fields it sets (the rest keep CostModel's defaults).
PROFILE_VALUES: dict[str, dict[str, float]] = {
    "xeon-2017": {},
    # Measured at the load of the second table's lab runs (2026-12-07 16:41-16:45 UTC, load
    # average 1.3-1.5, no other migration running). ``balloon-hint fidelity --measure-host``:
    # QEMU 11.1.3 under qtest, 512 MiB, 9 migrations, medians of 3 per data fraction (an
    # earlier fit at load average 6-10 gave 19.3 us a zero page and -8.47 us copy: the machine's
    # other jobs, not QEMU; docs/cost-model.md, "Host profiles").
    # Its 2 CPUs are shared by the guest's vCPU thread (TCG), QEMU's hint iothread and the
    # migration thread. The guest's init_on_alloc hint round (`migrate-check --hints on
    # --init-on-alloc 1`, capture order, 81 blocks in round 1): 59 intervals of median 2.8 ms
    # (blocks that had held data), 21 of median 21.2 ms (blocks never written since boot), with
    # those 3 threads busy on the 1 CPU migrate-check's real-time hint poller left them (a share
    # of 1/3): so a vCPU clears resident memory at 4 MiB / (2.8 ms x 1/3) = 4.49 GB/s and pays
    # (21.2 - 2.8) ms x 1/3 / 1024 = 5.99 us more for each page its host backs on that first
    # write (docs/cost-model.md, "Host CPU contention"; vmsim.host_measure.fit_guest_memory).
    # Switchover: QEMU's `downtime` of the real guest's
    # migrations that did not stop in the middle of a pass (all but the hinted init_on_alloc=0
    # runs and the off run that sent 16.8 MB stopped): 2-32 ms, median 5 ms over 10 runs
    # (docs/cost-model.md, the second table).
    "lab-qemu-11.1": {"zero_page_s": 4.149e-6, "copy_page_s": 0.725e-6,
                      "log_start_page_s": 0.0, "host_cores": 2,
                      "guest_memory_bandwidth": 4.49e9, "guest_first_write_s": 5.99e-6,
                      "switchover_s": 0.005},
}


class UnknownProfile(UsageError, KeyError):
    """A host profile name that is not in ``PROFILE_VALUES`` (a ``KeyError`` too: it is a
    lookup by name)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


def cost_model(profile: str) -> CostModel:
    """The CostModel of a named profile (``UnknownProfile`` names the known ones)."""
    if profile not in PROFILE_VALUES:
        raise UnknownProfile(f"unknown host profile {profile!r} (known: "
                             f"{', '.join(PROFILE_VALUES)})")
    known = {f.name for f in fields(CostModel)}
    values = PROFILE_VALUES[profile]
    bad = set(values) - known
    if bad:
        raise KeyError(f"host profile {profile!r} sets unknown costs {sorted(bad)}")
    return replace(CostModel(), **values)


PROFILES = tuple(PROFILE_VALUES)
