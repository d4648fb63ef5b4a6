"""``balloon-hint conformance`` (vmsim/cmd_conformance.py): verdict per id, format, exit status.

Most tests run the command on a small folder of made-up conformance tests written here, so the
expected verdicts are known; one runs it on the real tests/conformance."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vmsim.cli import main
from vmsim.conformance import report as rep
from vmsim.conformance.requirements import (
    DRIVER_REQUIREMENT_IDS,
    REQUIREMENT_IDS,
    TARGET_REQUIREMENT_IDS,
)

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
@pytest.mark.skip(reason="fixture: a skipped check is reported NOT COVERED")
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
    assert "NOT COVERED V-1 : skipped: fixture: a skipped check is reported NOT COVERED" in lines
    assert f"NOT COVERED D-2 : {rep.NO_TEST_REASON}" in lines  # no id is excused any more
    assert f"NOT COVERED D-1 : {rep.NO_TEST_REASON}" in lines
    assert "PASS DR-9 a driver id" in lines
    assert f"NOT COVERED DR-1 : {rep.NO_TEST_REASON}" in lines
    assert "PASS X-1 an id outside the list" in lines
    # one line per V-1..V-10, D-1..D-17 and DR-1..DR-13, in order, then extras, then the total
    ids = [x.split(" ")[2] if x.startswith("NOT COVERED") else x.split(" ")[1]
           for x in lines[:-1]]
    assert ids == list(REQUIREMENT_IDS) + ["X-1"]
    assert ids.index("D-17") + 1 == ids.index("DR-1")
    assert lines[-1] == f"3 passed, 1 failed, {len(REQUIREMENT_IDS) - 3} not covered"


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
    assert lines[-1] == f"1 passed, 0 failed, {len(REQUIREMENT_IDS) - 1} not covered"


def test_collection_error_is_a_failure(tmp_path, capsys):
    d = write_suite(tmp_path, "fake_broken", "import no_such_module_here\n")
    code, lines = run_cli(capsys, "--tests", str(d))
    assert code == 1
    assert any(x.startswith("ERROR collecting") for x in lines)
    assert lines[-1] == f"0 passed, 1 failed, {len(REQUIREMENT_IDS)} not covered"


def test_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["conformance", "--tests", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_judge_fail_wins_over_pass():
    r = rep.Report()
    r.tests["a"] = rep.TestResult("a", ["D-4"], "one", "passed")
    r.tests["b"] = rep.TestResult("b", ["D-4"], "two", "failed", "AssertionError")
    verdicts = {v.rid: v.verdict for v in rep.judge(r)}
    assert verdicts["D-4"] == "FAIL"
    assert verdicts["D-2"] == "NOT COVERED"


def test_device_checks_listing_leaves_the_driver_ids_out():
    """for the device checks the DR ids (checks of our driver) are not listed; V and D are"""
    r = rep.Report(device_checks=True)
    r.tests["a"] = rep.TestResult("a", ["D-4"], "one", "passed")
    ids = [v.rid for v in rep.judge(r)]
    assert ids == [f"V-{i}" for i in range(1, 11)] + [f"D-{i}" for i in range(1, 18)]
    assert ids == list(TARGET_REQUIREMENT_IDS)
    assert "DR-1..DR-13" in rep.DR_NOTE


def test_unselected_ids_are_not_selected_not_uncovered():
    """an id whose every test was deselected is NOT SELECTED; one with a skipped test among
    deselected ones is NOT COVERED (it was selected and did not run)"""
    r = rep.Report()
    r.tests["a"] = rep.TestResult("a", ["D-4"], "one", "not selected")
    r.tests["b"] = rep.TestResult("b", ["D-3"], "two", "not selected")
    r.tests["c"] = rep.TestResult("c", ["D-3"], "three", "skipped", "no control")
    v = {x.rid: x for x in rep.judge(r)}
    assert v["D-4"].verdict == "NOT SELECTED"
    assert v["D-3"].verdict == "NOT COVERED" and "no control" in v["D-3"].text
    lines = rep.format_lines(rep.judge(r), [])
    assert lines[-1] == f"0 passed, 0 failed, {len(REQUIREMENT_IDS) - 1} not covered, " \
        "1 not selected"
    assert "NOT SELECTED D-4 : its checks were left out by the selection" in lines


def test_k_selecting_no_id_is_a_usage_error(tmp_path, capsys):
    """-k that leaves no test carrying an id: exit 2 and a message, not '0 passed'"""
    d = write_suite(tmp_path, "fake_k", FAKE)
    assert main(["conformance", "--tests", str(d), "-k", "D-99"]) == 2
    err = capsys.readouterr().err
    assert "-k 'D-99' selects no check carrying a requirement id" in err


def test_k_selects_by_id_and_the_rest_is_not_selected(tmp_path, capsys):
    d = write_suite(tmp_path, "fake_kid", FAKE)
    code, lines = run_cli(capsys, "--tests", str(d), "-k", "D-10", "--in-process")
    assert code == 0, lines
    assert "PASS D-10 ignores stale ids (+1 more)" in lines
    assert any(x.startswith("NOT SELECTED D-3 : ") for x in lines)
    assert f"NOT COVERED D-1 : {rep.NO_TEST_REASON}" in lines  # no test at all: not covered
    assert lines[-1].endswith(", 4 not selected")  # D-3, V-1, DR-9, X-1


@pytest.mark.parametrize("ids,code", [("D-3", 1), ("D-10,V-1", 0)])
def test_id_selects_exactly(tmp_path, capsys, ids, code):
    d = write_suite(tmp_path, f"fake_id{len(ids)}", FAKE)  # in-process: one name per run
    got, lines = run_cli(capsys, "--tests", str(d), "--id", ids, "--in-process")
    assert got == code, lines
    v = {x.split(" ")[1] for x in lines if x.startswith(("PASS", "FAIL"))}
    assert v == ({"D-3"} if ids == "D-3" else {"D-10"})


def test_unknown_id_is_a_usage_error(capsys):
    assert main(["conformance", "--id", "D-1,Q-7"]) == 2
    assert "unknown requirement id(s) Q-7" in capsys.readouterr().err


def test_reports_junit_and_json(tmp_path, capsys):
    """--junitxml: each test with its requirement property; --json: the verdicts"""
    d = write_suite(tmp_path, "fake_rep", FAKE)
    xml, js = tmp_path / "r.xml", tmp_path / "r.json"
    code, _ = run_cli(capsys, "--tests", str(d), "--junitxml", str(xml), "--json", str(js))
    assert code == 1
    assert '<property name="requirement" value="D-3" />' in xml.read_text()
    import json
    raw = json.loads(js.read_text())
    assert raw["schema_version"] == rep.SCHEMA_VERSION
    v = {x["id"]: x["verdict"] for x in raw["verdicts"]}
    assert v["D-3"] == "FAIL" and v["D-10"] == "PASS" and v["V-1"] == "NOT COVERED"
    assert raw["summary"]["failed"] == 1


def test_without_pytest_the_advice_is_one_line(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest" else real(name, *a))
    assert main(["conformance"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'balloon-hint[conformance]'" in err[0]


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
    for rid in DRIVER_REQUIREMENT_IDS:
        assert any(x.startswith(f"PASS {rid} ") for x in lines), (rid, lines)
