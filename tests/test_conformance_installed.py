"""The conformance checks work from an installed package, away from this repository.

A wheel is built from a copy of the sources (the packages, pyproject.toml, README; no tests)
and installed into a fresh virtualenv. That venv borrows the dependencies (numpy, trio, pytest,
...) from the one running this test through a ``.pth`` line, which adds a folder to
``sys.path`` without processing the ``.pth`` files inside it, so this checkout's editable
install stays out. Then, from an empty folder: the fresh ``balloon-hint serve`` serves our
device, the fresh ``pytest --balloon-target`` (the plugin found through its ``pytest11`` entry
point) checks it, and ``balloon-hint conformance --target`` prints its checklist.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vmsim.conformance.harness import ALL_FEATURES, start_server, stop_server

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "protocol", "guestmem", "balloon_dev",
           "guest_model", "vmsim")


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with balloon-hint installed from a wheel; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        p = REPO_ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy2(p, src / name)
    wheels = tmp / "wheels"
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(wheels), str(src)], tmp)
    assert r.returncode == 0, r.stderr
    venv = tmp / "venv"
    r = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
             "--no-index", *map(str, wheels.glob("*.whl"))], tmp)
    assert r.returncode == 0, r.stderr
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  tmp).stdout.strip()
    Path(purelib, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_wheel_carries_the_license(fresh):
    """pyproject's license (Apache-2.0) and the LICENSE file reach the installed metadata"""
    r = run([str(fresh / "python"), "-c", "from importlib.metadata import metadata, files; "
             "m = metadata('balloon-hint'); print(m['License-Expression']); "
             "print(any(f.name == 'LICENSE' for f in files('balloon-hint')))"], fresh)
    assert r.stdout.split() == ["Apache-2.0", "True"], r.stderr


def test_installed_package_is_not_the_checkout(fresh, tmp_path):
    r = run([str(fresh / "python"), "-c", "import vmsim, importlib.util; print(vmsim.__file__); "
             "print(importlib.util.find_spec('tests'))"], tmp_path)
    where, tests_spec = r.stdout.split()
    assert Path(where).is_relative_to(fresh.parent), where
    assert tests_spec == "None"


def test_pytest_balloon_target_checks_a_served_device(fresh, tmp_path):
    """pytest --balloon-target against the fresh `balloon-hint serve`: every observable id
    passes, each test carries its id in the JUnit XML, the JSON has one verdict per id"""
    sock, ctl = str(tmp_path / "dev.sock"), str(tmp_path / "dev.ctl")
    proc = start_server([str(fresh / "balloon-hint"), "serve", "--vfio-user", sock, "--control",
                         ctl, "--features", ALL_FEATURES], sock, ctl, cwd=tmp_path)
    try:
        r = run([str(fresh / "python"), "-m", "pytest", "-p", "no:cacheprovider",
                 "--balloon-target", f"vfio-user:{sock}", "--balloon-control", ctl,
                 "--junitxml", "r.xml", "--balloon-json", "r.json"], tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "balloon-hint requirement ids (docs/requirements.md)" in r.stdout
        report = json.loads((tmp_path / "r.json").read_text())
        verdicts = {v["id"]: v["verdict"] for v in report["verdicts"]}
        assert [i for i, v in verdicts.items() if v != "PASS"] == ["D-2", "D-5", "D-7"]
        assert not any(i.startswith("DR-") for i in verdicts)
        assert all("site-packages" not in t["nodeid"] or "vmsim/conformance/checks" in
                   t["nodeid"] for t in report["tests"])
        assert '<property name="requirement" value="D-10" />' in (tmp_path / "r.xml").read_text()

        r = run([str(fresh / "balloon-hint"), "conformance", "--target", f"vfio-user:{sock}",
                 "--target-control", ctl, "--id", "D-10,D-12"], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"target: vfio-user:{sock}  control: {ctl}"
        assert any(x.startswith("PASS D-10 ") for x in lines)
        assert lines[-1].startswith("2 passed, 0 failed, 3 not covered, ")
    finally:
        stop_server(proc)


def test_installed_conformance_without_target_checks_our_own_device(fresh, tmp_path):
    """no checkout around: `balloon-hint conformance` runs the shipped checks against a
    `serve` it starts itself, and says so"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(fresh / "balloon-hint"), "conformance", "-k", "stop_published"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("target: our own device")
    assert any(x.startswith("PASS D-8 ") for x in r.stdout.splitlines())
