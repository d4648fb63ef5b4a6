"""Scenario files: a TOML description of one simulated VM and one migration, loaded and checked.

A scenario looks like this (sizes, rates and durations take units)::

    name = "compile-8g"
    description = "8 GiB guest compiling a kernel"

    [guest]
    ram = "8GiB"            # K/M/G/T and KiB.. are powers of 1024; KB/MB/GB/TB powers of 1000
    seed = 1
    init_on_alloc = false
    init_on_free = false
    page_poison = false
    vcpus = 4
    boot_footprint = "96MiB"  # kernel held at boot, besides the memmap
    boot_free_dirty = "9MiB"  # free memory still holding data after boot
    runnable = 4            # threads the workloads keep runnable (make -j4)
    kernel_data = false     # the allocator's bookkeeping written in RAM (zone, memmap)

    [[workload]]            # phases run one after the other before migration starts
    kind = "fill"
    size = "2GiB"

    [[workload]]            # background activity while pre-copy runs
    kind = "churn"
    during = true
    rate = "300MiB/s"

    [migration]
    bandwidth = "100Gbit/s"
    downtime_limit = "400ms"
    max_rounds = 30
    time_limit = "1h"       # cancel a migration not over by then (simulated; the default)

    [hinting]
    mode = "capture"        # off | walk | capture
    min_order = 10          # smallest block the walk hints
    alloc_cost = "1.5us"    # guest time per captured block, and per block posted ...
    post_cost = "3.5us"
    walk_cost = "1us"       # ... per block the walk visits
    memory_bandwidth = "10GB/s"  # init_on_alloc zeroing of a captured block
    # block_cost = "5us"    # one flat guest time per block instead of the four above

    [host]
    profile = "xeon-2017"   # per-page costs of the host's QEMU (balloon_dev.host.profiles)
    dirty_log = "exact"     # or "qemu-7.2-tcg": QEMU 7.2 under TCG, which loses writes
    # cores = 2                      # host CPUs the VM's threads share (default: the profile's)
    # guest_memory_bandwidth = "4GB/s"  # a vCPU's memory clearing speed here (the profile's)
    # guest_first_write = "30us"     # host fault on a vCPU's first write to a page (the profile's)
    # poller_cpus = 1                # CPUs migrate-check's hint poller holds in hinted runs

Theory of operation: ``tomllib`` parses the text (a syntax error carries its own line); then a
schema walk checks every table and key: unknown keys, wrong types, bad units and out-of-range
values raise ``ScenarioError`` naming the file, the dotted key (``workload[2].rate``) and its
line. ``tomllib`` keeps no positions, so ``_KeyLines`` scans the text once and records the line of
each ``[table]`` / ``[[array]]`` header and of each ``key =`` (or dotted ``a.b =``) inside it.

Limits a file cannot exceed (each refused with the same kind of error): numbers must be finite
(TOML's ``inf``/``nan`` and ``"1e400GiB"`` are refused), guest RAM is at most ``MAX_GUEST_RAM``
(1 TiB), a workload's rate at most ``MAX_WORKLOAD_RATE`` (1 TiB/s) and at most
``MAX_RATE_PER_RAM`` (100) times the guest's RAM per second, an idle phase at most 24 hours
simulated, the seed fits in 64 bits,
the first pre-copy round (guest RAM / ``migration.bandwidth``) takes at most
``MAX_FIRST_ROUND_S`` (1 hour simulated) and ``migration.time_limit`` is at most
``MAX_TIME_LIMIT_S`` (24 hours simulated); the reasons are given where the constants are.
Inline tables and dotted keys are valid TOML and are checked the same way; their errors point at
the line that assigns them.

Workload kinds and their keys are listed in ``WORKLOAD_KINDS``; their meaning lives in
``vmsim.vm`` which turns them into guest-model activity.
"""
from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from balloon_dev.host.profiles import PROFILES
from guestmem.dirty import DIRTY_LOGS
from protocol.errors import UsageError

HINT_MODES = ("off", "walk", "capture")


#: A scenario file is a page of TOML; a bigger one is a mistake (a log, an image, /dev/zero), and
#: reading it whole first would be the only cost that grows without bound.
MAX_FILE_BYTES = 1 << 20
#: An error message stays one readable line: a value echoed from a file (a 1 MB string, a key
#: with a newline in it) is escaped and cut to this many characters.
_MAX_MESSAGE = 400
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _one_line(text: str) -> str:
    """Control characters escaped (a key may hold a newline), long texts cut in the middle."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE - 100] + " ... " + text[-95:]
    return text


class ScenarioError(UsageError):
    """A bad scenario file: the message names the file, the key and the line, on one line (the
    CLI prints it and exits 2, as for any ``UsageError``)."""

    def __init__(self, file: str, key: str | None, line: int | None, msg: str) -> None:
        where = _one_line(file) + (f":{line}" if line else "")
        what = f"key '{_one_line(key)}': " if key else ""
        super().__init__(f"{where}: {what}{_one_line(msg)}")
        self.file = file
        self.key = key
        self.line = line
        self.msg = msg


# -- units ------------------------------------------------------------------------------------
_NUM = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)"
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_RATE_UNITS = {  # bytes per second
    "b/s": 1, "bit/s": 1 / 8, "bps": 1 / 8,
    "kbit/s": 1e3 / 8, "mbit/s": 1e6 / 8, "gbit/s": 1e9 / 8, "tbit/s": 1e12 / 8,
    "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8, "tbps": 1e12 / 8,
    "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12,
    # The T units too: sizes have them, and MAX_WORKLOAD_RATE's error names "1 TiB/s".
    "kib/s": 1 << 10, "mib/s": 1 << 20, "gib/s": 1 << 30, "tib/s": 1 << 40,
}
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0,
               "h": 3600.0}


class UnitError(UsageError, ValueError):
    """A size, rate or duration that cannot be read (a ``ValueError`` too, so argparse
    ``type=`` converters report it as a bad argument)."""


def _split(text: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*(-?)\s*" + _NUM + r"\s*([A-Za-zµ/]*)\s*", text)
    if not m:
        raise UnitError(f"{text!r} is not a number with a unit")
    if m.group(1):
        raise UnitError(f"{text!r} is negative")
    num = float(m.group(2))
    if not math.isfinite(num):  # "1e400GiB": float() says inf, and int(inf) would raise
        raise UnitError(f"{text!r} is too large")
    return num, m.group(3)


def parse_size(value: str | int) -> int:
    """Bytes: ``"8GiB"``, ``"8G"`` (binary, as QEMU's -m), ``"8GB"`` (decimal), or an int."""
    if isinstance(value, bool):
        raise UnitError("a size must be a string with a unit or an integer")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(f"{value} is negative")
        return value
    num, unit = _split(value)
    mult = _SIZE_UNITS.get(unit.lower())
    if mult is None:
        raise UnitError(f"unknown size unit {unit!r} in {value!r} (use KiB, MiB, GiB, TiB, "
                        "K, M, G, T, KB, MB, GB, TB)")
    out = num * mult
    if not math.isfinite(out):  # "1e308TiB": the number is finite, the bytes are not
        raise UnitError(f"{value!r} is too large")
    if out != int(out):
        raise UnitError(f"{value!r} is not a whole number of bytes")
    return int(out)


def parse_rate(value: str) -> float:
    """Bytes per second: ``"10Gbit/s"``, ``"100Gbps"``, ``"1.25GB/s"``, ``"500MiB/s"``."""
    if not isinstance(value, str):
        raise UnitError("a rate must be a string with a unit, e.g. \"10Gbit/s\"")
    num, unit = _split(value)
    mult = _RATE_UNITS.get(unit.lower())
    if mult is None:
        raise UnitError(f"unknown rate unit {unit!r} in {value!r} (use Gbit/s, Mbit/s, Gbps, "
                        "GB/s, MB/s, GiB/s, MiB/s, ...)")
    out = num * mult
    if not math.isfinite(out):  # "1e308TiB/s" is an infinite bandwidth: every round takes 0 s
        raise UnitError(f"{value!r} is too large")
    return out


def parse_duration(value: str | int | float) -> float:
    """Seconds: ``"300ms"``, ``"1.5s"``, ``"50us"``, ``"2h"``; a bare number is seconds."""
    if isinstance(value, bool):
        raise UnitError("a duration must be a string with a unit")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):  # TOML has inf and nan
            raise UnitError(f"{value} is not a finite number of seconds")
        if value < 0:
            raise UnitError(f"{value} is negative")
        return float(value)
    num, unit = _split(value)
    mult = _TIME_UNITS.get(unit.lower() if unit != "µs" else unit)
    if mult is None:
        raise UnitError(f"unknown time unit {unit!r} in {value!r} (use ns, us, ms, s, min, h)")
    out = num * mult
    if not math.isfinite(out):  # "1e308h"
        raise UnitError(f"{value!r} is too large")
    return out


def format_size(n: float) -> str:
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n:.0f} B"


# -- the schema -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GuestSpec:
    ram_bytes: int
    seed: int = 1
    init_on_alloc: bool = False
    init_on_free: bool = False
    page_poison: bool = False
    vcpus: int = 2
    #: What the booted kernel holds, in use (image, slab, early allocations); the memmap
    #: (struct pages, 1/64 of RAM) comes on top. None: ``vmsim.vm.KERNEL_BASE_BYTES``.
    boot_footprint: int | None = None
    #: Free memory that still holds data after boot (pages the kernel and init used and
    #: freed). None: ``vmsim.vm.BOOT_FREE_DIRTY_BYTES``, measured on the lab's guest.
    boot_free_dirty: int | None = None
    #: Threads the workloads keep runnable on the vCPUs (``make -j4``: 4); the balloon
    #: driver's work item shares the vCPUs with them.
    runnable: int = 0
    #: The kernel's allocator bookkeeping (zone, per-CPU counters, memmap) is written in RAM by
    #: every allocation and free (``guest_model.kernel_data``).
    kernel_data: bool = False


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    kind: str
    during: bool
    params: dict[str, Any]
    line: int | None = None


@dataclass(frozen=True, slots=True)
class MigrationSpec:
    bandwidth_Bps: float = 100e9 / 8
    downtime_limit_s: float = 0.3
    max_rounds: int = 30
    time_limit_s: float | None = None  # None: the engine's own budget (MigrationParams)
    rate_limited: bool = False  # bandwidth is QEMU's max-bandwidth throttle (MigrationParams)
    chunk_pages: int | None = None  # send-cursor step (MigrationParams.chunk_pages); None: its own


@dataclass(frozen=True, slots=True)
class HintingSpec:
    mode: str = "capture"
    min_order: int = 10
    block_cost_s: float | None = None  # flat guest time per hint block (replaces the below)
    alloc_cost_s: float | None = None  # per captured block: alloc_pages(order 10)
    post_cost_s: float | None = None   # per posted block: descriptor and kick
    walk_cost_s: float | None = None   # per walked block: the free-list visit
    memory_bandwidth_Bps: float | None = None  # init_on_alloc zeroing speed


#: Host profiles (``[host] profile``): per-page costs of a host's QEMU, in
#: ``balloon_dev.host.profiles.PROFILES``.
@dataclass(frozen=True, slots=True)
class HostSpec:
    profile: str = "xeon-2017"
    #: How the host's dirty log records the guest's writes (``guestmem.dirty.DIRTY_LOGS``).
    dirty_log: str = "exact"
    #: Override the profile's: host CPUs shared by the VM's threads (0: no contention), and
    #: the speed a vCPU clears memory at on this host. None: the profile's value.
    cores: int | None = None
    guest_memory_bandwidth_Bps: float | None = None
    #: Override the profile's cost of a vCPU's first write to a page the host has not backed.
    guest_first_write_s: float | None = None
    #: Host CPUs a hinted run loses to ``migrate-check``'s hint capture poller (a real-time
    #: spinner for the whole migration, vmsim/hint_capture.py; runs without hints have none):
    #: taken from ``cores`` when hinting is on, so the figures compare with the lab's runs.
    poller_cpus: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    source: str
    guest: GuestSpec
    workloads: tuple[WorkloadSpec, ...] = ()
    migration: MigrationSpec = MigrationSpec()
    hinting: HintingSpec = HintingSpec()
    host: HostSpec = HostSpec()
    published: dict[str, float] = field(default_factory=dict)  # fidelity reference, ms
    measured: dict[str, float] = field(default_factory=dict)   # figures measured here
    # the same figures from `migrate --host qemu` (two QEMUs under qtest, the simulated guest)
    measured_qtest: dict[str, float] = field(default_factory=dict)

    @property
    def setup_workloads(self) -> tuple[WorkloadSpec, ...]:
        return tuple(w for w in self.workloads if not w.during)

    @property
    def during_workloads(self) -> tuple[WorkloadSpec, ...]:
        return tuple(w for w in self.workloads if w.during)


# A field: (converter, default). Converters raise UnitError/TypeError with a reason.
Conv = Callable[[Any], Any]


def _int(lo: int, hi: int | None = None) -> Conv:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"expected an integer, got {type(v).__name__} {v!r}")
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise UnitError(f"{v} is out of range (must be {rng})")
        return v
    return conv


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {type(v).__name__} {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__} {v!r}")
    return v


def _choice(*options: str) -> Conv:
    def conv(v: Any) -> str:
        _str(v)
        if v not in options:
            raise UnitError(f"{v!r} is not one of {', '.join(options)}")
        return v
    return conv


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {type(v).__name__} {v!r}")
    if not 0 <= v <= 1:
        raise UnitError(f"{v} is not a fraction in [0, 1]")
    return float(v)


def _positive(conv: Conv) -> Conv:
    def wrapped(v: Any) -> Any:
        out = conv(v)
        if out <= 0:
            raise UnitError(f"{v!r} must be more than zero")
        return out
    return wrapped


def _size(v: Any) -> int:
    if isinstance(v, float):
        raise TypeError("expected a size such as \"4GiB\", got a float")
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise TypeError(f"expected a size such as \"4GiB\", got {type(v).__name__}")
    return parse_size(v)


def _rate(v: Any) -> float:
    if not isinstance(v, str):
        raise TypeError(f"expected a rate such as \"10Gbit/s\", got {type(v).__name__}")
    return parse_rate(v)


def _duration(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise TypeError(f"expected a duration such as \"300ms\", got {type(v).__name__}")
    return parse_duration(v)


_TOP = {"name": _str, "description": _str}
#: The simulator keeps a few bytes of state per 4 KiB page: 1 TiB is 256 Mi pages, already more
#: than a workstation holds; beyond it a run would die of MemoryError instead of a clear error.
MAX_GUEST_RAM = 1 << 40


def _ram(v: Any) -> int:
    out = _positive(_size)(v)
    if out > MAX_GUEST_RAM:
        raise UnitError(f"{v!r} is more than the simulator supports ({format_size(MAX_GUEST_RAM)})")
    return int(out)


_GUEST = {"ram": _ram, "seed": _int(0, 2**64 - 1), "init_on_alloc": _bool,
          "init_on_free": _bool, "page_poison": _bool, "vcpus": _int(1, 64),
          "boot_footprint": _size, "boot_free_dirty": _size, "runnable": _int(0, 4096),
          "kernel_data": _bool}
#: A scenario's first pre-copy round sends every page of guest RAM; at the scenario's bandwidth
#: that alone takes at least guest RAM / bandwidth of simulated time (all pages as data; zero
#: pages go faster). The guest's background workloads tick every 5-20 ms of simulated time, so
#: one simulated hour is already 180,000-720,000 steps of each, minutes of wall time; a link
#: slow enough for more (e.g. "1bit/s", or 8 GiB over 10 Mbit/s) made `migrate` run for ever.
#: No live migration whose bulk pass takes over an hour is run in practice either: one raises
#: the bandwidth or uses post-copy. Hence the bound: 1 hour simulated, the same hour as the
#: engine's default time budget for the whole migration (``MigrationParams.time_budget_s``),
#: so a scenario refused here is one that could never finish within that budget anyway.
MAX_FIRST_ROUND_S = 3600.0
#: ``migration.time_limit`` (the engine's safety budget for the whole migration, default
#: 1 hour): at most a day of simulated time, for the same reason (steps of the background
#: workloads grow with simulated time).
MAX_TIME_LIMIT_S = 86400.0


def _chunk(v: Any) -> int:
    out = int(_positive(_size)(v))
    if out % 4096 or not 1 << 12 <= out <= 1 << 30:
        raise UnitError(f"{v!r}: whole 4 KiB pages, from 4 KiB to 1 GiB")
    return out >> 12


def _time_limit(v: Any) -> float:
    out = float(_positive(_duration)(v))
    if out > MAX_TIME_LIMIT_S:
        raise UnitError(f"{v!r} is longer than the simulator allows (24 h simulated)")
    return out


_MIGRATION = {"bandwidth": _positive(_rate), "downtime_limit": _positive(_duration),
              "max_rounds": _int(1, 10000), "time_limit": _time_limit,
              "rate_limited": _bool, "chunk": _chunk}
_HINTING = {"mode": _choice(*HINT_MODES), "min_order": _int(0, 10),
            "block_cost": _positive(_duration), "alloc_cost": _positive(_duration),
            "post_cost": _positive(_duration), "walk_cost": _positive(_duration),
            "memory_bandwidth": _positive(_rate)}
_HOST = {"profile": _choice(*PROFILES), "dirty_log": _choice(*DIRTY_LOGS),
         "cores": _int(0, 4096), "guest_memory_bandwidth": _positive(_rate),
         "guest_first_write": _duration, "poller_cpus": _int(0, 4096)}


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):  # TOML has inf and nan; nan would pass every range check
        raise UnitError(f"{v} is not a finite number")
    return float(v)


# Published total migration times this scenario reproduces (docs/cost-model.md), milliseconds.
_PUBLISHED = {"without_hints_ms": _positive(_num), "with_hints_ms": _positive(_num)}
# Figures measured on this project's machine for the same set-up (balloon-hint fidelity's
# second table; docs/cost-model.md says how): bytes and page counts of QEMU's query-migrate.
def _nonneg_num(v: Any) -> float:
    out = _num(v)
    if out < 0:
        raise UnitError(f"{v} is negative")
    return out


_MEASURED: dict[str, Conv] = {
    f"{k}_{m}": _positive(_num) if k in ("transferred_bytes", "total_ms") else _nonneg_num
    for k in ("transferred_bytes", "normal_pages", "zero_pages", "total_ms")
    for m in ("off", "hints")}
_MEASURED["runs"] = _int(1, 1_000_000)
# optional: QEMU's downtime (ms), a per-phase figure beside the totals
_MEASURED.update({f"downtime_ms_{m}": _nonneg_num for m in ("off", "hints")})


#: The simulator's work grows with a workload's rate (pages allocated or written per simulated
#: second): at 1 TiB/s, already faster than any memory system, a 64 MiB guest takes seconds; a
#: rate far above it makes a run allocate arrays no machine holds (MemoryError) or never end.
MAX_WORKLOAD_RATE = float(1 << 40)


def _workload_rate(v: Any) -> float:
    out = float(_positive(_rate)(v))
    if out > MAX_WORKLOAD_RATE:
        raise UnitError(f"{v!r} is faster than the simulator supports (1 TiB/s)")
    return out


#: A workload that allocates or rewrites more than 100 times the guest's RAM per simulated
#: second asks for more than any memory system delivers (a 256 MiB guest at 1 TiB/s would
#: rewrite each page 4,000 times a second; DRAM bandwidth is tens of GiB/s for a whole host),
#: and the simulator's work grows with the rate: such a file is a typo, refused up front.
MAX_RATE_PER_RAM = 100


def _idle_duration(v: Any) -> float:
    out = float(_duration(v))
    if out > MAX_TIME_LIMIT_S:  # the clock would be past anything a tick can still move
        raise UnitError(f"{v!r} is longer than the simulator allows (24 h simulated)")
    return out


# Workload kinds: key -> converter. "kind" and "during" are common to all.
WORKLOAD_KINDS: dict[str, dict[str, Conv]] = {
    # allocate and write ``size`` of memory that stays in use (anonymous memory, page cache)
    "fill": {"size": _size, "order": _int(0, 10)},
    # allocate ``size`` and write it, then free it again (memhog's pattern); ``keep`` leaves a
    # random fraction of the pages allocated (partly reclaimed memory: fragmented free lists)
    "fill_free": {"size": _size, "keep": _fraction},
    # rewrite pages already in use, ``rate`` bytes per second, spread over ``working_set``
    "dirty": {"rate": _workload_rate, "working_set": _size},
    # allocate, write and free memory continuously: ``rate`` bytes per second allocated,
    # each allocation lives ``lifetime``; ``footprint`` caps what is live at once
    "churn": {"rate": _workload_rate, "lifetime": _positive(_duration), "footprint": _size},
    # keep the simulated clock moving (an idle phase before migration)
    "idle": {"duration": _idle_duration},
}
_WORKLOAD_COMMON = {"kind": _str, "during": _bool}
_WORKLOAD_REQUIRED = {"fill": ("size",), "fill_free": ("size",), "dirty": ("rate",),
                      "churn": ("rate",), "idle": ("duration",)}


class _KeyLines:
    """Line numbers of headers and keys, from a scan of the text (tomllib keeps none)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*((?:[A-Za-z0-9_\-]+|\"[^\"]*\")"
                      r"(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"))*)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        table, index = "", 0
        counts: dict[str, int] = {}
        in_multiline = False
        for no, raw in enumerate(text.splitlines(), start=1):
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            elif in_multiline:
                continue
            m = self._HEADER.match(raw)
            if m and not self._KEY.match(raw):
                table = m.group(2).replace('"', "").strip()
                if m.group(1) == "[[":
                    index = counts.get(table, 0)
                    counts[table] = index + 1
                else:
                    index = 0
                self.headers.setdefault((table, index), no)
                continue
            k = self._KEY.match(raw)
            if k:
                # A dotted key (``guest.ram = ...``) is key ``ram`` of table ``guest``; its
                # first part is also recorded, as the line where that table is defined.
                parts = [p.strip().strip('"') for p in k.group(1).split(".")]
                self.lines.setdefault((table, index, parts[0]), no)
                if len(parts) > 1:
                    sub = ".".join([table, *parts[:-1]] if table else parts[:-1])
                    self.lines.setdefault((sub, 0, parts[-1]), no)

    def key(self, table: str, index: int, key: str) -> int | None:
        # Last resort for a table written inline (``guest = { ram = "1GiB" }``,
        # ``workload = [{ ... }]``): the line that assigns it.
        return (self.lines.get((table, index, key)) or self.headers.get((table, index))
                or (self.lines.get(("", 0, table)) if table else None))


def _key_on_line(text: str, line: int | None) -> str | None:
    """The key or table a line declares (tomllib's errors give only the line)."""
    lines = text.splitlines()
    if line is None or not 1 <= line <= len(lines):
        return None
    raw = lines[line - 1]
    k = _KeyLines._KEY.match(raw)
    if k:
        return k.group(1).strip('"')
    h = _KeyLines._HEADER.match(raw)
    return h.group(2).replace('"', "").strip() if h else None


def _check_table(file: str, lines: _KeyLines, table: str, index: int, label: str,
                 data: Any, schema: Mapping[str, Conv]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ScenarioError(file, label, lines.key(table, index, ""),
                            f"expected a table, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{label}.{key}" if label else key
        line = lines.key(table, index, key)
        conv = schema.get(key)
        if conv is None:
            known = ", ".join(sorted(schema))
            raise ScenarioError(file, dotted, line, f"unknown key (known keys: {known})")
        try:
            out[key] = conv(value)
        except (UnitError, TypeError) as e:
            raise ScenarioError(file, dotted, line, str(e)) from None
    return out


def loads(text: str, file: str = "<string>") -> Scenario:
    """Parse and check a scenario from its text; ``file`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: 2,000 levels of "[" end
        # in Python's recursion limit, a bad file like any other.
        raise ScenarioError(file, None, None, "not valid TOML: arrays or inline tables nested "
                            "too deeply") from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else None
        raise ScenarioError(file, _key_on_line(text, line), line,
                            f"not valid TOML: {e}") from None
    lines = _KeyLines(text)
    tables = {"guest": _GUEST, "migration": _MIGRATION, "hinting": _HINTING,
              "host": _HOST, "published": _PUBLISHED, "measured": _MEASURED,
              "measured_qtest": _MEASURED}
    for key in data:
        if key not in tables and key not in _TOP and key != "workload":
            raise ScenarioError(file, key, lines.key("", 0, key) or lines.key(key, 0, ""),
                                "unknown key (known: name, description, [guest], [[workload]], "
                                "[migration], [hinting], [host], [published], [measured], "
                                "[measured_qtest])")
    top = _check_table(file, lines, "", 0, "", {k: v for k, v in data.items() if k in _TOP},
                       _TOP)
    if "guest" not in data:
        raise ScenarioError(file, "guest", None, "missing table [guest]")
    g = _check_table(file, lines, "guest", 0, "guest", data["guest"], _GUEST)
    if "ram" not in g:
        raise ScenarioError(file, "guest.ram", lines.key("guest", 0, ""), "missing key")
    if g["ram"] % 4096:
        raise ScenarioError(file, "guest.ram", lines.key("guest", 0, "ram"),
                            "guest RAM must be a whole number of 4 KiB pages")
    if g["ram"] < 64 << 20:
        raise ScenarioError(file, "guest.ram", lines.key("guest", 0, "ram"),
                            "guest RAM must be at least 64 MiB (the driver area and the "
                            "low zones live there)")
    guest = GuestSpec(ram_bytes=g["ram"], seed=g.get("seed", 1),
                      init_on_alloc=g.get("init_on_alloc", False),
                      init_on_free=g.get("init_on_free", False),
                      page_poison=g.get("page_poison", False), vcpus=g.get("vcpus", 2),
                      boot_footprint=g.get("boot_footprint"),
                      boot_free_dirty=g.get("boot_free_dirty"), runnable=g.get("runnable", 0),
                      kernel_data=g.get("kernel_data", False))
    for key in ("boot_footprint", "boot_free_dirty"):
        if (g.get(key) or 0) > guest.ram_bytes // 2:
            raise ScenarioError(file, f"guest.{key}", lines.key("guest", 0, key),
                                "more than half of the guest's RAM")
    wl_data = data.get("workload", [])
    if not isinstance(wl_data, list):
        raise ScenarioError(file, "workload", lines.key("workload", 0, ""),
                            "use [[workload]] tables (an array of tables)")
    workloads = []
    for i, w in enumerate(wl_data):
        label = f"workload[{i + 1}]"
        if not isinstance(w, dict):
            raise ScenarioError(file, label, lines.key("workload", i, ""), "expected a table")
        kind = w.get("kind")
        if kind is None:
            raise ScenarioError(file, f"{label}.kind", lines.key("workload", i, ""),
                                "missing key (one of " + ", ".join(WORKLOAD_KINDS) + ")")
        if not isinstance(kind, str) or kind not in WORKLOAD_KINDS:  # a list is unhashable
            raise ScenarioError(file, f"{label}.kind", lines.key("workload", i, "kind"),
                                f"unknown workload kind {kind!r} (one of "
                                + ", ".join(WORKLOAD_KINDS) + ")")
        schema = {**_WORKLOAD_COMMON, **WORKLOAD_KINDS[kind]}
        p = _check_table(file, lines, "workload", i, label, w, schema)
        for req in _WORKLOAD_REQUIRED[kind]:
            if req not in p:
                raise ScenarioError(file, f"{label}.{req}", lines.key("workload", i, ""),
                                    f"missing key (a {kind} workload needs it)")
        during = p.pop("during", False)
        p.pop("kind")
        if kind in ("fill", "fill_free", "idle") and during:
            raise ScenarioError(file, f"{label}.during", lines.key("workload", i, "during"),
                                f"a {kind} workload is a set-up phase; it cannot run during "
                                "migration")
        if kind in ("dirty", "churn") and not during:
            raise ScenarioError(file, f"{label}.during", lines.key("workload", i, "kind"),
                                f"a {kind} workload is background activity: set during = true")
        if "rate" in p and p["rate"] > MAX_RATE_PER_RAM * guest.ram_bytes:
            raise ScenarioError(file, f"{label}.rate", lines.key("workload", i, "rate"),
                                f"{format_size(p['rate'])}/s is more than {MAX_RATE_PER_RAM} "
                                f"times the guest's RAM ({format_size(guest.ram_bytes)}) per "
                                "second: no machine touches memory that fast")
        if kind in ("fill", "fill_free") and p["size"] > guest.ram_bytes:
            raise ScenarioError(file, f"{label}.size", lines.key("workload", i, "size"),
                                "larger than the guest's RAM")
        workloads.append(WorkloadSpec(kind, during, p, lines.key("workload", i, "kind")))
    mg = _check_table(file, lines, "migration", 0, "migration", data.get("migration", {}),
                      _MIGRATION)
    d = MigrationSpec()
    mig = MigrationSpec(bandwidth_Bps=mg.get("bandwidth", d.bandwidth_Bps),
                        downtime_limit_s=mg.get("downtime_limit", d.downtime_limit_s),
                        max_rounds=mg.get("max_rounds", d.max_rounds),
                        time_limit_s=mg.get("time_limit"),
                        rate_limited=mg.get("rate_limited", False),
                        chunk_pages=mg.get("chunk"))
    first_round_s = guest.ram_bytes / mig.bandwidth_Bps
    if first_round_s > MAX_FIRST_ROUND_S:
        # Checked here, not in the engine: the run would otherwise simulate hours of guest
        # activity before its time budget could cancel it (MAX_FIRST_ROUND_S says why).
        raise ScenarioError(file, "migration.bandwidth", lines.key("migration", 0, "bandwidth"),
                            f"too slow for {format_size(guest.ram_bytes)} of guest RAM: the "
                            f"first pre-copy round alone would take {first_round_s:.3g} s "
                            f"simulated (guest RAM / bandwidth), more than the simulator's "
                            f"bound of {MAX_FIRST_ROUND_S:g} s (1 hour)")
    h = _check_table(file, lines, "hinting", 0, "hinting", data.get("hinting", {}), _HINTING)
    hint = HintingSpec(mode=h.get("mode", "capture"), min_order=h.get("min_order", 10),
                       block_cost_s=h.get("block_cost"), alloc_cost_s=h.get("alloc_cost"),
                       post_cost_s=h.get("post_cost"), walk_cost_s=h.get("walk_cost"),
                       memory_bandwidth_Bps=h.get("memory_bandwidth"))
    hs = _check_table(file, lines, "host", 0, "host", data.get("host", {}), _HOST)
    host_keys = {"profile": "profile", "dirty_log": "dirty_log", "cores": "cores",
                 "guest_memory_bandwidth": "guest_memory_bandwidth_Bps",
                 "guest_first_write": "guest_first_write_s", "poller_cpus": "poller_cpus"}
    host = HostSpec(**{host_keys[k]: v for k, v in hs.items()})
    meas = _check_table(file, lines, "measured", 0, "measured", data.get("measured", {}),
                        _MEASURED)
    meas_qtest = _check_table(file, lines, "measured_qtest", 0, "measured_qtest",
                              data.get("measured_qtest", {}), _MEASURED)
    pub = _check_table(file, lines, "published", 0, "published", data.get("published", {}),
                       _PUBLISHED)
    name = top.get("name") or Path(file).stem
    return Scenario(name=name, description=top.get("description", ""), source=file, guest=guest,
                    workloads=tuple(workloads), migration=mig, hinting=hint, host=host,
                    published=pub, measured=meas, measured_qtest=meas_qtest)


def load(path: str | Path) -> Scenario:
    name = str(path)
    try:
        # A FIFO or a device would block or never end: only regular files are read.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ScenarioError(name, None, None, "not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ScenarioError(name, None, None, f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ScenarioError(name, None, None, f"larger than {MAX_FILE_BYTES >> 20} MiB: not "
                            "a scenario file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError(name, None, None, "not UTF-8 text") from None
    return loads(text, name)


# -- built-ins --------------------------------------------------------------------------------
def builtin_names() -> list[str]:
    d = resources.files("vmsim") / "scenarios"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml"))


def load_builtin(name: str) -> Scenario:
    d = resources.files("vmsim") / "scenarios"
    f = d / f"{name}.toml"
    if not f.is_file():
        raise ScenarioError(f"builtin:{name}", None, None,
                            "no such built-in scenario (see `balloon-hint scenarios`)")
    return loads(f.read_text(encoding="utf-8"), f"builtin:{name}")
