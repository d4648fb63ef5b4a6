"""docs/requirements.md and the id table (vmsim/conformance/requirements.py) agree, and every id
a test carries is in the table with a citation."""
from __future__ import annotations

import re
from pathlib import Path

from vmsim.conformance.requirements import REQUIREMENT_IDS, REQUIREMENTS, markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"""mark\.spec\(([^)]*)\)""")
#: Writes made-up suites (with a made-up id X-1) to test the command itself.
FAKE_SUITES = "test_cmd_conformance.py"


def test_docs_are_the_generated_table():
    """regenerate with: python -m vmsim.conformance.requirements > docs/requirements.md"""
    assert (REPO_ROOT / "docs" / "requirements.md").read_text() == markdown()


def test_every_id_has_a_rule_and_a_citation():
    assert len(REQUIREMENT_IDS) == 10 + 17 + 13
    for r in REQUIREMENTS.values():
        assert r.rule.endswith(".") and len(r.rule) < 240, r
        assert r.sources and all(s.startswith(("VIRTIO 1.3 ", "QEMU ", "Linux "))
                                 for s in r.sources), r
    # only V-7 rests on QEMU alone (the spec allows zero-length buffers)
    assert [r.rid for r in REQUIREMENTS.values()
            if not any(s.startswith("VIRTIO 1.3") for s in r.sources)] == ["V-7"]


def test_every_marker_id_is_documented():
    used: set[str] = set()
    for folder in ("tests", "vmsim"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            if path.name == FAKE_SUITES:
                continue
            for args in MARKER.findall(path.read_text()):
                used.update(re.findall(r'"([A-Z]+-\d+)"', args))
    assert used, "no spec markers found"
    assert sorted(used - set(REQUIREMENTS)) == []
