"""Measure this machine's QEMU migration costs and fit a host profile
(``balloon-hint fidelity --measure-host``; docs/cost-model.md, "Host profiles").

Theory of operation
-------------------
Two QEMUs under qtest (``vmsim.qtest.QtestMachine``: no guest CPU runs, so nothing dirties
memory and nothing competes with the migration but the machine's own load): a source whose RAM
file is prepared by writing into it, and a destination started with ``-incoming defer``. The
source migrates over a unix socket with ``max-bandwidth`` set far above what the machine can
move, so every second QEMU reports is CPU work (the source reading, testing and sending pages,
the destination receiving them on the same cores), not a rate limit.

Each run's RAM holds a known mix: a fraction ``f`` of its pages random data (normal pages), the
rest zero (zero pages). QEMU reports ``total-time`` and ``setup-time``; the iteration time
(total - setup) is fitted by least squares to ``Z x zero pages + N x normal pages``, which gives
the profile's ``zero_page_s = Z`` and ``copy_page_s = N - Z`` (the wire time of the simulated
link is added by the scenario's bandwidth), and ``log_start_page_s = setup / pages``. The
other constants keep the xeon-2017 values (the fit says which ones it set).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import EnvironmentFailure
from vmsim.qtest import QtestMachine, find_qemu

PAGE = 4096


@dataclass
class HostRun:
    data_fraction: float
    pages: int
    normal: int
    zero: int
    total_ms: float
    setup_ms: float
    transferred: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prepare(path: str, ram_bytes: int, fraction: float, seed: int) -> None:
    m = np.memmap(path, dtype=np.uint8, mode="r+", shape=(ram_bytes,))
    pages = ram_bytes // PAGE
    rng = np.random.default_rng(seed)
    data = rng.random(pages) < fraction
    view = m.reshape(pages, PAGE)
    view[:] = 0
    idx = np.flatnonzero(data)
    for i in range(0, idx.size, 4096):   # 16 MiB of random pages at a time
        sel = idx[i:i + 4096]
        view[sel] = rng.integers(1, 256, size=(sel.size, PAGE), dtype=np.uint8)
    m.flush()
    del m


def migrate_once(ram_bytes: int, fraction: float, seed: int = 1,
                 timeout: float = 300) -> HostRun:
    qemu = find_qemu()
    with QtestMachine(qemu, ram_bytes=ram_bytes) as src, \
            QtestMachine(qemu, ram_bytes=ram_bytes, incoming="defer") as dst:
        _prepare(src.ram_path, ram_bytes, fraction, seed)
        sock = f"{dst.tmpdir}/mig.sock"
        dst.qmp("migrate-incoming", uri=f"unix:{sock}")
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                             "downtime-limit": 300})
        src.qmp("migrate", uri=f"unix:{sock}")
        t0 = time.monotonic()
        while (st := src.qmp("query-migrate")).get("status") not in ("completed", "failed",
                                                                      "cancelled"):
            if time.monotonic() - t0 > timeout:
                raise EnvironmentFailure(f"qtest migration still {st.get('status')}")
            time.sleep(0.05)
        if st["status"] != "completed":
            raise EnvironmentFailure(f"qtest migration {st['status']}: {st.get('error-desc')}")
        ram = st["ram"]
        return HostRun(fraction, ram_bytes // PAGE, int(ram["normal"]), int(ram["duplicate"]),
                       float(st["total-time"]), float(st.get("setup-time", 0)),
                       int(ram["transferred"]))


def fit(runs: list[HostRun]) -> dict[str, float]:
    """Least squares of (total - setup) on (zero pages, normal pages) over the median run of
    each data fraction (a busy machine makes single runs vary by 2-3x); the set-up per page."""
    by_f: dict[float, list[HostRun]] = {}
    for r in runs:
        by_f.setdefault(r.data_fraction, []).append(r)
    med = [sorted(rs, key=lambda r: r.total_ms - r.setup_ms)[len(rs) // 2]
           for rs in by_f.values()]
    a = np.array([[r.zero, r.normal] for r in med], dtype=float)
    y = np.array([(r.total_ms - r.setup_ms) / 1000 for r in med])
    (z, n), *_ = np.linalg.lstsq(a, y, rcond=None)
    # Measured on the project's machine (QEMU 11.1, unix socket, qtest destination): a zero
    # page costs more than a normal one, so copy_page_s comes out negative; only a fit with a
    # non-positive page cost is refused.
    if z <= 0 or n <= 0:
        raise EnvironmentFailure(f"the fit makes no sense (zero page {z:.3g} s, normal page "
                                 f"{n:.3g} s): too few or too noisy runs")
    setup = statistics.median(r.setup_ms / 1000 / r.pages for r in runs)
    return {"zero_page_s": float(z), "copy_page_s": float(n - z), "log_start_page_s": setup}


def measure(ram_bytes: int = 512 << 20, fractions: tuple[float, ...] = (0.0, 0.5, 1.0),
            repeats: int = 3) -> dict[str, Any]:
    runs = [migrate_once(ram_bytes, f, seed=i + 1) for i in range(repeats) for f in fractions]
    values = fit(runs)
    residual = []
    for r in runs:
        pred = (r.zero * values["zero_page_s"]
                + r.normal * (values["zero_page_s"] + values["copy_page_s"]))
        residual.append((r.total_ms - r.setup_ms) / 1000 - pred)
    return {"qemu": find_qemu().name, "ram_bytes": ram_bytes, "profile": values,
            "runs": [r.as_dict() for r in runs],
            "residual_ms": [round(x * 1000, 1) for x in residual]}


def report(result: dict[str, Any]) -> str:
    p = result["profile"]
    lines = [f"host profile measured with {result['qemu']} under qtest, "
             f"{result['ram_bytes'] >> 20} MiB, {len(result['runs'])} migrations:",
             "  data  normal    zero  total ms  setup ms"]
    for r in result["runs"]:
        lines.append(f"  {r['data_fraction']:4.1f} {r['normal']:7d} {r['zero']:7d} "
                     f"{r['total_ms']:9.0f} {r['setup_ms']:9.0f}")
    lines.append(f"  fit: zero_page_s = {p['zero_page_s'] * 1e6:.3f} us, copy_page_s = "
                 f"{p['copy_page_s'] * 1e6:.3f} us, log_start_page_s = "
                 f"{p['log_start_page_s'] * 1e6:.3f} us (residuals ms: "
                 f"{result['residual_ms']})")
    lines.append("  as a profile: " + json.dumps({k: float(f"{v:.4g}") for k, v in p.items()}))
    return "\n".join(lines)


def fit_guest_memory(order: list[list[Any]], *, cores: float = 2.0, busy_threads: float = 3.0,
                     gap_ms: float = 10.0) -> dict[str, float]:
    """``guest_memory_bandwidth`` and ``guest_first_write_s`` of a host profile from one
    init_on_alloc hint round's capture order (``migrate-check --json``: ``capture.order``,
    rows [round, ms since the first hint, guest address, bytes]; docs/cost-model.md, "Host CPU
    contention"). The intervals between consecutive hints of round 1 fall in two groups: blocks
    that had held data (resident on the host: clearing only) and blocks never written since
    boot (every page faulted in on the host), split at ``gap_ms``. Their medians, scaled by the
    vCPU's share of a CPU during the round (``cores`` / ``busy_threads``, at most 1), give the
    clearing speed of 4 MiB and the extra cost per first-written page."""
    rows = [r for r in order if r[0] == 1]
    if len(rows) < 3:
        raise ValueError("need at least 3 hints of round 1 to fit")
    size = int(rows[0][3])
    gaps = [b[1] - a[1] for a, b in zip(rows[:-1], rows[1:], strict=True)]
    fast = [g for g in gaps if g < gap_ms]
    slow = [g for g in gaps if g >= gap_ms]
    if not fast or not slow:
        raise ValueError(f"the intervals do not split at {gap_ms} ms into resident and "
                         "never-written blocks")
    share = min(1.0, cores / busy_threads)
    t_clear = statistics.median(fast) / 1000 * share
    t_first = (statistics.median(slow) - statistics.median(fast)) / 1000 * share
    return {"guest_memory_bandwidth": size / t_clear,
            "guest_first_write_s": t_first / (size // PAGE)}
