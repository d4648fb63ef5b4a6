"""The ``balloon-hint`` command line: one subcommand per module ``vmsim.cmd_<name>``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

Theory of operation: starting the command must cost little, so nothing is imported before it is
needed. ``COMMANDS`` names each command's module and repeats its one-line ``HELP`` (a test keeps
the two equal), which is all ``balloon-hint --help`` shows; only the module of the command being
run is imported (``balloon-hint migrate`` never loads the transports, ``--help`` loads no
command at all). A command module that fails to import is not hidden: running it reports the
missing package (a dependency that is not installed is an environment failure, exit 1) or raises
(a bug in balloon-hint).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from protocol.errors import EnvironmentFailure, UsageError

#: Subcommand name -> (module, its one-line HELP). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "migrate": ("vmsim.cmd_migrate", "simulate a pre-copy live migration with free page "
                "hinting and verify the destination"),
    "scenarios": ("vmsim.cmd_scenarios", "list the built-in migration scenarios (or print one "
                  "with --show NAME)"),
    "fidelity": ("vmsim.cmd_fidelity", "compare simulated migration times and hint savings with "
                 "the published figures"),
    "sweep": ("vmsim.cmd_sweep", "run a sweep of migration scenarios on Dask (this machine or a "
              "cluster); Parquet results"),
    "sweep-report": ("vmsim.cmd_sweep_report", "summarise a sweep's results: savings, time and "
                     "downtime per axis value, plots"),
    "compare": ("vmsim.cmd_compare", "compare two runs' JSON documents (migrate or conformance "
                "--json) side by side"),
    "conformance": ("vmsim.cmd_conformance", "run the conformance checks and list every "
                    "requirement id as PASS / FAIL / NOT COVERED"),
    "serve": ("vmsim.cmd_serve", "serve the balloon device to QEMU over vfio-user or vhost-user "
              "(prints the QEMU options to use)"),
    "ctl": ("vmsim.cmd_ctl", "send a host-control command (hint-start, hint-stop, hint-done, "
            "set-target, stats)"),
    "completion": ("vmsim.cmd_completion", "print a shell completion script (bash): eval "
                   "\"$(balloon-hint completion bash)\""),
    "migrate-check": ("vmsim.cmd_migrate_check", "real guest, QEMU's own free page hints: "
                      "migrate, diff the RAM files page by page, check the guest (needs the QEMU "
                      "lab)"),
}
#: Our own top-level packages: an import error inside them is a bug, not a missing dependency.
OUR_PACKAGES = ("protocol", "guestmem", "balloon_dev", "guest_model", "vmsim")


def version() -> str:
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415
    from importlib.metadata import version as dist_version  # noqa: PLC0415

    try:
        return dist_version("balloon-hint")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked for
    (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"balloon-hint {version()}")
        parser.exit()


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` asks for (the first word that is not a global option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def load_command(name: str) -> Any:
    """Import the module of command ``name``. A missing third-party package is an
    EnvironmentFailure naming it; anything else propagates."""
    modname = COMMANDS[name][0]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or missing in OUR_PACKAGES:
            raise
        raise EnvironmentFailure(f"needs the Python package {missing!r}, which is not installed "
                                 f"(pip install {missing}; {modname} could not be imported)"
                                 ) from None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser: every command listed with its help, and the arguments of the command
    ``argv`` asks for (its module imported); no command module otherwise."""
    parser = argparse.ArgumentParser(
        prog="balloon-hint",
        description="virtio-balloon free page hinting: simulated migrations, conformance tests, "
        "and a device served to QEMU over vfio-user or vhost-user.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = chosen_command(argv or [])
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            mod = load_command(name)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)
    except EnvironmentFailure as e:
        print(f"balloon-hint {chosen_command(argv)}: {e}", file=sys.stderr)
        return 1
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
