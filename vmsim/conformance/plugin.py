"""pytest plugin ``balloon_hint`` (entry point ``pytest11``): check any virtio-balloon device.

Usage, from any folder once balloon-hint is installed::

    pytest --balloon-target vfio-user:/tmp/balloon.sock [--balloon-control /tmp/balloon.ctl]
           [--balloon-id D-10,D-12] [-k EXPR] [--junitxml R.xml] [--balloon-json R.json]

Theory of operation: pytest loads this module in every session of an environment where
balloon-hint is installed, so importing it costs nothing beyond the standard library and the id
table. It adds the options above and the ``spec`` marker, and for a test carrying requirement ids
(``@pytest.mark.spec("D-10")``, docs/requirements.md) it makes each id a ``-k`` keyword, a
``requirement`` property in JUnit XML and a tag after the verbose status word.

With ``--balloon-target`` (and no test paths given) the session collects the device checks
shipped in ``vmsim/conformance/checks``; their ``target`` fixture connects to the given socket
(without the option, e.g. in the repository's own test run, it starts ``balloon-hint serve``).
``--balloon-control`` names the device's host-control socket (``balloon-hint ctl`` protocol);
checks that need host requests are skipped without it. Whenever one of the ``--balloon-*``
options is given, a ``Collector`` records every test's ids and outcome; at the end the session
prints one verdict per requirement id (vmsim/conformance/report.py) and writes them as JSON to
``--balloon-json``. A ``--balloon-id`` or ``-k`` selection that leaves no test carrying an id is
a usage error, not an empty success.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import UsageError
from vmsim.conformance.report import (
    DR_NOTE,
    NOTE_PROPERTY,
    Report,
    TestResult,
    format_lines,
    judge,
)
from vmsim.conformance.requirements import DOCS, REQUIREMENTS

#: The device checks shipped with the package.
CHECKS_DIR = Path(__file__).resolve().parent / "checks"
#: Transports a target may be reached by (vmsim/vfio_user_client.py, vmsim/vhost_user_client.py),
#: and ``qemu``: QEMU's own virtio-balloon-pci, started by the checks under qtest (vmsim/qtest).
TARGET_KINDS = ("vfio-user", "vhost-user", "qemu")
#: The QEMU target names a binary, not a socket; ``qemu`` alone means the lab's QEMU.
QEMU_KIND = "qemu"
#: The control column of a qemu target.
QEMU_CONTROL = "QEMU's own (QMP, migration)"
#: What an id looks like (V-3, DR-12; a ``spec`` marker argument that does not is not ours).
ID_RE = re.compile(r"^[A-Z]{1,4}-\d+$")
MARKER_HELP = f"spec(*ids): the requirement ids (V-n, D-n, DR-n; see {DOCS}) a test checks"


class TargetError(UsageError, ValueError):
    """A ``--target`` / ``--balloon-target`` value that cannot name a device."""


def parse_target(text: str) -> tuple[str, str]:
    """``KIND:SOCKET_PATH`` -> (kind, path), or ``qemu[:QEMU_BINARY]`` -> ("qemu", path or "");
    ``TargetError`` naming what is wrong."""
    kind, sep, path = text.partition(":")
    if kind == QEMU_KIND and (not sep or path):
        return kind, path
    if not sep or not path:
        raise TargetError(f"{text!r}: expected KIND:SOCKET_PATH, e.g. vfio-user:/tmp/balloon.sock")
    if kind not in TARGET_KINDS:
        raise TargetError(f"{text!r}: transport {kind!r} is not supported (supported: "
                          f"{', '.join(TARGET_KINDS)})")
    return kind, path


def parse_ids(values: list[str]) -> list[str]:
    """``--balloon-id`` values (comma-separated, repeatable) -> known ids; ``TargetError``
    naming an unknown one."""
    ids = [i.strip() for v in values for i in v.split(",") if i.strip()]
    unknown = [i for i in ids if i not in REQUIREMENTS]
    if unknown:
        raise TargetError(f"unknown requirement id(s) {', '.join(unknown)} (ids: V-1..V-10, "
                          f"D-1..D-17, DR-1..DR-13; see {DOCS})")
    return ids


def configured_target(config: Any) -> tuple[str, str, str | None] | None:
    """(kind, socket path, control path or None) from ``--balloon-target``, or None."""
    text = config.getoption("balloon_target", None)
    if not text:
        return None
    kind, path = parse_target(text)
    return kind, path, config.getoption("balloon_control", None)


def item_ids(item: Any) -> list[str]:
    ids: list[str] = []
    for m in item.iter_markers("spec"):
        ids.extend(str(a) for a in m.args if ID_RE.match(str(a)))
    return ids


def _first_line(text: str | None) -> str:
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _summary(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    para = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines() if line.strip())


# -- options, marker, ids on every test -------------------------------------------------------
def pytest_addoption(parser: Any) -> None:
    g = parser.getgroup("balloon-hint", f"virtio-balloon conformance (ids: {DOCS})")
    g.addoption("--balloon-target", metavar="KIND:PATH", default=None,
                help="check this virtio-balloon device: vfio-user:SOCKET, vhost-user:SOCKET, or "
                "qemu[:QEMU_BINARY] for QEMU's own under qtest (runs the checks shipped in "
                "vmsim/conformance/checks)")
    g.addoption("--balloon-control", metavar="PATH", default=None,
                help="the device's host-control socket (balloon-hint ctl protocol), for the "
                "checks that need host requests (hint rounds, balloon target, stats)")
    g.addoption("--balloon-id", metavar="ID[,ID]", action="append", default=[],
                help="run only the checks of these requirement ids (exact match; -k D-1 would "
                "also match D-10..D-17)")
    g.addoption("--balloon-json", metavar="PATH", default=None,
                help="write every test's outcome and one verdict per requirement id as JSON")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        target = configured_target(config)
        ids = parse_ids(config.getoption("balloon_id", []))
    except TargetError as e:
        raise pytest.UsageError(f"balloon-hint: {e}") from None
    control = config.getoption("balloon_control", None)
    if control and target is None:
        raise pytest.UsageError("balloon-hint: --balloon-control needs --balloon-target")
    if target is not None and target[0] == QEMU_KIND:
        if control:
            raise pytest.UsageError(f"balloon-hint: --balloon-control: the qemu target's host "
                                    f"side is {QEMU_CONTROL}; no control socket is used")
        from vmsim.qtest.qemu import QtestUnavailable, find_qemu  # noqa: PLC0415

        try:
            find_qemu(target[1] or None)
        except QtestUnavailable as e:
            raise pytest.UsageError(f"balloon-hint: --balloon-target {target[0]}: {e}") \
                from None
    elif target is not None:
        for what, p in (("--balloon-target", target[1]), ("--balloon-control", control)):
            if p is not None and not Path(p).is_socket():
                raise pytest.UsageError(f"balloon-hint: {what} {p}: no such socket")
        if config.args_source != config.ArgsSource.ARGS:
            # No test paths given: the device checks are what a target is for.
            config.args = [str(CHECKS_DIR)]
    if target is not None or ids or config.getoption("balloon_json", None):
        config.pluginmanager.register(Collector(config, ids), "balloon-hint-collector")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        for rid in item_ids(item):
            item.extra_keyword_matches.add(rid)
            item.user_properties.append(("requirement", rid))


def pytest_report_teststatus(report: Any) -> tuple[str, str, str] | None:
    """``PASSED [D-10]`` in verbose output; other phases and outcomes keep pytest's words."""
    ids = [v for k, v in getattr(report, "user_properties", ()) if k == "requirement"]
    if not ids or hasattr(report, "wasxfail"):
        return None
    tag = f" [{', '.join(ids)}]"
    if report.skipped:  # in set-up (a fixture skipped) or in the call
        return "skipped", "s", "SKIPPED" + tag
    if report.when != "call":  # set-up/tear-down errors keep pytest's ERROR
        return None
    if report.passed:
        return "passed", ".", "PASSED" + tag
    if report.failed:
        return "failed", "F", "FAILED" + tag
    return None


# -- the collector: outcomes, verdicts, the checklist, the JSON --------------------------------
class Collector:
    """Registered when a ``--balloon-*`` option is given; fills ``self.report``."""

    def __init__(self, config: Any, ids: list[str]) -> None:
        self.config = config
        self.ids = ids
        target = configured_target(config)
        control = target[2] if target else None
        if target is not None and target[0] == QEMU_KIND:
            control = QEMU_CONTROL
        self.report = Report(target=config.getoption("balloon_target", None), control=control)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            lines = str(report.longrepr).splitlines()
            self.report.collect_errors.append(
                f"{report.nodeid}: {_first_line(lines[-1] if lines else '')}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        # First of all hooks: every collected test is recorded before -k deselects any.
        keep: list[Any] = []
        drop: list[Any] = []
        for item in items:
            ids = item_ids(item)
            doc = getattr(getattr(item, "function", None), "__doc__", None)
            self.report.tests[item.nodeid] = TestResult(item.nodeid, ids,
                                                        _summary(doc) or item.name)
            (keep if not self.ids or set(ids) & set(self.ids) else drop).append(item)
        self.report.device_checks = bool(items) and all(
            CHECKS_DIR in Path(str(item.path)).parents for item in items if item_ids(item))
        if drop:
            items[:] = keep
            config.hook.pytest_deselected(items=drop)

    def pytest_deselected(self, items: list[Any]) -> None:
        for item in items:
            t = self.report.tests.get(item.nodeid)
            if t is not None:
                t.outcome = "not selected"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: Any) -> None:
        selecting = self.ids or self.config.getoption("keyword", "")
        if selecting and self.report.tests and not self.report.selected_ids():
            what = (f"--balloon-id {','.join(self.ids)}" if self.ids
                    else f"-k {self.config.getoption('keyword')!r}")
            raise pytest.UsageError(
                f"balloon-hint: {what} selects no check carrying a requirement id (-k "
                f"matches test names and ids, --balloon-id ids exactly; ids: {DOCS})")

    def pytest_runtest_logreport(self, report: Any) -> None:
        t = self.report.tests.get(report.nodeid)
        if t is None:
            return
        for name, value in getattr(report, "user_properties", ()):
            if name == NOTE_PROPERTY and str(value) not in t.notes:
                t.notes.append(str(value))
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

    def pytest_sessionfinish(self, session: Any) -> None:
        path = self.config.getoption("balloon_json", None)
        if path:
            Path(path).write_text(self.report.to_json() + "\n")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        tr.section(f"balloon-hint requirement ids ({DOCS})")
        if self.report.target:
            tr.line(f"target: {self.report.target}  control: "
                    f"{self.report.control or 'none (host-driven checks not covered)'}")
        if self.report.device_checks:
            tr.line(DR_NOTE)
        for line in format_lines(judge(self.report), self.report.collect_errors):
            tr.line(line)
