"""The fuzz targets of issue 15 item 9, run on every change: the kept corpus and crashes replayed
in-process, then a short coverage-guided run of each target.

* ``test_corpus_replays``: every input under ``tests/fuzz/seeds/TARGET`` (hand-written:
  a correct driver's programs, the built-in scenarios, the issue's reproducers),
  ``tests/fuzz/corpus/TARGET`` (what the fuzzer kept: the smallest set reaching every edge it
  reached) and ``tests/fuzz/crashes/TARGET`` (inputs that once broke a target, kept after the
  fix) runs through the target again, with the fd count checked around each and around all.
* ``test_coverage_guided_run``: ``tests.fuzz.engine`` (atheris) for ``FUZZ_SECONDS`` per target
  (``BALLOON_HINT_FUZZ_SECONDS``, default 4: about a minute for the six targets with their
  start-up on an idle 2-core machine),
  seeded from the kept corpus, new inputs in a temporary folder. A crash fails the test with
  the input (hex) and the target's traceback; ``scripts/fuzz`` is the long run that grows the
  corpus and keeps crashes under tests/fuzz/crashes.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS, fd_count

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
FUZZ_SECONDS = int(os.environ.get("BALLOON_HINT_FUZZ_SECONDS", "4"))


def _inputs(name: str) -> list[Path]:
    out: list[Path] = []
    for kind in ("seeds", "corpus", "crashes"):
        d = HERE / kind / name
        if d.is_dir():
            out += sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return out


def test_every_target_has_a_corpus() -> None:
    for name in TARGETS:
        assert len(_inputs(name)) >= 5, f"tests/fuzz/{{seeds,corpus}}/{name}: (almost) nothing"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays(name: str) -> None:
    fn = TARGETS[name]
    start = fd_count()
    for p in _inputs(name):
        before = fd_count()
        try:
            fn(p.read_bytes())
        except BaseException as e:
            raise AssertionError(f"{p.relative_to(ROOT)}: {type(e).__name__}: {e}") from e
        assert fd_count() <= before, f"{p.relative_to(ROOT)} leaked an fd"
    assert fd_count() <= start


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris has no wheel for this platform (Linux x86_64, CPython "
                    "<= 3.12 only)")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_coverage_guided_run(name: str, tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    cmd = [sys.executable, "-m", "tests.fuzz.engine", name, "--seconds", str(FUZZ_SECONDS),
           "--seed", "1", "--corpus", str(tmp_path / "corpus"), "--crashes", str(crashes),
           "--seeds", str(HERE / "seeds" / name), str(HERE / "corpus" / name)]
    dict_file = HERE / "dicts" / f"{name}.dict"
    if dict_file.is_file():
        cmd += ["--dict", str(dict_file)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=FUZZ_SECONDS + 120)
    found = sorted(crashes.glob("*")) if crashes.is_dir() else []
    detail = "\n".join(f"{c.name}: {c.read_bytes()[:512].hex()}" for c in found)
    assert p.returncode == 0 and not found, (
        f"{name}: exit {p.returncode}\n{detail}\n{p.stderr[-4000:]}")
    runs = [ln for ln in p.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split()[-1]) > 0, p.stderr[-2000:]


def test_the_engine_reports_a_leaked_fd_on_the_input_that_leaked_it() -> None:
    from tests.fuzz.engine import checked

    leaked: list[int] = []

    def leaky(data: bytes) -> None:
        if data:
            leaked.append(os.open(os.devnull, os.O_RDONLY))

    one = checked(leaky, fd_count)
    one(b"")  # no leak, no complaint
    try:
        with pytest.raises(AssertionError, match="fd leak"):
            one(b"x")
    finally:
        for fd in leaked:
            os.close(fd)
