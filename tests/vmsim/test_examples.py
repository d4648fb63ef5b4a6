"""examples/ (annotated scenario files) run as their comments say, and docs/scenarios.md
documents every key the loader accepts."""
from __future__ import annotations

from pathlib import Path

import pytest

from vmsim import scenario
from vmsim.scenario import load
from vmsim.vm import run_scenario

REPO = Path(__file__).resolve().parents[2]
#: The annotated scenario examples (examples/ also holds sweep specs and their base scenario).
EXAMPLES = [REPO / "examples" / f"{n}.toml"
            for n in ("idle-web-server", "batch-job-freed", "poisoned-database")]


def test_there_are_annotated_examples():
    for p in EXAMPLES:
        text = p.read_text()
        comments = [ln for ln in text.splitlines() if "#" in ln]
        assert len(comments) >= 8, f"{p.name} is not annotated"
        assert f"balloon-hint migrate examples/{p.name}" in text  # how to run it


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_verifies_in_its_own_mode(path):
    scn = load(path)
    assert scn.name == path.stem and scn.description
    r = run_scenario(scn, scn.hinting.mode)
    assert r.verified and r.converged
    if scn.hinting.mode != "off":
        assert r.pages_skipped_hint > 0


def test_batch_job_hints_skip_most_of_the_freed_job():
    """batch-job-freed.toml's claim: with hints the host skips the job's freed memory"""
    scn = load(REPO / "examples" / "batch-job-freed.toml")
    off, cap = run_scenario(scn, "off"), run_scenario(scn, "capture")
    job_pages = 3 << 30 >> 12
    assert cap.pages_skipped_hint > 0.9 * job_pages
    assert cap.bytes_sent < off.bytes_sent / 3


def test_poisoned_database_walk_loses_poison_on_hinted_pages_only():
    """poisoned-database.toml's claim: the walk's violations are all on pages it hinted;
    capture verifies"""
    scn = load(REPO / "examples" / "poisoned-database.toml")
    walk = run_scenario(scn, "walk")
    assert not walk.verified and walk.mismatched_pages == 0
    assert walk.poison_violations == walk.poison_violations_from_hints > 0


def test_scenario_doc_names_every_key():
    doc = (REPO / "docs" / "scenarios.md").read_text()
    keys = set(scenario._TOP) | set(scenario._GUEST) | set(scenario._MIGRATION) \
        | set(scenario._HINTING) | set(scenario._PUBLISHED) | set(scenario._WORKLOAD_COMMON)
    for kind, schema in scenario.WORKLOAD_KINDS.items():
        keys |= {kind, *schema}
    assert sorted(k for k in keys if f"`{k}`" not in doc) == []
