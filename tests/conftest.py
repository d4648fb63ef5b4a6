"""Shared pytest set-up. Requirement ids (V-n, D-n, DR-n; docs/requirements.md) are attached
with ``@pytest.mark.spec("D-10")``; ``balloon-hint conformance`` reads them."""
from __future__ import annotations

import os
from typing import Any

from hypothesis import settings

# Hypothesis's per-example deadline (200 ms) is a timing assertion: on a shared or loaded machine
# it fails tests whose logic is fine. Speed belongs in scripts/bench, so no test has a deadline.
settings.register_profile("balloon-hint", deadline=None)
settings.load_profile("balloon-hint")


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--diff-examples", type=int, default=None, metavar="N",
                     help="sequences for tests/vmsim/qtest/test_differential.py (default 200; "
                          "same as BALLOON_HINT_DIFF_EXAMPLES=N)")


def pytest_configure(config: Any) -> None:
    # The differential test reads its example count when it is imported, after this hook.
    n = config.getoption("--diff-examples", None)
    if n is not None:
        if n < 1:
            raise ValueError(f"--diff-examples {n}: must be at least 1")
        os.environ["BALLOON_HINT_DIFF_EXAMPLES"] = str(n)
