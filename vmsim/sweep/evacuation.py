"""The host evacuation model: N VMs migrated off one host over one shared link, k at a time.

Question it answers: how long does emptying a host of its VMs take, and how many bytes cross the
link, with free page hinting off, with the seed's walk and with Linux's capture strategy?

Model (an approximation, stated here because the numbers rest on it):

* The VMs are the sweep's ``[fleet]``; they leave in fleet order, ``k`` at a time: a migration
  starts as soon as one of the ``k`` slots is free (a list schedule).
* The link's bandwidth is shared equally among the ``k`` slots: each migration is simulated on
  its own at ``link / k`` (the sweep sets ``migration.bandwidth`` so; the axis
  ``evacuation.concurrency`` carries ``k``). That is the fair share while ``k`` migrations run.
  It is not re-shared when fewer than ``k`` run (at the tail of the evacuation, or while a slot
  waits for nothing), so the tail is pessimistic: the time is an upper estimate for the schedule,
  exact when N is a multiple of k and the migrations are alike. Real links also lose to TCP
  slow start and per-stream overheads that the simulation does not model.
* Migrations do not interact otherwise: one VM's dirtying does not slow another's (separate
  guests), and the host's CPU is not a bottleneck.

The evacuation time is the schedule's makespan; the bytes are the sum of every VM's bytes sent;
the longest downtime is reported too. An evacuation in which a VM's run failed or did not
converge has no time (it did not finish), and says which VM.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def makespan(durations: Sequence[float], k: int) -> float:
    """Time to run the jobs in order on ``k`` slots, each starting when a slot frees."""
    if k < 1:
        raise ValueError("k must be at least 1")
    slots = [0.0] * min(k, max(len(durations), 1))
    heapq.heapify(slots)
    end = 0.0
    for d in durations:
        start = heapq.heappop(slots)
        heapq.heappush(slots, start + d)
        end = max(end, start + d)
    return end


@dataclass(frozen=True, slots=True)
class Evacuation:
    mode: str
    k: int
    sweep_seed: int
    vms: int
    time_s: float | None          # None: a VM did not complete (see problem)
    bytes_sent: int
    max_downtime_s: float
    problem: str | None = None


def evacuations(rows: Sequence[dict[str, Any]], n_vms: int,
                concurrency_key: str = "evacuation.concurrency") -> list[Evacuation]:
    """One evacuation per (hinting mode, k, sweep seed) from a sweep's rows. Other axes, if the
    sweep has them, are part of the group too (each combination is its own evacuation)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    skip = {"point", "point_id", "fleet.vm", "fleet.profile", "fleet.ram"}
    for r in rows:
        other = tuple(sorted((k, str(v)) for k, v in r.items()
                             if "." in k and k not in skip and k != concurrency_key
                             and k != "hinting.mode"))
        mode = r.get("hinting.mode") or r.get("mode")
        groups.setdefault((mode, r[concurrency_key], r["sweep_seed"], other), []).append(r)
    out = []
    for (mode, k, seed, _), members in groups.items():
        members.sort(key=lambda r: r["fleet.vm"])
        problem = None
        if len(members) != n_vms:
            problem = f"{n_vms - len(members)} VMs have no row"
        for r in members:
            if r["status"] != "ok":
                problem = problem or f"VM {r['fleet.vm']} failed: {r['failure']}"
            elif not r["converged"]:
                problem = problem or f"VM {r['fleet.vm']} did not converge"
        ok = [r for r in members if r["status"] == "ok"]
        out.append(Evacuation(
            mode=str(mode), k=int(k), sweep_seed=int(seed), vms=len(members),
            time_s=None if problem else makespan([r["total_time_s"] for r in members], int(k)),
            bytes_sent=sum(int(r["bytes_sent"]) for r in ok),
            max_downtime_s=max((float(r["downtime_s"]) for r in ok), default=0.0),
            problem=problem))
    return out
