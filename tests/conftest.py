"""Shared pytest set-up. Requirement ids (V-n, D-n, DR-n; docs/requirements.md) are attached
with ``@pytest.mark.spec("D-10")``; ``balloon-hint conformance`` reads them."""
from __future__ import annotations

import os
from typing import Any


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
