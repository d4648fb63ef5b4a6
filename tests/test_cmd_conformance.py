"""``balloon-hint conformance`` (vmsim/cmd_conformance.py): verdict per id, format, exit status.

Most tests run the command on a small folder of made-up conformance tests written here, so the
expected verdicts are known; one runs it on the real tests/conformance."""
from __future__ import annotations

import textwrap
from pathlib import Path

from vmsim import cmd_conformance as cc
from vmsim.cli import main

FAKE = '''
import pytest

@pytest.mark.spec("D-10")
def test_ok():
    """ignores stale ids"""

@pytest.mark.spec("D-10")
def test_ok_too():
    pass

@pytest.mark.spec("D-3")
def test_bad():
    """inflate before use"""
    assert 1 == 2, "boom"

@pytest.mark.spec("D-3")
def test_d3_passes():
    pass

@pytest.mark.spec("V-1")
@pytest.mark.skip(reason="host lacks frobnicator")
def test_skipped():
    pass

@pytest.mark.spec("DR-9")
def test_driver_id():
    """a driver id"""

@pytest.mark.spec("X-1")
def test_extra_id():
    """an id outside the list"""
'''


def write_suite(tmp_path: Path, name: str, body: str) -> Path:
    d = tmp_path / "conf"
    d.mkdir(exist_ok=True)
    (d / f"test_{name}.py").write_text(textwrap.dedent(body))
    return d


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["conformance", *args])
    out = capsys.readouterr().out
    return code, out.strip().splitlines()


def test_verdicts_and_format_subprocess(tmp_path, capsys):
    d = write_suite(tmp_path, "fake_sub", FAKE)
    code, lines = run_cli(capsys, "--tests", str(d))
    assert code == 1
    assert "PASS D-10 ignores stale ids (+1 more)" in lines
    fail = [x for x in lines if x.startswith("FAIL D-3 ")]
    assert len(fail) == 1 and "inflate before use" in fail[0] and "boom" in fail[0]
    assert "NOT COVERED V-1 : skipped: host lacks frobnicator" in lines
    assert f"NOT COVERED D-2 : {cc.NO_TEST_REASON}" in lines  # no id is excused any more
    assert f"NOT COVERED D-1 : {cc.NO_TEST_REASON}" in lines
    assert "PASS DR-9 a driver id" in lines
    assert f"NOT COVERED DR-1 : {cc.NO_TEST_REASON}" in lines
    assert "PASS X-1 an id outside the list" in lines
    # one line per V-1..V-10, D-1..D-17 and DR-1..DR-13, in order, then extras, then the total
    ids = [x.split(" ")[2] if x.startswith("NOT COVERED") else x.split(" ")[1]
           for x in lines[:-1]]
    assert ids == list(cc.REQUIREMENT_IDS) + ["X-1"]
    assert ids.index("D-17") + 1 == ids.index("DR-1")
    assert lines[-1] == f"3 passed, 1 failed, {len(cc.REQUIREMENT_IDS) - 3} not covered"


def test_all_passing_exits_zero_in_process(tmp_path, capsys):
    d = write_suite(tmp_path, "fake_inproc", '''
        import pytest

        @pytest.mark.spec("V-2")
        def test_fine():
            """works"""
    ''')
    code, lines = run_cli(capsys, "--tests", str(d), "--in-process")
    assert code == 0
    assert "PASS V-2 works" in lines
    assert lines[-1] == f"1 passed, 0 failed, {len(cc.REQUIREMENT_IDS) - 1} not covered"


def test_collection_error_is_a_failure(tmp_path, capsys):
    d = write_suite(tmp_path, "fake_broken", "import no_such_module_here\n")
    code, lines = run_cli(capsys, "--tests", str(d))
    assert code == 1
    assert any(x.startswith("ERROR collecting") for x in lines)
    assert lines[-1] == f"0 passed, 1 failed, {len(cc.REQUIREMENT_IDS)} not covered"


def test_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["conformance", "--tests", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_judge_fail_wins_over_pass():
    r = cc.Report()
    r.tests["a"] = cc.TestResult("a", ["D-4"], "one", "passed")
    r.tests["b"] = cc.TestResult("b", ["D-4"], "two", "failed", "AssertionError")
    verdicts = {rid: v for v, rid, _ in cc.judge(r)}
    assert verdicts["D-4"] == "FAIL"
    assert verdicts["D-2"] == "NOT COVERED"


def test_target_listing_leaves_the_driver_ids_out():
    """with --target the DR ids (checks of our driver) are not listed; the V and D ids are"""
    r = cc.Report()
    r.tests["a"] = cc.TestResult("a", ["D-4"], "one", "passed")
    ids = [rid for _, rid, _ in cc.judge(r, cc.TARGET_NOT_COVERED_REASONS,
                                         cc.TARGET_REQUIREMENT_IDS)]
    assert ids == [f"V-{i}" for i in range(1, 11)] + [f"D-{i}" for i in range(1, 18)]
    assert "DR-1..DR-13" in cc.TARGET_DR_NOTE
    assert not cc.TARGET_DR_NOTE.startswith(("PASS", "FAIL", "NOT COVERED"))


def test_real_suite_device_ids_pass(capsys):
    """the real conformance suite: every device id our device tests carry passes"""
    code, lines = run_cli(capsys, "-k", "test_device_")
    mine = ["D-1", "D-2", "D-3", "D-4", "D-5", "D-6", "D-7", "D-8", "D-9", "D-10", "D-11",
            "D-12", "D-13", "D-14", "D-15", "D-16", "D-17", "V-10"]
    for rid in mine:
        assert any(x.startswith(f"PASS {rid} ") for x in lines), (rid, lines)


def test_real_suite_driver_ids_pass(capsys):
    """the real conformance suite: DR-1..DR-13, checked against our driver, all pass"""
    code, lines = run_cli(capsys, "-k", "test_driver_")
    for rid in cc.DRIVER_REQUIREMENT_IDS:
        assert any(x.startswith(f"PASS {rid} ") for x in lines), (rid, lines)
