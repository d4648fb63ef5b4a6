"""Conformance results: per-test outcomes, one verdict per requirement id, the JSON report.

Theory of operation: the pytest plugin (``vmsim.conformance.plugin``) records for every collected
test its requirement ids (``@pytest.mark.spec``), a one-line summary and its outcome, as a
``Report``. ``judge`` turns that into one ``Verdict`` per id:

* FAIL: one of its tests failed (in set-up, call or tear-down);
* PASS: at least one passed and none failed (the line adds the passing checks' notes in
  brackets, and "(N more not covered: reason)" when some of its checks were skipped);
* NOT SELECTED: every test of the id was left out by ``-k`` / ``--balloon-id``;
* NOT COVERED: otherwise (skipped, deliberately not checkable, or no test carries the id), with
  the reason.

``Report.to_json`` is the ``--json`` / ``--balloon-json`` file (docs/json.md). Nothing here
imports pytest: ``balloon-hint conformance`` reads a report written by another process.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vmsim.conformance.requirements import (
    DOCS,
    REQUIREMENT_IDS,
    REQUIREMENTS,
    TARGET_REQUIREMENT_IDS,
    id_key,
)

#: Version of the JSON layout below (docs/json.md); bumped when a field changes meaning.
SCHEMA_VERSION = 1

PASS, FAIL, NOT_COVERED, NOT_SELECTED = "PASS", "FAIL", "NOT COVERED", "NOT SELECTED"
NO_TEST_REASON = "no conformance test carries this id"
#: Legacy-interface ids: the device checks (vmsim/conformance/checks) drive a device only
#: through the modern interface, so these cannot be exercised there.
LEGACY_IDS = ("D-2", "D-5", "D-7")
CHECKS_NOT_COVERED_REASONS: dict[str, str] = {
    rid: "legacy interface only; the target is driven through the modern interface (our "
         "clients and driver speak no legacy virtio), so this cannot be exercised"
    for rid in LEGACY_IDS
}
DR_NOTE = ("driver requirements DR-1..DR-13: not run against a device (they check our own "
           "guest driver; see the repository's tests/conformance)")


#: The ``user_properties`` name a check records a note under (``TestResult.notes``).
NOTE_PROPERTY = "conformance-note"


@dataclass
class TestResult:
    nodeid: str
    ids: list[str]
    summary: str
    #: passed / failed / skipped / not run / not selected
    outcome: str = "not run"
    message: str = ""
    #: What a passing check wants said with its verdict, e.g. that the target showed a
    #: documented behaviour where the spec leaves a choice (``NOTE_PROPERTY``).
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    rid: str
    text: str

    def line(self) -> str:
        sep = " : " if self.verdict in (NOT_COVERED, NOT_SELECTED) else " "
        return f"{self.verdict} {self.rid}{sep}{self.text}"


@dataclass
class Report:
    tests: dict[str, TestResult] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)
    #: "vfio-user:PATH" / "vhost-user:PATH" of an external device, None for our own.
    target: str | None = None
    control: str | None = None
    #: True when the tests run are the device checks (no DR ids expected).
    device_checks: bool = False

    def universe(self) -> tuple[str, ...]:
        return TARGET_REQUIREMENT_IDS if self.device_checks else REQUIREMENT_IDS

    def reasons(self) -> dict[str, str]:
        return CHECKS_NOT_COVERED_REASONS if self.device_checks else {}

    def selected_ids(self) -> set[str]:
        """Ids carried by at least one test that was selected to run."""
        return {i for t in self.tests.values() if t.outcome != "not selected" for i in t.ids}

    def to_json(self) -> str:
        verdicts = judge(self)
        counts = count(verdicts, self.collect_errors)
        return json.dumps({
            "schema_version": SCHEMA_VERSION,
            "kind": "conformance",
            "requirements": DOCS,
            "target": self.target,
            "control": self.control,
            "device_checks": self.device_checks,
            "verdicts": [{"id": v.rid, "verdict": v.verdict, "text": v.text,
                          "rule": REQUIREMENTS[v.rid].rule if v.rid in REQUIREMENTS else None}
                         for v in verdicts],
            "summary": counts,
            "tests": [asdict(t) for t in self.tests.values()],
            "collect_errors": self.collect_errors,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw: dict[str, Any] = json.loads(text)
        r = cls(target=raw.get("target"), control=raw.get("control"),
                device_checks=bool(raw.get("device_checks")))
        for t in raw["tests"]:
            r.tests[t["nodeid"]] = TestResult(**t)
        r.collect_errors = list(raw["collect_errors"])
        return r


def judge(report: Report, ids: tuple[str, ...] | None = None,
          reasons: dict[str, str] | None = None) -> list[Verdict]:
    """One verdict per id: ``ids`` (default: the report's universe) first, then any other id a
    test carries, in id order."""
    ids = report.universe() if ids is None else ids
    reasons = report.reasons() if reasons is None else reasons
    by_id: dict[str, list[TestResult]] = {}
    for t in report.tests.values():
        for i in t.ids:
            by_id.setdefault(i, []).append(t)
    extra = sorted((i for i in by_id if i not in ids), key=id_key)
    out = []
    for rid in list(ids) + extra:
        tests = by_id.get(rid, [])
        failed = [t for t in tests if t.outcome == "failed"]
        passed = [t for t in tests if t.outcome == "passed"]
        skipped = [t for t in tests if t.outcome == "skipped"]
        if failed:
            t = failed[0]
            more = f" (+{len(failed) - 1} more failing)" if len(failed) > 1 else ""
            out.append(Verdict(FAIL, rid, f"{t.summary}: {t.message}{more}"))
        elif passed:
            more = f" (+{len(passed) - 1} more)" if len(passed) > 1 else ""
            notes = [n for t in passed for n in t.notes]
            if notes:
                more += " [" + "; ".join(dict.fromkeys(notes)) + "]"
            if skipped:
                more += f" ({len(skipped)} more not covered: {skipped[0].message})"
            out.append(Verdict(PASS, rid, passed[0].summary + more))
        elif tests and all(t.outcome == "not selected" for t in tests):
            out.append(Verdict(NOT_SELECTED, rid, "its checks were left out by the selection"))
        else:
            reason = reasons.get(rid)
            if reason is None:
                reason = f"skipped: {skipped[0].message}" if skipped else NO_TEST_REASON
            out.append(Verdict(NOT_COVERED, rid, reason))
    return out


def count(verdicts: list[Verdict], collect_errors: list[str]) -> dict[str, int]:
    return {
        "passed": sum(v.verdict == PASS for v in verdicts),
        "failed": sum(v.verdict == FAIL for v in verdicts) + len(collect_errors),
        "not_covered": sum(v.verdict == NOT_COVERED for v in verdicts),
        "not_selected": sum(v.verdict == NOT_SELECTED for v in verdicts),
    }


def format_lines(verdicts: list[Verdict], collect_errors: list[str]) -> list[str]:
    """The checklist: one line per verdict, collection errors, then the totals."""
    out = [v.line() for v in verdicts]
    out += [f"ERROR collecting {err}" for err in collect_errors]
    c = count(verdicts, collect_errors)
    last = f"{c['passed']} passed, {c['failed']} failed, {c['not_covered']} not covered"
    if c["not_selected"]:
        last += f", {c['not_selected']} not selected"
    out.append(last)
    return out
