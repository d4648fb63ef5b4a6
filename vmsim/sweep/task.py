"""What runs on a worker for one point: scenario text in, result row out.

Kept apart from ``vmsim.sweep.run`` so a worker imports the simulator and nothing of the
client's (Dask pickles ``run_point`` by reference: every worker needs balloon-hint installed).
A run that raises is a failed row with the exception's type and message, never an exception
out of the task: Dask then retries only what a dead worker lost, not a run that fails the same
way every time.
"""
from __future__ import annotations

import logging
from typing import Any

from vmsim.scenario import loads

log = logging.getLogger(__name__)


def run_point(scenario_text: str) -> dict[str, Any]:
    """Run one point's scenario in its own hinting mode and seed; the RunResult as a dict plus
    ``status`` (ok / failed) and ``failure``."""
    from vmsim.vm import run_scenario

    try:
        scn = loads(scenario_text, "point")
        res = run_scenario(scn, scn.hinting.mode).as_dict()
    except Exception as e:  # a failed point is recorded, not fatal to the sweep
        log.warning("sweep point failed: %s: %s", type(e).__name__, e)
        return {"status": "failed", "failure": f"{type(e).__name__}: {e}"}
    return {**res, "status": "ok", "failure": None}
