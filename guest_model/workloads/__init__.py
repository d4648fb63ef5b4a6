"""Seeded guest workloads: what a guest does with its memory before and during a migration.

Theory of operation
-------------------
A workload allocates pages from the guest's ``BuddyAllocator``, writes them through
``PageVersions`` (every write gives the page a new version and marks the dirty log, so the
migration verifier sees it) and frees them. Allocation itself initialises pages when the
allocator has ``init_on_alloc`` (a "zero" write), freeing poisons or zeroes them when configured:
that is the allocator's job, not the workload's.

Every workload runs in one of two ways:

* ``run_phase()``: to completion at once, before migration, without simulated time (fill memory,
  build a page cache, churn for ``duration`` seconds of the workload's own time, ...);
* ``start(sched, until=None)``: as background activity on the VM's ``Scheduler``: every ``tick``
  seconds of simulated time ``step(now, dt)`` does the work its rates give for ``dt`` (bytes/s
  and ops/s turn into pages per tick, with Poisson counts from the seeded generator), so its
  allocations and writes land between the hint walk's reports and the host's page sends.
  ``stop()`` ends it; a workload with a natural end (``fill`` reached its size) stops itself.

Parameters with units are plain numbers: sizes in bytes, rates in bytes/s or operations/s,
times in seconds. Sizes may also be given as a fraction of RAM (``size_fraction``).

Small amounts go through ``alloc_pages`` / ``free_pages`` (per-cpu lists, cpus chosen at
random), large ones through the allocator's bulk calls so a 64 GiB fill stays fast.

"In use" for the migration verifier: ``allocator.in_use_mask()`` (pages in state ``PG_ALLOC``:
held by workloads or anyone but the balloon driver). Each workload also keeps its own holdings
(``held_pages()``).

Modules: ``base`` (``Workload``: scheduling, counters, page helpers), ``simple`` (idle, fill,
page_cache, memhog_then_free / fill_free, dirty), ``churn``.

Registry: ``WORKLOADS[name](allocator, pages, *, seed=0, tick=0.01, **params)`` builds one;
``make_workload(name, allocator, pages, seed=..., **params)`` does the same with a usage error
naming an unknown workload or parameter.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from guest_model.buddy import BuddyAllocator
from guest_model.workloads.base import SMALL, PageSet, Workload
from guest_model.workloads.churn import Churn
from guest_model.workloads.simple import Dirty, Fill, FillFree, Idle, MemhogThenFree, PageCache
from guestmem.pages import PageVersions
from protocol.errors import UsageError

__all__ = [
    "SMALL", "WORKLOADS", "Churn", "Dirty", "Fill", "FillFree", "Idle", "MemhogThenFree",
    "PageCache", "PageSet", "Workload", "WorkloadFactory", "make_workload", "workload_params",
]

WorkloadFactory = Callable[..., Workload]
WORKLOADS: dict[str, WorkloadFactory] = {
    cls.name: cls for cls in (Idle, Fill, PageCache, Churn, MemhogThenFree, FillFree, Dirty)
}


def workload_params(name: str) -> list[str]:
    """The parameter names a workload accepts (besides allocator, pages)."""
    sig = inspect.signature(WORKLOADS[name])
    return [p for p in sig.parameters if p not in ("allocator", "pages")]


def make_workload(name: str, allocator: BuddyAllocator, pages: PageVersions | None = None, *,
                  seed: int = 0, **params: Any) -> Workload:
    """Build workload ``name`` from scenario parameters; a usage error names the bad key."""
    if name not in WORKLOADS:
        raise UsageError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    known = set(workload_params(name))
    for k in params:
        if k not in known:
            raise UsageError(f"workload {name!r}: unknown parameter {k!r}; "
                             f"known: {', '.join(sorted(known))}")
    return WORKLOADS[name](allocator, pages, seed=seed, **params)
