"""``balloon-hint migrate-check``: migrate the lab's real guest between two QEMUs with QEMU's
free page hinting and classify every page that differs (``vmsim.lab_migrate``)."""
from __future__ import annotations

from vmsim.lab_migrate import add_arguments, run

HELP = ("real guest, QEMU's own free page hints: migrate, diff the RAM files page by page, "
        "check the guest (needs the QEMU lab)")

__all__ = ["HELP", "add_arguments", "run"]
