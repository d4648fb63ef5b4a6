"""``balloon-hint conformance``: run conformance checks and list every requirement id.

Theory of operation: conformance checks are pytest tests carrying the requirement ids they check
(``@pytest.mark.spec("D-10")``; docs/requirements.md). This command runs pytest with the
``balloon_hint`` plugin (vmsim/conformance/plugin.py, the same one ``pytest --balloon-target``
uses) in a subprocess by default (a clean interpreter) or in this process with
``--in-process``; the plugin writes every test's outcome to a JSON report (``--balloon-json``),
which this command reads and prints as one line per id:

    PASS D-10 <summary of its first test> [(+N more)]
    FAIL D-3 <summary of a failing test>: <first line of the failure>
    NOT COVERED V-1 : <reason>
    NOT SELECTED D-12 : its checks were left out by the selection

then ``N passed, M failed, K not covered[, S not selected]``. Exit 0 with no failure, 1 with one,
2 for a usage error (a bad target, an unknown ``--id``, a ``-k`` that selects no check carrying an
id), and 1 with advice when pytest is not installed.

What is run:

* ``--target vfio-user:SOCKET`` (or ``vhost-user:SOCKET``) ``[--target-control CTL]``: an
  external device, checked from the driver side by the checks shipped in the package
  (vmsim/conformance/checks: our QEMU-role clients, our guest driver, hand-written rings). The
  DR ids judge our own driver and are not listed; the legacy-only D-2, D-5, D-7 are NOT COVERED.
* ``--target qemu[:QEMU_BINARY]``: QEMU's own virtio-balloon-pci, one QEMU per check under
  qtest (vmsim/qtest), its host side QEMU's (QMP, migration); a QEMU that cannot run qtest is
  an environment failure naming the missing piece. Verdicts: docs/qemu-deviations.md.
* no ``--target``, in a source checkout: ``tests/conformance`` (our device core against raw
  rings and our driver; every V, D and DR id).
* no ``--target``, installed without the repository: the shipped checks against our own device
  (``balloon-hint serve`` in a subprocess).
* ``--tests FOLDER``: any folder of tests carrying ids.

``--junitxml PATH`` passes through to pytest (each test with a ``requirement`` property);
``--json PATH`` (``-`` for standard output) writes the plugin's report (docs/json.md).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import subprocess
import sys
import tempfile
from pathlib import Path

from protocol.errors import EnvironmentFailure, UsageError
from vmsim.conformance.report import DR_NOTE, Report, format_lines, judge
from vmsim.conformance.requirements import DOCS

HELP = "run the conformance checks and list every requirement id as PASS / FAIL / NOT COVERED"

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A source checkout (not an installed package, whose parent folder is site-packages).
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
#: Our device core's checks (a source checkout only).
REPO_TESTS = REPO_ROOT / "tests" / "conformance"
#: The device checks shipped with the package.
CHECKS_DIR = Path(__file__).resolve().parent / "conformance" / "checks"
PLUGIN_ENTRY_POINT = "balloon_hint"
PLUGIN_MODULE = "vmsim.conformance.plugin"
NO_PYTEST = ("needs pytest, which is not installed: pip install 'balloon-hint[conformance]' "
             "(or pip install pytest)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="KIND:PATH", default=None,
                        help="check an external device: vfio-user:SOCKET or vhost-user:SOCKET; "
                        "qemu[:QEMU_BINARY] checks QEMU's own virtio-balloon under qtest (no "
                        "guest boots; default: the lab's QEMU)")
    parser.add_argument("--target-control", metavar="PATH", default=None,
                        help="the target's host-control socket (balloon-hint ctl protocol), "
                        "for checks that need host requests (hint rounds, target, stats)")
    parser.add_argument("--id", dest="ids", metavar="ID[,ID]", action="append", default=[],
                        help=f"run only the checks of these requirement ids (exact; {DOCS})")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="only run checks matching this pytest -k expression (test names "
                        "and ids; -k D-1 also matches D-10..D-17)")
    parser.add_argument("--junitxml", metavar="PATH", default=None,
                        help="also write a JUnit XML report (pytest's)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the JSON report (docs/json.md; - for standard output)")
    parser.add_argument("--tests", type=Path, default=None,
                        help="a folder of conformance tests (default: see the description)")
    parser.add_argument("--in-process", action="store_true",
                        help="run pytest in this process instead of a subprocess")
    parser.add_argument("--show-pytest", action="store_true", help="print pytest's own output")


def plugin_spec() -> str:
    """The ``-p`` argument loading the plugin: its entry point name when installed (so that an
    auto-loaded copy is not registered twice), else the module."""
    from importlib.metadata import entry_points  # slow to import: not for --help

    if entry_points(group="pytest11", name=PLUGIN_ENTRY_POINT):
        return PLUGIN_ENTRY_POINT
    return PLUGIN_MODULE


def choose_tests(args: argparse.Namespace) -> Path:
    if args.tests is not None:
        if not args.tests.is_dir():
            raise UsageError(f"--tests {args.tests}: no such folder")
        return Path(args.tests)
    if args.target is None and IN_CHECKOUT and REPO_TESTS.is_dir():
        return REPO_TESTS
    return CHECKS_DIR


def pytest_args(args: argparse.Namespace, tests: Path, report: Path) -> list[str]:
    out = [str(tests), "-q", "-p", plugin_spec(), "-p", "no:cacheprovider",
           "--balloon-json", str(report)]
    if args.target is not None:
        out += ["--balloon-target", args.target]
    if args.target_control is not None:
        out += ["--balloon-control", args.target_control]
    for ids in args.ids:
        out += ["--balloon-id", ids]
    if args.keyword:
        out += ["-k", args.keyword]
    if args.junitxml:
        out += ["--junitxml", str(Path(args.junitxml).resolve())]
    return out


def run_pytest(argv: list[str], in_process: bool) -> tuple[int, str]:
    """pytest's exit status and output (its stdout and stderr)."""
    if in_process:
        import pytest  # noqa: PLC0415 - only this mode needs it in this process

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = pytest.main(argv)
        return int(code), out.getvalue()
    cwd = REPO_ROOT if IN_CHECKOUT else None
    proc = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=cwd,
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _check_usage(args: argparse.Namespace) -> None:
    from vmsim.conformance.plugin import (  # noqa: PLC0415
        QEMU_CONTROL,
        QEMU_KIND,
        TargetError,
        parse_ids,
        parse_target,
    )

    try:
        parse_ids(args.ids)
    except TargetError as e:
        raise UsageError(f"--id: {e}") from None
    if args.target is None:
        if args.target_control is not None:
            raise UsageError("--target-control needs --target")
        return
    try:
        kind, path = parse_target(args.target)
    except TargetError as e:
        raise UsageError(f"--target {e}") from None
    if kind == QEMU_KIND:
        if args.target_control is not None:
            raise UsageError(f"--target-control: the qemu target's host side is {QEMU_CONTROL}; "
                             "no control socket is used")
        # Fail here, naming the missing piece (QtestUnavailable: exit 1), not in every check.
        from vmsim.qtest.qemu import find_qemu  # noqa: PLC0415

        find_qemu(path or None)
        return
    for what, p in (("--target", path), ("--target-control", args.target_control)):
        if p is not None and not Path(p).is_socket():
            raise UsageError(f"{what} {p}: no such socket")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytest") is None:
        raise EnvironmentFailure(NO_PYTEST)
    _check_usage(args)
    tests = choose_tests(args)
    if args.target is not None:
        ctl = args.target_control or "none (host-driven checks not covered)"
        if args.target.partition(":")[0] == "qemu":
            ctl = "QEMU's own (QMP, migration)"
        print(f"target: {args.target}  control: {ctl}", flush=True)
    elif tests == CHECKS_DIR and args.tests is None:
        print("target: our own device (balloon-hint serve; the device core and driver checks "
              "are in the source repository's tests/conformance)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bh-conformance-") as tmp:
        report_path = Path(tmp) / "report.json"
        code, output = run_pytest(pytest_args(args, tests, report_path), args.in_process)
        raw = report_path.read_text() if report_path.exists() else None
    if args.show_pytest and output:
        print(output)
    if code == 4:  # pytest's usage error: ours (a selection matching no id) or pytest's own
        msg = [x for x in output.splitlines() if x.startswith("ERROR: ")]
        raise UsageError(msg[-1].removeprefix("ERROR: ").removeprefix("balloon-hint: ")
                         if msg else f"pytest refused the arguments:\n{output[-2000:]}")
    if raw is None:
        raise EnvironmentFailure(f"pytest exited with {code} and wrote no report:\n"
                                 f"{output[-4000:]}")
    report = Report.from_json(raw)
    if not report.tests and not report.collect_errors:
        raise UsageError(f"{tests}: no tests found")
    verdicts = judge(report)
    if report.device_checks:
        print(DR_NOTE, flush=True)
    for line in format_lines(verdicts, report.collect_errors):
        print(line)
    if args.json == "-":
        sys.stdout.write(raw)
    elif args.json:
        Path(args.json).write_text(raw)
    failed = any(v.verdict == "FAIL" for v in verdicts) or bool(report.collect_errors)
    return 1 if failed else 0

