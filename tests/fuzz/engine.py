"""Coverage-guided fuzzing of one target of ``tests.fuzz.targets``, in this process.

    python -m tests.fuzz.engine TARGET [--seconds S | --runs N] [--seed N]
        [--corpus DIR] [--seeds DIR ...] [--crashes DIR] [--dict FILE] [--merge]

The engine is atheris (libFuzzer for Python, from PyPI): the project's packages are imported
under ``atheris.instrument_imports``, so libFuzzer sees which branches of ``balloon_dev``,
``protocol``, ``guestmem`` and ``vmsim`` an input reached and keeps the inputs that reach new
ones in ``--corpus`` (the first corpus directory; ``--seeds`` directories are read only). An
input that breaks the target's invariant is written to ``--crashes`` as ``crash-<sha1>`` and the
run exits non-zero; one that takes more than 10 s is kept as ``timeout-<sha1>``.

Around every input the wrapper counts the process's open fds (``/proc/self/fd``): more after the
input than before is a leak, reported on that input. Every 1,000 inputs it compares the resident
set with what it was after the first 1,000: growth beyond ``RSS_GROWTH_MB`` is reported as a
leak (libFuzzer's own ``-rss_limit_mb`` catches a single input that allocates too much).

libFuzzer ends the process itself when the run is over (it does not return to Python), so the
engine runs in a process of its own: ``tests/fuzz/test_fuzz_targets.py`` and ``scripts/fuzz``
start it with ``subprocess``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

RSS_GROWTH_MB = 256
FD_SLACK = 0  # an input may not leave a single fd behind
INSTRUMENTED = ["balloon_dev", "protocol", "guestmem", "vmsim", "guest_model"]
#: Modules each target reaches, imported under instrumentation before the first input (the
#: targets import lazily, which atheris would otherwise not see).
TARGET_MODULES = {
    "scenario_toml": ["vmsim.scenario"],
    "control_json": ["balloon_dev.control", "balloon_dev.transport.control_server",
                     "balloon_dev.device"],
    "split_ring": ["balloon_dev.device", "balloon_dev.virtqueue", "balloon_dev.hint"],
    "packed_ring": ["balloon_dev.device", "balloon_dev.packed_virtqueue", "balloon_dev.hint"],
    "vfio_user": ["balloon_dev.transport.vfio_user", "protocol.vfio_user",
                  "balloon_dev.transport.virtio_pci", "balloon_dev.transport.guest_ram",
                  "balloon_dev.device"],
    "vhost_user": ["balloon_dev.transport.vhost_user", "protocol.vhost_user",
                   "balloon_dev.transport.guest_ram", "balloon_dev.device"],
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def checked(fn: Callable[[bytes], None],
            fd_count: Callable[[], int]) -> Callable[[bytes], None]:
    """The target with the fd and memory checks around it."""
    state = {"n": 0, "rss0": 0.0}

    def one(data: bytes) -> None:
        before = fd_count()
        fn(data)
        after = fd_count()
        if after > before + FD_SLACK:
            raise AssertionError(f"fd leak: {before} fds open before this input, {after} after")
        state["n"] += 1
        n = int(state["n"])
        if n == 1000:
            state["rss0"] = _rss_mb()
        elif n % 1000 == 0 and _rss_mb() > state["rss0"] + RSS_GROWTH_MB:
            raise AssertionError(f"memory grew from {state['rss0']:.0f} MiB to "
                                 f"{_rss_mb():.0f} MiB over {n} inputs")
    return one


def _load(target: str) -> Callable[[bytes], None]:
    """The target, with the project's packages imported under atheris's instrumentation."""
    import logging
    # Guest and peer faults log warnings by design; only errors (internal ones) matter here,
    # and targets collect those themselves.
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger().addHandler(logging.NullHandler())

    import atheris  # type: ignore[import-untyped]

    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz import targets
        if target not in targets.TARGETS:
            raise SystemExit(f"unknown target {target!r} (one of {', '.join(targets.TARGETS)})")
        for mod in TARGET_MODULES.get(target, []):
            importlib.import_module(mod)
    return checked(targets.TARGETS[target], targets.fd_count)


def _merge_program(target: str, where: Path) -> Path:
    """libFuzzer merges by running its own program again on parts of the corpus; ours is
    ``python -m tests.fuzz.engine``, so it gets a small launcher that passes the flags
    through (``--raw``)."""
    root = Path(__file__).resolve().parent.parent.parent
    prog = where / "engine"
    prog.write_text(f"#!/bin/sh\ncd {shlex.quote(str(root))} && exec "
                    f"{shlex.quote(sys.executable)} -m tests.fuzz.engine {shlex.quote(target)} "
                    '--raw "$@"\n')
    prog.chmod(0o755)
    return prog


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[1] == "--raw":  # libFuzzer's own flags (a merge's inner runs)
        import atheris
        atheris.Setup([sys.argv[0], *argv[2:]], _load(argv[0]))
        atheris.Fuzz()
        return 0
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.engine")
    ap.add_argument("target")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus", type=Path, default=None, help="where new inputs are kept")
    ap.add_argument("--seeds", type=Path, nargs="*", default=[], help="read-only corpora")
    ap.add_argument("--crashes", type=Path, default=Path("."))
    ap.add_argument("--dict", type=Path, default=None, help="libFuzzer dictionary (tokens)")
    ap.add_argument("--merge", action="store_true",
                    help="copy into --corpus (empty) the smallest set of the --seeds inputs "
                    "that reaches all their coverage, then stop (libFuzzer -merge=1)")
    args = ap.parse_args(argv)
    fn = _load(args.target)
    import atheris

    lf = [sys.argv[0], f"-seed={args.seed}", "-timeout=10", "-rss_limit_mb=2048",
          f"-artifact_prefix={args.crashes}/", "-print_final_stats=1", "-max_len=2048",
          "-len_control=0"]
    tmp = None
    if args.merge:
        tmp = tempfile.TemporaryDirectory(prefix="bh-merge-")
        lf[0] = str(_merge_program(args.target, Path(tmp.name)))
        lf += ["-merge=1", "-use_counters=0"]  # keep inputs for new edges, not hit counts
    if args.seconds is not None:
        lf.append(f"-max_total_time={args.seconds}")
    if args.runs is not None:
        lf.append(f"-runs={args.runs}")
    if args.dict is not None:
        lf.append(f"-dict={args.dict.resolve()}")

    args.crashes.mkdir(parents=True, exist_ok=True)
    for d in [args.corpus, *args.seeds]:
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            lf.append(str(d.resolve()))
    atheris.Setup(lf, fn)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits


if __name__ == "__main__":
    sys.exit(main())
