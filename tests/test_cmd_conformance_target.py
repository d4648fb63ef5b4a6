"""``balloon-hint conformance --target``: an external device checked against our driver.

The target is a real server process: our own (``balloon-hint serve``), where every observable
id must PASS, and ``tests/conformance_target/faulty_server.py`` with one rule broken, where the
ids that rule belongs to must FAIL. Each faulty run selects the checks of its ids with ``-k``
(the full target suite against every fault would cost minutes of shared CPU)."""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conformance_target.faulty_server import FAULTS
from vmsim import cmd_conformance as cc
from vmsim.cli import main
from vmsim.conformance.harness import ALL_FEATURES, start_server, stop_server
from vmsim.conformance.report import CHECKS_NOT_COVERED_REASONS

#: The checkout: the faulty server is a module of its tests.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Ids the target checks can observe (everything but the legacy-only D-2, D-5, D-7).
OBSERVABLE = [f"V-{i}" for i in range(1, 11)] + ["D-1", "D-3", "D-4", "D-6"] + \
    [f"D-{i}" for i in range(8, 18)]
HOST_DRIVEN = ["D-6", "D-8", "D-9", "D-10", "D-11", "D-12", "D-13"]

#: fault -> -k expression selecting the checks of the ids FAULTS says must fail.
KEYWORDS = {
    "early-use": "kicks_before_driver_ok",
    "used-len": "used_len_is_zero",
    "reuse-id": "ids_not_reused",
    "no-stop": "stop_published",
    "no-done": "done_published",
    "scribble-hints": "stale_id or written_after_the_id or nothing_changes_after_done or "
                      "writes_only_used",
    "write-readable": "writes_only_used",
    "scribble-neighbour": "only_inflated_pages",
    "scribble-deflated": "deflated_pages_stable",
    "silent-reset": "avail_index_jump or head_index_out_of_range",
    "keep-stats": "unknown_tags",
    "report-zero": "content_or_poison",
    "refuse-features": "refused_for_missing",
    "live-id-at-reset": "stop_published or readable_before_features_ok",
    "qemu-cmd-id-read": "stays_published",
}


@contextmanager
def serve(argv: Callable[[str, str], list[str]]) -> Iterator[tuple[str, str]]:
    """A device server process whose command line ``argv(sock, ctl)`` names its sockets."""
    with tempfile.TemporaryDirectory(prefix="bh-cmd-target-") as tmp:
        sock, ctl = os.path.join(tmp, "dev.sock"), os.path.join(tmp, "dev.ctl")
        proc = start_server([sys.executable, *argv(sock, ctl)], sock, ctl, cwd=REPO_ROOT)
        try:
            yield sock, ctl
        finally:
            stop_server(proc)


@pytest.fixture(scope="module")
def our_server() -> Iterator[tuple[str, str]]:
    with serve(lambda s, c: ["-m", "vmsim", "serve", "--vfio-user", s, "--control", c,
                             "--features", ALL_FEATURES]) as sockets:
        yield sockets


def failed_on_the_fault(lines: list[str], ids: tuple[str, ...]) -> None:
    """Each of ``ids`` FAILs because of what the device did, not because our client could not
    set it up (a refused SET_VRING_NUM would fail every id and prove nothing)."""
    v = verdicts(lines)
    assert {rid: v.get(rid) for rid in ids} == {rid: "FAIL" for rid in ids}, lines
    for rid in ids:
        line = next(x for x in lines if x.startswith(f"FAIL {rid} "))
        assert "DeviceFault" not in line, line


def verdicts(lines: list[str]) -> dict[str, str]:
    out = {}
    for x in lines:
        for v in ("PASS", "FAIL", "NOT COVERED"):
            if x.startswith(v + " "):
                out[x[len(v) + 1:].split(" ")[0]] = v
    return out


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["conformance", *args])
    return code, capsys.readouterr().out.strip().splitlines()


def test_our_server_passes_every_observable_id(our_server, capsys):
    """our own device, served over vfio-user, checked from the driver side: all PASS"""
    sock, ctl = our_server
    code, lines = run_cli(capsys, "--target", f"vfio-user:{sock}", "--target-control", ctl)
    assert lines[0] == f"target: vfio-user:{sock}  control: {ctl}"
    v = verdicts(lines)
    assert code == 0, lines
    assert [rid for rid in OBSERVABLE if v.get(rid) != "PASS"] == [], lines
    for rid in ("D-2", "D-5", "D-7"):
        assert f"NOT COVERED {rid} : {CHECKS_NOT_COVERED_REASONS[rid]}" in lines
    assert lines[-1] == f"{len(OBSERVABLE)} passed, 0 failed, 3 not covered"


def test_without_control_host_driven_ids_are_not_covered(our_server, capsys):
    """no --target-control: checks needing host requests are NOT COVERED, naming why"""
    sock, _ = our_server
    code, lines = run_cli(capsys, "--target", f"vfio-user:{sock}", "--in-process", "-k",
                          "stop_published or kicks_before_driver_ok or unknown_tags")
    assert code == 0
    assert "control: none" in lines[0]
    v = verdicts(lines)
    assert v["V-10"] == "PASS"
    for rid in ("D-6", "D-8"):
        line = next(x for x in lines if x.startswith(f"NOT COVERED {rid} "))
        assert "host-control socket" in line


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_broken_device_fails_the_matching_ids(fault, capsys):
    """a device with one rule broken: the ids of that rule FAIL and the command exits 1"""
    _, must_fail = FAULTS[fault]
    with serve(lambda s, c: ["-m", "tests.conformance_target.faulty_server", "--fault", fault,
                             "--features", ALL_FEATURES, s, c]) as (sock, ctl):
        # In this process: a fresh pytest per fault would cost a second of start-up each.
        code, lines = run_cli(capsys, "--target", f"vfio-user:{sock}", "--target-control", ctl,
                              "--in-process", "-k", KEYWORDS[fault])
    assert code == 1, lines
    failed_on_the_fault(lines, must_fail)


#: Our vhost-user server offers everything it can serve over vhost-user: all of ALL_FEATURES
#: (REPORTING included, since `serve --vhost-user` sizes all five queues 128, the one vq_size
#: QEMU's generic front-end and vmsim.vhost_user_client give every ring); RING_PACKED is
#: refused over vhost-user and is not in ALL_FEATURES either.
VHOST_FEATURES = ALL_FEATURES
#: Ids a vhost-user target cannot show: V-10 (the front-end gates early kicks).
VHOST_NOT_OBSERVABLE = {"V-10"}


def test_our_vhost_user_server_passes_every_observable_id(capsys):
    """our own device over vhost-user, checked through vmsim.vhost_user_client: all PASS"""
    with serve(lambda s, c: ["-m", "vmsim", "serve", "--vhost-user", s, "--control", c,
                             "--features", VHOST_FEATURES]) as (sock, ctl):
        code, lines = run_cli(capsys, "--target", f"vhost-user:{sock}", "--target-control", ctl)
    assert code == 0, lines
    v = verdicts(lines)
    want = [rid for rid in OBSERVABLE if rid not in VHOST_NOT_OBSERVABLE]
    assert [rid for rid in want if v.get(rid) != "PASS"] == [], lines
    assert "vhost-user: the front-end hands the rings over only at DRIVER_OK" in \
        next(x for x in lines if x.startswith("NOT COVERED V-10 "))


@pytest.mark.parametrize("fault", ["reuse-id", "scribble-hints", "silent-reset", "report-zero"])
def test_broken_vhost_user_device_fails_the_matching_ids(fault, capsys):
    """the same faults behind vhost-user: their ids FAIL"""
    _, must_fail = FAULTS[fault]
    with serve(lambda s, c: ["-m", "tests.conformance_target.faulty_server", "--fault", fault,
                             "--vhost-user", "--features", VHOST_FEATURES, s, c]) as (sock, ctl):
        code, lines = run_cli(capsys, "--target", f"vhost-user:{sock}", "--target-control",
                              ctl, "-k", KEYWORDS[fault])
    assert code == 1, lines
    failed_on_the_fault(lines, must_fail)


@pytest.mark.parametrize("args,err", [
    (["--target", "vhost-net:/x"], "transport 'vhost-net' is not supported"),
    (["--target", "vfio-user"], "expected KIND:SOCKET_PATH"),
    (["--target", "vfio-user:/nonexistent/sock"], "no such socket"),
    (["--target-control", "/tmp/x"], "--target-control needs --target"),
])
def test_bad_target_is_a_usage_error(args, err, capsys):
    assert main(["conformance", *args]) == 2
    assert err in capsys.readouterr().err


def test_target_mode_runs_the_shipped_checks():
    """the checks --target runs live in the installed package, not in the repository's tests"""
    assert cc.CHECKS_DIR.is_dir() and "tests" not in cc.CHECKS_DIR.relative_to(REPO_ROOT).parts
    assert sorted(p.name for p in cc.CHECKS_DIR.glob("test_*.py")) == [
        "test_target_balloon.py", "test_target_hint.py", "test_target_init.py",
        "test_target_rings.py"]
