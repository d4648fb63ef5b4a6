"""``balloon-hint conformance --target qemu``: QEMU's own virtio-balloon checked against our
driver under qtest (a fresh QEMU per check, no guest boot).

The expected verdicts are docs/qemu-deviations.md's list for QEMU 11.1 (the lab's): a change
in QEMU or in our checks shows here. With another QEMU (``BALLOON_HINT_QTEST_QEMU``) only the
version-independent rules are held: no collection error, every FAIL cites the spec, the legacy
ids not covered."""
from __future__ import annotations

import os

import pytest

from tests.vmsim.qtest.conftest import QEMU_ENV
from vmsim.cli import main

#: QEMU breaks these (docs/qemu-deviations.md): spec citation expected in the line.
EXPECTED_FAIL = {"V-10": "virtio 2.1.2", "D-16": "virtio 2.1.2", "D-10": "virtio 5.5.6.7"}
#: Passes that carry a documented QEMU behaviour.
EXPECTED_BEHAVIOUR = {"V-1", "D-17"}
#: Not observable on QEMU: the legacy-only ids, and D-4 (QEMU never offers MUST_TELL_HOST).
EXPECTED_NOT_COVERED = {"D-2", "D-4", "D-5", "D-7"}


def verdicts(lines: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for x in lines:
        for v in ("PASS", "FAIL", "NOT COVERED"):
            if x.startswith(v + " "):
                rid = x[len(v) + 1:].split(" ", 1)[0]
                out[rid] = (v, x)
    return out


def test_conformance_against_qemus_balloon(qtest_qemu, capsys):
    path = os.environ.get(QEMU_ENV)
    target = f"qemu:{path}" if path else "qemu"
    code = main(["conformance", "--target", target])
    lines = capsys.readouterr().out.splitlines()
    v = verdicts(lines)
    assert not [x for x in lines if x.startswith("ERROR")], lines
    fails = {rid for rid, (verdict, _) in v.items() if verdict == "FAIL"}
    for rid in fails:
        assert "virtio " in v[rid][1], f"a FAIL without its spec citation: {v[rid][1]}"
    assert {"D-2", "D-5", "D-7"} <= {rid for rid, (verdict, _) in v.items()
                                     if verdict == "NOT COVERED"}
    if not qtest_qemu.check().startswith("11.1."):
        return  # the table below is QEMU 11.1's
    assert code == 1, lines  # QEMU fails some ids
    assert fails == set(EXPECTED_FAIL), lines
    for rid, cite in EXPECTED_FAIL.items():
        assert cite in v[rid][1], v[rid][1]
    nc = {rid for rid, (verdict, _) in v.items() if verdict == "NOT COVERED"}
    assert nc == EXPECTED_NOT_COVERED, lines
    for rid in EXPECTED_BEHAVIOUR:
        assert "documented QEMU behaviour" in v[rid][1], v[rid][1]
    assert "QEMU has no host request that publishes STOP" in v["D-8"][1]


@pytest.mark.parametrize("args, err", [
    (["--target", "qemu", "--target-control", "/tmp/x"], "QEMU's own"),
    (["--target", "qemu:"], "expected KIND:SOCKET_PATH"),
])
def test_qemu_target_usage_errors(args, err, capsys):
    assert main(["conformance", *args]) == 2
    assert err in capsys.readouterr().err


def test_missing_qemu_binary_is_an_environment_failure(tmp_path, capsys):
    assert main(["conformance", "--target", f"qemu:{tmp_path / 'nope'}"]) == 1
    assert "not an executable" in capsys.readouterr().err
