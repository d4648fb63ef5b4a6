"""``balloon-hint completion bash``: the generated script completes in a real bash."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from vmsim.cmd_completion import bash_script

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this host")


@pytest.fixture(scope="module")
def script() -> str:
    return bash_script()


def complete(script: str, line: str) -> list[str]:
    """COMPREPLY for the command line ``line`` (the cursor at its end)."""
    words = line.split(" ")
    driver = (script + "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in words) + ")\n"
              f"COMP_CWORD={len(words) - 1}\n_balloon_hint\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", driver], capture_output=True,
                         text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.splitlines() if w]


@pytest.mark.parametrize("line,want", [
    ("balloon-hint mig", ["migrate", "migrate-check"]),
    ("balloon-hint --vers", ["--version"]),
    ("balloon-hint migrate --mo", ["--mode"]),
    ("balloon-hint migrate --mode c", ["capture"]),
    ("balloon-hint -v migrate --builtin idle", ["idle-128g", "idle-8g"]),
    ("balloon-hint migrate --seed ", []),
    ("balloon-hint scenarios --show small", ["small-churn", "small-idle"]),
    ("balloon-hint conformance --ta", ["--target", "--target-control"]),
    ("balloon-hint completion ", ["bash"]),
])
def test_completes(script, line, want):
    assert complete(script, line) == want


def test_ctl_completes_its_commands(script):
    got = complete(script, "balloon-hint ctl /tmp/x.ctl hint-")
    assert got and all(w.startswith("hint-") for w in got) and "hint-start" in got


def test_file_values_complete_file_names(script):
    got = complete(script, "balloon-hint migrate --json /et")
    assert "/etc" in got


def test_command_prints_the_script(capsys):
    from vmsim.cli import main

    assert main(["completion", "bash"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# bash completion for balloon-hint")
    assert out.rstrip().endswith("complete -o filenames -F _balloon_hint balloon-hint")
