"""The ``balloon-hint`` command line: one subcommand per module ``vmsim.cmd_<name>``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported when the parser is built; a command whose module is absent is not listed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from protocol.errors import EnvironmentFailure, UsageError

# Subcommand name -> module. Order is the order shown in --help.
COMMANDS = {
    "migrate": "vmsim.cmd_migrate",
    "scenarios": "vmsim.cmd_scenarios",
    "fidelity": "vmsim.cmd_fidelity",
    "sweep": "vmsim.cmd_sweep",
    "sweep-report": "vmsim.cmd_sweep_report",
    "conformance": "vmsim.cmd_conformance",
    "serve": "vmsim.cmd_serve",
    "ctl": "vmsim.cmd_ctl",
    "migrate-check": "vmsim.cmd_migrate_check",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balloon-hint",
        description="virtio-balloon free page hinting: simulated migrations, conformance tests, "
        "and a device served to QEMU over vfio-user or vhost-user.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except UsageError as e:
        print(f"balloon-hint {args.command}: {e}", file=sys.stderr)
        return 2
    except EnvironmentFailure as e:
        print(f"balloon-hint {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
