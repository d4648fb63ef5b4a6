"""The host side of the balloon: what a hypervisor does with the device's effects (the
pre-copy migration in ``precopy``). It reaches the device only through ``balloon_dev.effects``.
"""
from __future__ import annotations

from protocol.errors import UsageError


class MigrationError(UsageError):
    """Misuse of the engine by its caller (never raised for guest input)."""
