"""A random migration campaign: many generated scenarios, each migrated and verified, counted by
outcome (issue 15 item 10).

    scripts/campaign --n N --seed S [--fault NAME] [--keep DIR] [--json PATH] [--jobs J]

``generate(rng)`` writes one scenario as TOML text (so the loader checks it like a user's file):
a guest of 64-512 MiB (small, so a hundred runs fit in the test suite), 0-3 set-up phases
(``fill``, ``fill_free``, ``idle``), 0-2 background workloads (``dirty``, ``churn``) at rates
of 1% to 5 times guest RAM per second, random ``init_on_alloc``, ``init_on_free``,
``page_poison``, vCPUs, runnable threads, hinting mode, ``min_order``, hint block cost,
bandwidth, downtime limit, round limit and time limit. ``run_one`` migrates it with
``vmsim.vm.run_scenario`` and sorts the result into one outcome:

* ``verified``: the destination equals the source for every page in use;
* ``time limit``: the migration did not converge within ``migration.time_limit`` (the engine
  cancelled it; nothing verified) -- an answer, not a failure;
* ``work bound``: ``SimulationTooLong`` (the run passed ``MAX_SIM_COST``) -- likewise;
* ``known: walk loses poison (item 6)``: the seed's walk with page poisoning failed only on
  poison, and every violation is on a page the walk hinted (``poison_violations_from_hints``):
  hinted free pages reach the destination as zeros, the seed's documented loss (issue 15
  item 6). ``page_poison`` with ``init_on_free`` has no category of its own any more: since
  issue 15 item 5 poisoning takes precedence as in Linux, and such a run must verify;
* ``UNEXPLAINED``: any other verification failure; ``crash``: any exception. Both make the
  campaign fail; their scenario files are written to ``--keep`` for replay.

With ``--fault`` (a faulty host, ``vmsim.vm.FAULTS``) a run is sorted by what the fault could do:
``accept-stale-hints`` acts only when a stale hint took a page out of a round
(``stale_pages_skipped`` > 0); ``caught`` when verification then found mismatched pages,
``acted, nothing lost`` when every page so skipped was free at switchover or sent again in a
later round (the verifier checked every page in use), ``nothing to act on`` otherwise. A catch
with more mismatched pages than stale hints skipped is unexplained: the fault cannot lose a
page it did not skip. A
verification failure on a run where the fault did not act is classified as without the fault.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from vmsim.report import RunResult
from vmsim.scenario import HINT_MODES, loads
from vmsim.vm import FAULTS, MAX_SIM_COST, SimulationTooLong, run_scenario

VERIFIED = "verified"
TIME_LIMIT = "time limit (did not converge; nothing to verify)"
WORK_BOUND = "work bound (SimulationTooLong)"
KNOWN_ITEM6 = "known: the seed's walk loses poison on hinted pages (issue 15 item 6)"
UNEXPLAINED = "UNEXPLAINED verification failure"
CRASH = "crash"
CAUGHT = "fault caught (verification failed)"
ACTED_NO_LOSS = "fault acted, nothing lost (verified)"
NOTHING_TO_ACT = "fault had nothing to act on"
FAILURES = (UNEXPLAINED, CRASH)


def _mib(rng: random.Random, lo: float, hi: float, ram_mib: int) -> str:
    return f"{max(1, int(ram_mib * rng.uniform(lo, hi)))}MiB"


def generate(rng: random.Random, index: int, stale_window: bool = False) -> str:
    """One random scenario as TOML text. ``stale_window`` draws from the family where hints can
    still be queued at a bitmap sync (the seed's walk, slow per block, over fragmented free
    lists, while memory churns: built-in ``churn-walk`` is one), the only place the
    accept-stale-hints fault can act; the rest of the draw stays random."""
    # A slow walk over fragmented lists costs events per free block: small guests keep a
    # hundred runs within the test suite's budget.
    ram = rng.choice([64, 96, 128] if stale_window else [64, 64, 96, 128, 128, 192, 256, 384,
                                                          512])
    lines = [f'name = "campaign-{index}"', "", "[guest]", f'ram = "{ram}MiB"',
             f"seed = {rng.randrange(2**32)}", f"vcpus = {rng.randint(1, 8)}",
             f"runnable = {rng.choice([0, 0, 1, 4, 16])}"]
    for key in ("init_on_alloc", "init_on_free", "page_poison"):
        lines.append(f"{key} = {'true' if rng.random() < 0.3 else 'false'}")
    budget = 0.85  # fraction of RAM the fills may take together (the kernel holds the rest)
    if stale_window:  # thousands of small free blocks for a slow walk
        frac = rng.uniform(0.3, 0.6)
        budget -= frac * 0.7
        lines += ["", "[[workload]]", 'kind = "fill_free"', f'size = "{int(ram * frac)}MiB"',
                  f"keep = {rng.uniform(0.3, 0.7):.3f}"]
    for _ in range(rng.randint(0, 3)):
        kind = rng.choice(["fill", "fill", "fill_free", "idle"])
        lines += ["", "[[workload]]", f'kind = "{kind}"']
        if kind == "idle":
            lines.append(f'duration = "{rng.choice([0, 10, 100, 1000])}ms"')
            continue
        frac = rng.uniform(0.02, max(0.02, min(0.6, budget)))
        if budget - frac < 0.05:
            frac = 0.02
        budget -= frac if kind == "fill" else 0
        lines.append(f'size = "{max(1, int(ram * frac))}MiB"')
        if kind == "fill" and rng.random() < 0.3:
            lines.append(f"order = {rng.randint(0, 10)}")
        if kind == "fill_free":
            lines.append(f"keep = {rng.uniform(0, 1):.3f}")
    during = ["churn"] if stale_window else []
    during += [rng.choice(["dirty", "churn"]) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
    for kind in during[:2]:
        rate = ram * rng.choice([0.01, 0.05, 0.2, 1.0, 5.0]) * rng.uniform(0.5, 1.0)
        lines += ["", "[[workload]]", f'kind = "{kind}"', "during = true",
                  f'rate = "{max(1, int(rate))}MiB/s"']
        if kind == "dirty" and rng.random() < 0.5:
            lines.append(f'working_set = "{_mib(rng, 0.01, 0.5, ram)}"')
        if kind == "churn":
            if rng.random() < 0.5:
                lines.append(f'lifetime = "{rng.choice([50, 200, 500, 2000, 10000])}ms"')
            if rng.random() < 0.5:
                lines.append(f'footprint = "{_mib(rng, 0.02, 0.3, ram)}"')
    bandwidth = rng.choice([1, 2.5, 10] if stale_window else [1, 2.5, 10, 25, 100])
    downtime = rng.choice([1, 5, 30] if stale_window else [1, 5, 30, 300, 1000])
    lines += ["", "[migration]", f'bandwidth = "{bandwidth}Gbit/s"',
              f'downtime_limit = "{downtime}ms"', f"max_rounds = {rng.randint(1, 40)}"]
    if rng.random() < 0.3:
        lines.append(f'time_limit = "{rng.choice([1, 10, 60, 600])}s"')
    mode = "walk" if stale_window else rng.choice(HINT_MODES)
    min_order = rng.randint(0, 2) if stale_window else rng.randint(0, 10)
    lines += ["", "[hinting]", f'mode = "{mode}"', f"min_order = {min_order}"]
    if stale_window or rng.random() < 0.3:
        costs = [50, 200, 500, 2000] if stale_window else [1, 5, 50, 200, 500]
        lines.append(f'block_cost = "{rng.choice(costs)}us"')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    outcome: str
    mode: str
    detail: str
    wall_s: float
    cpu_s: float  # the machine may be shared: CPU time says what the run itself cost


def classify(r: RunResult, text: str, fault: str | None) -> str:
    scn = loads(text, "campaign.toml")
    g = scn.guest
    if r.error is not None:
        return TIME_LIMIT
    walk_poison = (r.mismatched_pages == 0 and r.poison_violations > 0
                   and r.poison_violations == r.poison_violations_from_hints)
    if r.verified:
        base = VERIFIED
    elif walk_poison and g.page_poison and r.mode == "walk":
        base = KNOWN_ITEM6
    else:
        base = UNEXPLAINED
    if fault == "accept-stale-hints":
        if r.stale_pages_skipped == 0:  # no stale hint skipped a page: the host acted correctly
            return NOTHING_TO_ACT if base == VERIFIED else base
        if r.mismatched_pages > 0:
            # Caught, if the fault explains the loss: a page can only be lost to it if one of
            # its stale hints skipped that page. More lost pages than that is another bug.
            return CAUGHT if r.mismatched_pages <= r.stale_pages_skipped else UNEXPLAINED
        return ACTED_NO_LOSS if base == VERIFIED else base
    return base


def run_one(index: int, text: str, fault: str | None,
            max_cost: float = MAX_SIM_COST) -> Outcome:
    t0, c0 = time.perf_counter(), time.process_time()
    scn = loads(text, f"campaign-{index}.toml")
    try:
        r = run_scenario(scn, scn.hinting.mode, fault=fault, max_cost=max_cost)
    except SimulationTooLong as e:
        return Outcome(index, WORK_BOUND, scn.hinting.mode, str(e), time.perf_counter() - t0,
                       time.process_time() - c0)
    except Exception:  # noqa: BLE001 - the campaign's job is to find these
        return Outcome(index, CRASH, scn.hinting.mode, traceback.format_exc(limit=8),
                       time.perf_counter() - t0, time.process_time() - c0)
    out = classify(r, text, fault)
    detail = (f"mismatched {r.mismatched_pages}, poison violations {r.poison_violations}, "
              f"stale hints applied {r.stale_hints_applied} (pages {r.stale_pages_skipped}), "
              f"rounds {r.rounds}")
    return Outcome(index, out, scn.hinting.mode, detail, time.perf_counter() - t0,
                   time.process_time() - c0)


def _run_star(args: tuple[int, str, str | None, float]) -> Outcome:
    return run_one(*args)


def run_campaign(n: int, seed: int, fault: str | None = None, keep: Path | None = None,
                 progress: bool = False, max_cost: float = MAX_SIM_COST,
                 jobs: int = 1) -> list[Outcome]:
    """Generate and run ``n`` scenarios. The scenarios are drawn in order from one generator,
    and each run is a pure function of its file, so ``jobs`` > 1 (worker processes) gives the
    same outcomes as one."""
    rng = random.Random(seed)
    # with a fault, every other scenario comes from the family where it can act
    texts = [generate(rng, i, stale_window=fault is not None and i % 2 == 0) for i in range(n)]
    work = [(i, text, fault, max_cost) for i, text in enumerate(texts)]
    out: list[Outcome] = []
    pool = multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else None
    try:
        results = pool.imap(_run_star, work) if pool else map(_run_star, work)
        for o in results:
            out.append(o)
            if keep is not None and o.outcome in FAILURES:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"campaign-{seed}-{o.index}.toml").write_text(texts[o.index],
                                                                      encoding="utf-8")
            if progress:
                print(f"\r{len(out)}/{n}", end="", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress:
        print(file=sys.stderr)
    return out


def summary(outcomes: list[Outcome], n: int, seed: int, fault: str | None) -> str:
    counts = Counter(o.outcome for o in outcomes)
    wall = sum(o.wall_s for o in outcomes)
    cpu = sum(o.cpu_s for o in outcomes)
    head = f"campaign --n {n} --seed {seed}" + (f" --fault {fault}" if fault else "")
    slowest = max(outcomes, key=lambda o: o.cpu_s)
    lines = [f"{head}: {len(outcomes)} scenarios, {cpu:.0f} s CPU / {wall:.0f} s wall "
             f"(slowest: #{slowest.index}, {slowest.cpu_s:.1f} s CPU / {slowest.wall_s:.1f} s "
             "wall)"]
    for name, k in counts.most_common():
        lines.append(f"  {k:6d}  {name}")
    by_mode = Counter((o.mode, o.outcome) for o in outcomes)
    lines.append("  by mode: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {o}" for (mm, o), k in sorted(by_mode.items()) if mm == m)
        for m in HINT_MODES))
    for o in outcomes:
        if o.outcome in FAILURES:
            lines.append(f"  #{o.index} {o.outcome} ({o.mode}): {o.detail.strip()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="scenarios to generate and run")
    ap.add_argument("--seed", type=int, default=1, help="the campaign's seed")
    ap.add_argument("--fault", choices=FAULTS, default=None, help="run a faulty host")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the scenario files of failed runs here")
    ap.add_argument("--json", type=Path, default=None, help="write every outcome as JSON")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes (the outcomes do not depend on it)")
    ap.add_argument("--max-cost", type=float, default=MAX_SIM_COST,
                    help="each run's work bound (vmsim.vm.MAX_SIM_COST; lower: faster, more "
                    "runs end as 'work bound')")
    args = ap.parse_args(argv)
    # Each run's own warnings (a migration cancelled by its time limit, guest faults) are
    # counted in the outcomes; printed, they would bury the summary.
    logging.basicConfig(level=logging.ERROR)
    if args.n < 1:
        ap.error("--n must be at least 1")
    outcomes = run_campaign(args.n, args.seed, args.fault, args.keep,
                            progress=sys.stderr.isatty(), max_cost=args.max_cost,
                            jobs=max(1, args.jobs))
    print(summary(outcomes, args.n, args.seed, args.fault))
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1),
                             encoding="utf-8")
    return 1 if any(o.outcome in FAILURES for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
