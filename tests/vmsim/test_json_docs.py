"""Real JSON outputs validate against the shipped schemas (docs/json.md), and ``balloon-hint
compare`` puts two of them side by side."""
from __future__ import annotations

import json
import textwrap
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest

from vmsim.cli import main
from vmsim.report import RunResult

SCHEMAS = Path(__file__).resolve().parents[2] / "vmsim" / "schemas"


def schema(kind: str) -> dict:
    s = json.loads((SCHEMAS / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def validate(doc: dict, kind: str) -> None:
    jsonschema.Draft202012Validator(schema(kind)).validate(doc)


@pytest.fixture(scope="module")
def migrate_docs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("json")
    a, b = d / "a.json", d / "b.json"
    assert main(["migrate", "--builtin", "small-idle", "--mode", "all", "--json", str(a)]) == 0
    assert main(["migrate", "--builtin", "small-idle", "--mode", "all", "--seed", "7",
                 "--json", str(b)]) == 0
    return a, b


def test_migrate_output_validates(migrate_docs):
    for p in migrate_docs:
        validate(json.loads(p.read_text()), "migrate")


def test_schema_names_every_result_field():
    """a new RunResult field must be documented (the schema forbids unknown keys)"""
    run = schema("migrate")["$defs"]["run"]
    names = [f.name for f in fields(RunResult)]
    assert sorted(run["properties"]) == sorted(names) == sorted(run["required"])
    doc = (Path(__file__).resolve().parents[2] / "docs" / "json.md").read_text()
    assert [n for n in names if f"`{n}`" not in doc] == []


def test_schema_rejects_a_wrong_document(migrate_docs):
    doc = json.loads(migrate_docs[0].read_text())
    doc["results"][0]["mode"] = "sideways"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, "migrate")


def test_interrupted_document_validates():
    doc = {"schema_version": 1, "kind": "migrate", "scenario": "x", "description": "",
           "published": {}, "interrupted": {"signal": "SIGINT", "during_mode": None},
           "results": []}
    validate(doc, "migrate")


def test_conformance_output_validates(tmp_path, capsys):
    d = tmp_path / "conf"
    d.mkdir()
    (d / "test_fake_json.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.spec("D-10")
        def test_ok():
            """fine"""

        @pytest.mark.spec("D-3")
        def test_bad():
            assert False

        @pytest.mark.spec("V-1")
        @pytest.mark.skip(reason="fixture: a skipped check in the JSON report")
        def test_skipped():
            pass
    '''))
    js = tmp_path / "c.json"
    assert main(["conformance", "--tests", str(d), "--json", str(js)]) == 1
    validate(json.loads(js.read_text()), "conformance")


def test_compare_same_runs_agree(migrate_docs, capsys):
    a, _ = migrate_docs
    assert main(["compare", str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "mode capture" in out and "pages sent" in out


def test_compare_shows_the_differences(migrate_docs, capsys):
    a, b = migrate_docs
    assert main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    da, db = (json.loads(p.read_text()) for p in migrate_docs)
    ra = next(r for r in da["results"] if r["mode"] == "off")
    rb = next(r for r in db["results"] if r["mode"] == "off")
    assert ra["seed"] != rb["seed"] == 7
    seed_row = next(x for x in out.splitlines() if x.startswith("│ seed "))
    assert f"{rb['seed'] - ra['seed']:+,}" in seed_row
    for mode in ("off", "walk", "capture"):
        assert f"mode {mode}" in out


@pytest.mark.parametrize("content,err", [
    ("[1, 2]", "not a balloon-hint JSON document"),
    ("{not json", "not JSON"),
    ('{"schema_version": 99, "kind": "migrate"}', "schema_version 99 is newer"),
    ('{"schema_version": 1, "kind": "sweep"}', "kind 'sweep' cannot be compared"),
])
def test_compare_refuses_what_it_cannot_read(tmp_path, capsys, migrate_docs, content, err):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["compare", str(migrate_docs[0]), str(bad)]) == 2
    assert err in capsys.readouterr().err


def test_fidelity_output_validates(tmp_path):
    js = tmp_path / "f.json"
    assert main(["fidelity", "--only", "idle-8g", "--json", str(js)]) == 0
    validate(json.loads(js.read_text()), "fidelity")
