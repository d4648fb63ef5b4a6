"""scripts/calibrate_work.py's fit: the weights of the simulation's work bound come from it, so
its non-negative least squares and its choice of runs are checked on data with a known answer
(the migrations it measures are too slow for the test suite: `--quick` takes about 25 s)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from vmsim.vm import WORK_KINDS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "calibrate_work.py"


@pytest.fixture(scope="module")
def cw() -> ModuleType:
    spec = importlib.util.spec_from_file_location("calibrate_work", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["calibrate_work"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("seed", range(5))
def test_nnls_recovers_non_negative_weights(cw: ModuleType, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (40, 6))
    x = rng.uniform(0, 3, 6)
    x[rng.integers(6)] = 0.0
    assert np.allclose(cw.nnls(a, a @ x), x, atol=1e-9)


def _correlated(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns that are nearly combinations of two others (as events, ticks and pages are in
    the measured runs) and weights of either sign: a weight taken in early must often be
    dropped again later (the seeds below all take that path)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (30, 2))
    a = np.column_stack([base, base @ rng.uniform(0, 1, (2, 3)) + rng.normal(0, 0.05, (30, 3))])
    return a, a @ rng.normal(0, 1, 5) + rng.normal(0, 0.05, 30)


@pytest.mark.parametrize("seed", [2, 4, 10, 17, 31, 32, 41, 42, 44, 50])
def test_nnls_clamps_and_is_optimal(cw: ModuleType, seed: int) -> None:
    """Where plain least squares wants a negative weight, the answer is non-negative and no
    feasible step improves it (Karush-Kuhn-Tucker: the gradient vanishes on the positive
    weights and points outwards on the zero ones)."""
    a, b = _correlated(seed)
    assert (np.linalg.lstsq(a, b, rcond=None)[0] < 0).any()
    x = cw.nnls(a, b)
    assert (x >= 0).all()
    grad = a.T @ (b - a @ x)
    assert np.allclose(grad[x > 0], 0, atol=1e-8)
    assert (grad[x == 0] <= 1e-8).all()


def test_fit_recovers_the_cost_per_item_and_skips_short_runs(cw: ModuleType) -> None:
    rng = np.random.default_rng(7)
    true = {k: float(v) for k, v in zip(WORK_KINDS, rng.uniform(0.001, 50, len(WORK_KINDS)),
                                         strict=True)}
    runs = []
    for _ in range(60):
        work = {k: int(rng.integers(0, 10**6)) for k in WORK_KINDS}
        cpu_s = sum(true[k] * n for k, n in work.items()) / 1e6
        runs.append({"work": work, "cpu_s": cpu_s})
    # a run below MIN_CPU_S with an absurd CPU time: fitted, it would spoil the answer
    runs.append({"work": {k: 1 for k in WORK_KINDS}, "cpu_s": cw.MIN_CPU_S / 2})
    assert min(r["cpu_s"] for r in runs[:-1]) >= cw.MIN_CPU_S
    got = cw.fit(runs)
    for k in WORK_KINDS:
        assert got[k] == pytest.approx(true[k], rel=1e-6), k
