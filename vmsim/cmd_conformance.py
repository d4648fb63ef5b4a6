"""``balloon-hint conformance``: run the conformance tests and list every requirement id.

Theory of operation: the tests under ``tests/conformance`` carry the protocol.md requirement id
they check as a marker (``@pytest.mark.spec("D-10")``). This command runs that folder with pytest
- in a subprocess by default (a clean interpreter; this module is loaded there as a pytest plugin
with ``-p vmsim.cmd_conformance`` and writes a JSON report to the file named by
``BALLOON_HINT_CONFORMANCE_REPORT``), or in this process with ``--in-process``. The plugin
records, for each test, its spec ids, the first line of its docstring (or its name) and its
outcome (a failure in setup, call or teardown fails it; a skip makes it "skipped").

Each id of ``REQUIREMENT_IDS`` (V-1..V-10, D-1..D-17, then the driver requirements DR-1..DR-13,
checked against our own guest driver by ``tests/conformance/test_driver_*.py``), then any other id
found on a test, gets one line:

    PASS D-10 <summary of its first test> [(+N more)]
    FAIL D-3 <summary of a failing test>: <first line of the failure>
    NOT COVERED V-1 : <reason>

An id is FAIL if any of its tests failed, PASS if at least one passed and none failed, NOT
COVERED otherwise; the reason comes from ``NOT_COVERED_REASONS`` (ids we deliberately do not
test; with ``--target``, the legacy-interface items), else from the skip reason, else "no
conformance test".
Collection errors (a test module that does not import) are printed and count as failures. The
last line is ``N passed, M failed, K not covered``; the exit status is 0 only with no failure.

``--target vfio-user:SOCKET_PATH`` (or ``vhost-user:SOCKET_PATH``) turns the check around:
instead of our device against drivers, an *external* device (anyone's vfio-user or vhost-user
virtio-balloon back-end) is checked against our driver. The tests under
``tests/conformance_target`` connect to it with ``vmsim.vfio_user_client`` or
``vmsim.vhost_user_client`` (QEMU's role), drive it with the guest model and raw ring writes, and
check the device requirements observable from the driver side. The target reaches them through
the environment (``BALLOON_HINT_TARGET``, and ``BALLOON_HINT_TARGET_CONTROL`` for
``--target-control``, a balloon-hint style host-control socket needed by checks that start hint
rounds, move the balloon target or ask for stats; without it those checks are skipped and their
ids NOT COVERED). The output is the same list, after one line naming the target and one
saying the DR ids are not run (they judge our driver, not the target; ``TARGET_DR_NOTE``), and
without the DR section. Without ``--target`` those tests run against our own server (what CI
does through plain pytest).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HELP = "run the conformance tests and list every requirement id as PASS / FAIL / NOT COVERED"

REPORT_ENV = "BALLOON_HINT_CONFORMANCE_REPORT"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = REPO_ROOT / "tests" / "conformance"
TARGET_TESTS = REPO_ROOT / "tests" / "conformance_target"
#: Environment variables the target tests read (tests/conformance_target/harness.py).
TARGET_ENV = "BALLOON_HINT_TARGET"
TARGET_CONTROL_ENV = "BALLOON_HINT_TARGET_CONTROL"
#: Transports a target may be reached by (vmsim/vfio_user_client.py, vmsim/vhost_user_client.py).
TARGET_KINDS = ("vfio-user", "vhost-user")

#: Driver requirements (protocol.md 4.6), checked against our guest driver (guest_model).
DRIVER_REQUIREMENT_IDS: tuple[str, ...] = tuple(f"DR-{i}" for i in range(1, 14))
REQUIREMENT_IDS: tuple[str, ...] = tuple(
    [f"V-{i}" for i in range(1, 11)] + [f"D-{i}" for i in range(1, 18)]
    + list(DRIVER_REQUIREMENT_IDS))
#: With --target the DR checks are not run (they judge our driver, which is the checker there):
#: the listing leaves the DR section out and says so once.
TARGET_REQUIREMENT_IDS: tuple[str, ...] = tuple(
    i for i in REQUIREMENT_IDS if i not in DRIVER_REQUIREMENT_IDS)
TARGET_DR_NOTE = ("driver requirements DR-1..DR-13: not run with --target (they check our own "
                  "guest driver, not the target; see balloon-hint conformance without --target)")

#: Ids no conformance test covers on purpose, and why. (The legacy-interface ids D-2, D-5, D-7
#: are covered since the device core has a legacy mode: tests/conformance/test_device_legacy.py.)
NOT_COVERED_REASONS: dict[str, str] = {}
#: Legacy-interface ids (protocol.md 4.6): our own device is tested in its legacy mode, but an
#: external target is driven only through the modern interface.
LEGACY_IDS: tuple[str, ...] = ("D-2", "D-5", "D-7")
#: The same ids with --target: the external device may well have a legacy interface, but our
#: clients and driver speak only the modern one, so these cannot be exercised.
TARGET_NOT_COVERED_REASONS: dict[str, str] = {
    rid: "legacy interface only; the target is driven through the modern interface (our "
         "clients and driver speak no legacy virtio), so this cannot be exercised"
    for rid in LEGACY_IDS
}
NO_TEST_REASON = "no conformance test carries this id"


@dataclass
class TestResult:
    nodeid: str
    ids: list[str]
    summary: str
    outcome: str = "not run"  # passed / failed / skipped / not run
    message: str = ""


@dataclass
class Report:
    tests: dict[str, TestResult] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"tests": [asdict(t) for t in self.tests.values()],
                           "collect_errors": self.collect_errors})

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw = json.loads(text)
        r = cls()
        for t in raw["tests"]:
            r.tests[t["nodeid"]] = TestResult(**t)
        r.collect_errors = list(raw["collect_errors"])
        return r


def _first_line(text: str | None) -> str:
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines() if line.strip())


class Collector:
    """The pytest plugin object: records spec ids and outcomes into ``self.report``."""

    def __init__(self) -> None:
        self.report = Report()

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.report.collect_errors.append(
                f"{report.nodeid}: {_first_line(str(report.longrepr).splitlines()[-1])}")

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list[Any]) -> None:
        for item in items:
            ids: list[str] = []
            for m in item.iter_markers("spec"):
                ids.extend(str(a) for a in m.args)
            doc = getattr(getattr(item, "function", None), "__doc__", None)
            summary = _summary(doc) or item.name
            self.report.tests[item.nodeid] = TestResult(item.nodeid, ids, summary)

    def pytest_runtest_logreport(self, report: Any) -> None:
        t = self.report.tests.get(report.nodeid)
        if t is None:
            return
        if report.failed:
            t.outcome = "failed"
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None:  # e.g. "AssertionError: boom", plus where it happened
                t.message = f"{_first_line(crash.message)} ({Path(crash.path).name}:{crash.lineno})"
            else:
                text = getattr(report, "longreprtext", "") or ""
                t.message = _first_line(text.splitlines()[-1] if text else "") or report.when
            if report.when != "call":
                t.message = f"in {report.when}: {t.message}"
        elif report.skipped and t.outcome != "failed":
            t.outcome = "skipped"
            lr = report.longrepr
            msg = str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
            t.message = msg.removeprefix("Skipped: ")
        elif report.when == "call" and report.passed and t.outcome == "not run":
            t.outcome = "passed"


# -- pytest plugin entry points (used when loaded with -p vmsim.cmd_conformance) ------------------
def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "spec(id): the protocol.md requirement id a test checks")
    if os.environ.get(REPORT_ENV) and not config.pluginmanager.has_plugin("bh-conformance"):
        config.pluginmanager.register(Collector(), "bh-conformance")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get(REPORT_ENV)
    plugin = session.config.pluginmanager.get_plugin("bh-conformance")
    if path and plugin is not None:
        Path(path).write_text(plugin.report.to_json())


# -- running ---------------------------------------------------------------------------------------
def parse_target(text: str) -> tuple[str, str]:
    """``KIND:SOCKET_PATH`` -> (kind, path); ``ValueError`` naming what is wrong."""
    kind, sep, path = text.partition(":")
    if not sep or not path:
        raise ValueError(f"--target {text!r}: expected KIND:SOCKET_PATH, e.g. "
                         "vfio-user:/tmp/balloon.sock")
    if kind not in TARGET_KINDS:
        raise ValueError(f"--target {text!r}: transport {kind!r} is not supported (supported: "
                         f"{', '.join(TARGET_KINDS)})")
    return kind, path


def run_subprocess(tests: Path, extra: list[str],
                   env_extra: dict[str, str] | None = None) -> tuple[Report, int, str]:
    with tempfile.TemporaryDirectory(prefix="bh-conformance-") as tmp:
        out = Path(tmp) / "report.json"
        env = dict(os.environ)
        env.update(env_extra or {})
        env[REPORT_ENV] = str(out)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "vmsim.cmd_conformance",
               "-p", "no:cacheprovider", *extra]
        proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True)
        if not out.exists():
            return Report(), proc.returncode, proc.stdout + proc.stderr
        return Report.from_json(out.read_text()), proc.returncode, proc.stdout + proc.stderr


def run_in_process(tests: Path, extra: list[str],
                   env_extra: dict[str, str] | None = None) -> tuple[Report, int, str]:
    import pytest  # noqa: PLC0415 - only this mode needs it in this process

    collector = Collector()
    saved = {k: os.environ.get(k) for k in env_extra or {}}
    os.environ.update(env_extra or {})
    try:
        code = pytest.main([str(tests), "-q", "-p", "no:cacheprovider", *extra],
                           plugins=[collector])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return collector.report, int(code), ""


def judge(report: Report, reasons: dict[str, str] | None = None,
          ids: tuple[str, ...] = REQUIREMENT_IDS) -> list[tuple[str, str, str]]:
    """(verdict, id, text) per id: ``ids`` (default REQUIREMENT_IDS) first, then other ids
    found, sorted. ``reasons``: why ids are deliberately not covered (default
    ``NOT_COVERED_REASONS``)."""
    reasons = NOT_COVERED_REASONS if reasons is None else reasons
    by_id: dict[str, list[TestResult]] = {}
    for t in report.tests.values():
        for i in t.ids:
            by_id.setdefault(i, []).append(t)
    extra = sorted((i for i in by_id if i not in ids), key=_id_key)
    lines = []
    for rid in list(ids) + extra:
        tests = by_id.get(rid, [])
        failed = [t for t in tests if t.outcome == "failed"]
        passed = [t for t in tests if t.outcome == "passed"]
        if failed:
            t = failed[0]
            more = f" (+{len(failed) - 1} more failing)" if len(failed) > 1 else ""
            lines.append(("FAIL", rid, f"{t.summary}: {t.message}{more}"))
        elif passed:
            more = f" (+{len(passed) - 1} more)" if len(passed) > 1 else ""
            lines.append(("PASS", rid, passed[0].summary + more))
        else:
            skipped = [t for t in tests if t.outcome == "skipped"]
            reason = reasons.get(rid)
            if reason is None:
                reason = f"skipped: {skipped[0].message}" if skipped else NO_TEST_REASON
            lines.append(("NOT COVERED", rid, reason))
    return lines


def _id_key(rid: str) -> tuple[str, int]:
    prefix, _, num = rid.partition("-")
    return (prefix, int(num) if num.isdigit() else 0)


def format_lines(lines: list[tuple[str, str, str]], collect_errors: list[str]) -> list[str]:
    out = []
    for verdict, rid, text in lines:
        sep = " : " if verdict == "NOT COVERED" else " "
        out.append(f"{verdict} {rid}{sep}{text}")
    for err in collect_errors:
        out.append(f"ERROR collecting {err}")
    n_pass = sum(1 for v, _, _ in lines if v == "PASS")
    n_fail = sum(1 for v, _, _ in lines if v == "FAIL") + len(collect_errors)
    n_nc = sum(1 for v, _, _ in lines if v == "NOT COVERED")
    out.append(f"{n_pass} passed, {n_fail} failed, {n_nc} not covered")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tests", type=Path, default=None,
                        help="folder of conformance tests (default: tests/conformance of this "
                        "checkout, or tests/conformance_target with --target)")
    parser.add_argument("--target", metavar="KIND:PATH", default=None,
                        help="check an external device against our driver instead, e.g. "
                        "vfio-user:/tmp/balloon.sock (transports: " + ", ".join(TARGET_KINDS)
                        + ")")
    parser.add_argument("--target-control", metavar="PATH", default=None,
                        help="the target's host-control socket (balloon-hint ctl protocol), "
                        "for checks that need host requests (hint rounds, target, stats)")
    parser.add_argument("--in-process", action="store_true",
                        help="run pytest in this process instead of a subprocess")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="only run tests matching this pytest -k expression")
    parser.add_argument("--show-pytest", action="store_true",
                        help="print pytest's own output (subprocess mode)")


def _target_env(args: argparse.Namespace) -> dict[str, str] | None:
    """The environment for the target tests; raises ``ValueError`` for a bad target."""
    if args.target is None:
        if args.target_control is not None:
            raise ValueError("--target-control needs --target")
        return None
    _, path = parse_target(args.target)
    for what, p in (("--target", path), ("--target-control", args.target_control)):
        if p is not None and not Path(p).is_socket():
            raise ValueError(f"{what} {p}: no such socket")
    env = {TARGET_ENV: args.target}
    if args.target_control is not None:
        env[TARGET_CONTROL_ENV] = args.target_control
    return env


def run(args: argparse.Namespace) -> int:
    try:
        env_extra = _target_env(args)
    except ValueError as e:
        print(f"balloon-hint conformance: {e}", file=sys.stderr)
        return 2
    tests: Path = args.tests or (TARGET_TESTS if env_extra else DEFAULT_TESTS)
    if not tests.exists():
        print(f"balloon-hint conformance: --tests {tests}: no such folder", file=sys.stderr)
        return 2
    extra = ["-k", args.keyword] if args.keyword else []
    if env_extra:
        ctl = args.target_control or "none (host-driven checks not covered)"
        print(f"target: {args.target}  control: {ctl}", flush=True)
        print(TARGET_DR_NOTE, flush=True)
    if args.in_process:
        report, code, output = run_in_process(tests, extra, env_extra)
    else:
        report, code, output = run_subprocess(tests, extra, env_extra)
    if args.show_pytest and output:
        print(output)
    if not report.tests and not report.collect_errors and code not in (0, 5):
        print(f"balloon-hint conformance: pytest exited with {code} and reported no tests",
              file=sys.stderr)
        if output and not args.show_pytest:
            print(output[-4000:], file=sys.stderr)
        return 2
    lines = (judge(report, TARGET_NOT_COVERED_REASONS, TARGET_REQUIREMENT_IDS) if env_extra
             else judge(report))
    for line in format_lines(lines, report.collect_errors):
        print(line)
    failed = any(v == "FAIL" for v, _, _ in lines) or bool(report.collect_errors)
    return 1 if failed else 0
