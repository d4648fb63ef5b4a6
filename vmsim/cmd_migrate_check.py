"""``balloon-hint migrate-check``: migrate the lab's real guest between two QEMUs with QEMU's
free page hinting and classify every page that differs (``vmsim.lab_migrate``).

The parser is built here and ``vmsim.lab_migrate`` (numpy, the QEMU lab) is imported only when
the command runs, so that ``migrate-check --help`` costs what the other commands' help costs
(vmsim.cli).
"""
from __future__ import annotations

import argparse

HELP = ("real guest, QEMU's own free page hints: migrate, diff the RAM files page by page, "
        "check the guest (needs the QEMU lab)")

__all__ = ["HELP", "add_arguments", "run"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--qemu", nargs="+", choices=("lab", "debian"), default=["lab"],
                    help="lab: the lab's QEMU; debian: Debian 12's qemu-system-x86 (the host's "
                    "if installed, else unpacked into the lab cache)")
    ap.add_argument("--init-on-alloc", nargs="+", type=int, choices=(0, 1), default=[0, 1])
    ap.add_argument("--hints", nargs="+", choices=("on", "off"), default=["on"],
                    help="off: control runs with free-page-hint=off (nothing may differ)")
    ap.add_argument("--runs", type=int, default=1, help="runs per QEMU and init_on_alloc")
    ap.add_argument("--ram", default="512M",
                    help="guest RAM (256M .. 2G, a multiple of 8K; a size that is not a "
                    "multiple of 256K takes QEMU's per-page dirty-bitmap sync, see "
                    "docs/qemu-lab.md)")
    ap.add_argument("--fill-mib", type=int, default=256,
                    help="MiB of random data written to tmpfs and deleted before migrating")
    ap.add_argument("--writer", action="store_true", help="keep writing during the migration")
    ap.add_argument("--max-bandwidth", type=int, default=128, help="MiB/s")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms")
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--stream", metavar="DIR",
                    help="record each migration stream in DIR and trace lost pages in it")
    ap.add_argument("--clear-bitmap-shift", type=int, choices=range(6, 33), metavar="6..32",
                    help="the source's migration.x-clear-bitmap-shift (dirty-log clearing "
                    "chunks of 2^N pages; QEMU's default is 18)")
    ap.add_argument("--during", metavar="CMD",
                    help="a guest shell command started in the background before migrating "
                    "(e.g. a control workload for --hints off)")
    ap.add_argument("--timeline", action="store_true",
                    help="fingerprint the source RAM while migrating and say when each lost "
                    "page last changed (slows the migration down)")
    ap.add_argument("--no-capture", action="store_true",
                    help="hinted runs without the hint poller: it spins on a CPU at real-time "
                    "priority for the whole migration, which the runs without hints do not "
                    "pay; use this to time hinted against off runs (no page is classified)")
    ap.add_argument("--keep-ram", metavar="DIR",
                    help="copy both RAM files into DIR when a run loses a page (for study)")


def run(args: argparse.Namespace) -> int:
    from vmsim import lab_migrate  # noqa: PLC0415 -- numpy and the lab load only to run
    return lab_migrate.run(args)
