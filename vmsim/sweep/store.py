"""The results of a sweep on disk: Parquet, one row per run, and resuming from them.

A results folder holds::

    results.parquet        every point of the sweep, in the sweep's order (written at the end)
    parts/part-NNNNNN.parquet   rows written while the sweep runs (merged into results.parquet
                           at the end; left behind by an interrupted sweep for --resume)

A row is the ``--json`` object of ``balloon-hint migrate`` (``vmsim.report.RunResult``, key for
key: the counters as Parquet maps, pages per round as a list) plus the point: ``point`` (its
index in the sweep's order), ``point_id`` (the hash of its scenario text), ``status`` (``ok``:
the run completed, whether or not it verified or converged; ``failed``: no result, ``failure``
says why: an exception in the run, a worker that died too often, a point not sent), one column
per axis named by its key (``hinting.mode``, ``workload[1].rate``), ``sweep_seed`` and, with a
fleet, ``fleet.vm``, ``fleet.profile`` and ``fleet.ram``. The sweep's description (axes and
their values in order, the fleet, the evacuation) is in the file's metadata under
``balloon-hint.sweep``: ``sweep-report`` needs nothing else.

Resuming: the rows already in the folder (results.parquet and any parts) whose ``point_id`` is a
point of the sweep with status ``ok`` are kept and not run again; failed points are run again.
At the end the point columns of every row are written afresh from the current sweep file, so a
sweep file extended with more axis values resumes into one consistent table; rows of points no
longer in the sweep are left out, and the previous results.parquet is then kept beside it as
results-before-resume.parquet.
"""
from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from protocol.errors import UsageError
from vmsim.report import RunResult
from vmsim.sweep.spec import Point, Sweep

RESULTS = "results.parquet"
PARTS = "parts"
META_KEY = b"balloon-hint.sweep"
#: Result columns that differ between two runs of the same point (timing of the host).
NONDETERMINISTIC = ("wall_s",)

_SCALARS: dict[Any, pa.DataType] = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                                     str: pa.string()}


def arrow_type(t: Any) -> pa.DataType:
    """The Parquet column type of a RunResult field's annotation: scalars, ``X | None``
    (nullable anyway), ``list[X]`` and ``dict[str, X]`` (a map), nested as needed."""
    if t in _SCALARS:
        return _SCALARS[t]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    origin = typing.get_origin(t)
    if origin in (types.UnionType, typing.Union) and len(args) == 1:
        return arrow_type(args[0])
    if origin is list and len(args) == 1:
        return pa.list_(arrow_type(args[0]))
    if origin is dict and len(args) == 2 and args[0] is str:
        return pa.map_(pa.string(), arrow_type(args[1]))
    raise TypeError(f"no Parquet type for {t!r}")


def result_fields() -> list[pa.Field]:
    """The RunResult fields as Parquet columns (seeds are unsigned 64-bit, as scenarios allow)."""
    hints = typing.get_type_hints(RunResult)
    out = []
    for f in fields(RunResult):
        try:
            t = pa.uint64() if f.name == "seed" else arrow_type(hints[f.name])
        except TypeError as e:
            raise TypeError(f"RunResult.{f.name}: {e}") from None
        out.append(pa.field(f.name, t))
    return out


def _axis_type(values: Sequence[Any]) -> pa.DataType:
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63
           for v in values):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64()
    return pa.string()


def _axis_value(v: Any, t: pa.DataType) -> Any:
    if t == pa.string():
        return v if isinstance(v, str) else json.dumps(v)
    if t == pa.float64():
        return float(v)
    return v


def schema(sweep: Sweep) -> pa.Schema:
    cols = [pa.field("point", pa.int64()), pa.field("point_id", pa.string()),
            pa.field("status", pa.string()), pa.field("failure", pa.string())]
    cols += [pa.field(a.key, _axis_type(a.values)) for a in sweep.axes]
    cols.append(pa.field("sweep_seed", pa.uint64()))
    if sweep.fleet:
        cols += [pa.field("fleet.vm", pa.int64()), pa.field("fleet.profile", pa.string()),
                 pa.field("fleet.ram", pa.string())]
    cols += result_fields()
    return pa.schema(cols, metadata={META_KEY: json.dumps(sweep.describe()).encode()})


def point_columns(sweep: Sweep, p: Point, sch: pa.Schema) -> dict[str, Any]:
    row: dict[str, Any] = {"point": p.index, "point_id": p.point_id, "sweep_seed": p.sweep_seed}
    for a, v in zip(sweep.axes, p.axis_values, strict=True):
        row[a.key] = _axis_value(v, sch.field(a.key).type)
    if sweep.fleet and p.vm is not None:
        vm = sweep.fleet[p.vm]
        row["fleet.vm"] = vm.index
        row["fleet.profile"] = vm.profile
        row["fleet.ram"] = None if vm.ram is None else str(vm.ram)
    return row


_RESULT_NAMES = frozenset(f.name for f in fields(RunResult)) | {"status", "failure",
                                                                   "point_id"}


def result_part(row: dict[str, Any]) -> dict[str, Any]:
    """The columns a run produced (what a stored row keeps across a resume)."""
    return {k: v for k, v in row.items() if k in _RESULT_NAMES}


def failed_result(failure: str) -> dict[str, Any]:
    return {"status": "failed", "failure": failure}


class ResultStore:
    """Rows of one sweep in one folder: earlier rows (for --resume), new rows written in parts
    as they come, and the final merge into results.parquet."""

    def __init__(self, folder: str | Path, sweep: Sweep, *, resume: bool) -> None:
        self.dir = Path(folder)
        self.sweep = sweep
        self.schema = schema(sweep)
        self.parts = self.dir / PARTS
        existing = self._existing_files()
        if existing and not resume:
            raise UsageError(f"{self.dir} already holds sweep results ({existing[0].name}); "
                             "use --resume to continue that sweep, or another --out")
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {self.dir}: cannot create it: {e.strerror}") from None
        if not os.access(self.parts, os.W_OK | os.X_OK):
            raise UsageError(f"--out {self.dir}: not writable")
        self._by_id: dict[str, dict[str, Any]] = {}  # point_id -> result part (latest wins)
        self.earlier_rows = 0
        self.dropped = 0  # rows of points not in this sweep, left out by finish()
        for f in existing:
            for row in _read_rows(f):
                self.earlier_rows += 1
                self._keep(result_part(row))
        self._pending: list[dict[str, Any]] = []
        self._seq = len(list(self.parts.glob("part-*.parquet")))

    def _existing_files(self) -> list[Path]:
        files = [self.dir / RESULTS] if (self.dir / RESULTS).is_file() else []
        return files + sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() \
            else files

    def _keep(self, res: dict[str, Any]) -> None:
        pid = res.get("point_id")
        if not pid:
            return
        old = self._by_id.get(pid)
        # a completed run is never replaced by a failure of a later attempt
        if old is None or res.get("status") == "ok" or old.get("status") != "ok":
            self._by_id[pid] = res

    def done_ids(self) -> set[str]:
        return {pid for pid, r in self._by_id.items() if r.get("status") == "ok"}

    def add(self, point_id: str, result: dict[str, Any]) -> None:
        res = {**result, "point_id": point_id}
        self._keep(res)
        self._pending.append(res)

    def flush(self) -> None:
        """Write the rows added since the last flush as one part file."""
        if not self._pending:
            return
        by_id = {p.point_id: p for p in self.sweep.points}
        rows = [self._row(by_id[r["point_id"]], r) for r in self._pending]
        path = self.parts / f"part-{self._seq:06d}.parquet"
        _write(rows, self.schema, path)
        self._seq += 1
        self._pending = []

    def _row(self, p: Point, res: dict[str, Any]) -> dict[str, Any]:
        return {**point_columns(self.sweep, p, self.schema), **res, "point_id": p.point_id}

    def rows(self) -> list[dict[str, Any]]:
        """Every point of the sweep in order, with its result (or a failed row for a point
        without one)."""
        out = []
        for p in self.sweep.points:
            res = self._by_id.get(p.point_id) or failed_result("no result (not run)")
            out.append(self._row(p, res))
        return out

    def finish(self) -> Path:
        """Merge everything into results.parquet (atomically) and remove the parts."""
        self.flush()
        ids = {p.point_id for p in self.sweep.points}
        dropped = sum(1 for pid in self._by_id if pid not in ids)
        final = self.dir / RESULTS
        if dropped and final.is_file():
            final.replace(self.dir / "results-before-resume.parquet")
        _write(self.rows(), self.schema, final)
        for f in self.parts.glob("part-*.parquet"):
            f.unlink()
        try:
            self.parts.rmdir()
        except OSError:
            pass
        self.dropped = dropped
        return final


def _write(rows: list[dict[str, Any]], sch: pa.Schema, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table = pa.Table.from_pylist([_fit(r, sch) for r in rows], schema=sch)
    pq.write_table(table, tmp)
    tmp.replace(path)  # a reader (or a crash) never sees half a file


def _fit(row: dict[str, Any], sch: pa.Schema) -> dict[str, Any]:
    out = {name: row.get(name) for name in sch.names}
    for name, v in out.items():
        if isinstance(v, dict):  # a map column
            out[name] = list(v.items())
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"{path}: not a readable Parquet file ({e})") from None
    maps = [f.name for f in t.schema if pa.types.is_map(f.type)]
    return [_unmap(r, maps) for r in t.to_pylist()]


def _unmap(row: dict[str, Any], maps: Sequence[str]) -> dict[str, Any]:
    for name in maps:
        v = row.get(name)
        if isinstance(v, list):
            row[name] = dict(v)
    return row


def read_results(folder: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, sweep description) of a results folder or file; an unfinished sweep's parts are
    read too (the latest row of a point wins, a completed one over a failure)."""
    p = Path(folder)
    files: Iterable[Path]
    if p.is_file():
        files = [p]
    else:
        files = ([p / RESULTS] if (p / RESULTS).is_file() else []) + \
            sorted((p / PARTS).glob("part-*.parquet"))
    files = list(files)
    if not files:
        raise UsageError(f"{folder}: no sweep results there ({RESULTS} or {PARTS}/)")
    desc: dict[str, Any] = {}
    by_id: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            meta = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowException) as e:
            raise UsageError(f"{f}: not a readable Parquet file ({e})") from None
        if META_KEY not in meta:
            raise UsageError(f"{f}: not a balloon-hint sweep result (no {META_KEY.decode()} "
                             "metadata)")
        desc = json.loads(meta[META_KEY])
        for row in _read_rows(f):
            old = by_id.get(row["point_id"])
            if old is None or row["status"] == "ok" or old["status"] != "ok":
                by_id[row["point_id"]] = row
    rows = sorted(by_id.values(), key=lambda r: r["point"])
    return rows, desc
