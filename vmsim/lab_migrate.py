"""Real-guest migration integrity: migrate the lab guest between two QEMUs with QEMU's own
free page hinting and check the destination page by page (``scripts/qemu-lab migrate-check``; its
parser is ``vmsim.cmd_migrate_check``'s, so that ``--help`` loads neither numpy nor the lab).

Theory of operation
-------------------
1. **Two QEMUs with RAM files.** The source and the destination get ``memory-backend-file``
   (``share=on``) under ``/dev/shm``, so their guest RAM can be read from outside. Both run
   ``virtio-balloon-pci,free-page-hint=on,iothread=io0``; the destination starts with
   ``-incoming defer -S`` so it stays paused when the migration ends.
2. **Workload** (source guest): a keeper file (data that must survive) with its md5, then N MiB of
   random data written to tmpfs and deleted (free memory that holds data, which hinting is for);
   optionally a writer that keeps writing checksummed files during the migration.
3. **Hints from the device side** (``vmsim.hint_capture``): QEMU's
   ``x-query-virtio-queue-status`` locates the free page queue; a poller process reads every
   published descriptor out of the source's RAM file while the rounds run, and counts the
   readings that came too late to be sure of (``suspect``).
4. **Migration** over a unix socket with ``max-bandwidth`` and ``downtime-limit`` set; when it
   completes the source is in ``postmigrate`` and the destination ``paused``: neither runs.
5. **Diff and classify.** The two RAM files are compared page by page. A differing page inside a
   captured hint is *hinted* (allowed: the guest held it for the host and will not read it before
   DONE gives it back); one outside every hint is *lost*: a write the migration never carried.
   When ``suspect > 0`` some hints were not read, and lost pages are only *unexplained*.
   A page whose differing bytes all lie in a used ring is counted apart (*device ring*): the
   balloon's free page loop on the iothread re-enables notifications when a round stops, which
   writes the used ring's ``avail_event``, unsynchronised with the final bitmap sync; that write
   can miss the stream (QEMU 7.2 and 11.1 both, once in a few runs). The field is the device's
   own to rewrite, and the free page queue is polled, not kicked, at the next round: nothing
   the guest relies on.
6. **Health** on the destination after ``cont``: the keeper's and the writer's md5, a memory test
   (60% of MemFree filled with random data, read twice, compared), and the kernel log.

QEMU builds: the lab's QEMU (``lab``) and Debian 12's QEMU 7.2 (``debian``): the host's
``/usr/bin/qemu-system-x86_64`` when the package is installed, otherwise the package and the
libraries the host lacks are fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into the lab cache (never installed).

This module is an I/O harness, like ``vmsim.qemu_lab``: subprocesses, threads, the wall clock.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import EnvironmentFailure, UsageError
from vmsim import qemu_lab
from vmsim.hint_capture import PAGE, Q35_LOWMEM_LIMIT, CaptureResult, HintCapture, RingAddrs
from vmsim.migration_stream import StreamTap, ram_records
from vmsim.qemu_lab import GuestVM, QemuLab

log = logging.getLogger(__name__)

BALLOON_PATH = "/machine/peripheral/balloon0/virtio-backend"
FREE_PAGE_VQ = 3          # inflate, deflate, stats, free page (QEMU's queue order)
DEBIAN_PACKAGE = "qemu-system-x86"
DEBIAN_DIR = "debian-qemu"
KEEP_MIB = 32
RAM_ALIGN = 8 << 10     # QEMU aligns -m up to this


# -- QEMU builds -------------------------------------------------------------------------------

@dataclass(frozen=True)
class QemuBuild:
    name: str
    argv: list[str]          # everything before the machine options
    env: dict[str, str]

    def version(self) -> str:
        out = subprocess.run([*self.argv, "-version"], capture_output=True, text=True,
                             env=self.env, timeout=60)
        m = re.search(r"version (\S+)", out.stdout)
        if out.returncode or not m:
            raise EnvironmentFailure(f"{self.name} QEMU does not run: {out.stderr.strip()}")
        return m.group(1)


def lab_build(lab: QemuLab) -> QemuBuild:
    return QemuBuild("lab", qemu_lab.qemu_argv(lab.root), lab.env())


def _installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True,
                         text=True)
    return out.returncode == 0 and "install ok installed" in out.stdout


def debian_build(cache: Path, *, fetch: bool = True) -> QemuBuild:
    """Debian's own QEMU: the host's if installed, else unpacked into ``cache/debian-qemu``."""
    if _installed(DEBIAN_PACKAGE) and Path("/usr/bin/qemu-system-x86_64").exists():
        return QemuBuild("debian", ["/usr/bin/qemu-system-x86_64"], dict(os.environ))
    root = cache / DEBIAN_DIR
    if not (root / ".balloon-hint-ok").exists():
        if not fetch:
            raise EnvironmentFailure(f"Debian's QEMU is not in {root}")
        _unpack_debian_qemu(root)
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    env = dict(os.environ, LD_LIBRARY_PATH=libs,
               QEMU_MODULE_DIR=f"{root}/usr/lib/x86_64-linux-gnu/qemu")
    argv = [f"{root}/usr/bin/qemu-system-x86_64", "-L", f"{root}/usr/share/qemu",
            "-L", f"{root}/usr/share/seabios"]
    return QemuBuild("debian", argv, env)


def _unpack_debian_qemu(root: Path) -> None:
    """apt-get download the package and every dependency the host lacks; dpkg-deb -x them."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query"):
        if not shutil.which(tool):
            raise EnvironmentFailure(f"{tool} is needed to fetch Debian's QEMU (a Debian host)")
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", DEBIAN_PACKAGE],
        capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise EnvironmentFailure(f"apt-cache depends {DEBIAN_PACKAGE}: {out.stderr.strip()}")
    pkgs = sorted({ln.strip() for ln in out.stdout.splitlines()
                   if ln and not ln.startswith((" ", "<"))})
    missing = [p for p in pkgs if not _installed(p)]
    shutil.rmtree(root, ignore_errors=True)
    debs = root.with_name(root.name + ".debs")
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    # _apt cannot write into root's cache folder: let it download as root, quietly.
    dl = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *missing],
                        cwd=debs, capture_output=True, text=True, timeout=600)
    if dl.returncode:
        raise EnvironmentFailure(f"apt-get download failed: {dl.stderr.strip()[-2000:]}")
    root.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
    shutil.rmtree(debs, ignore_errors=True)
    (root / ".balloon-hint-ok").write_text("\n".join(missing) + "\n")


class FileRamLab(QemuLab):
    """The lab's kernel and initramfs, booted by ``build`` with guest RAM in ``ram_path``."""

    def __init__(self, base: QemuLab, build: QemuBuild, ram_path: str) -> None:
        self.__dict__.update(base.__dict__)
        self.build = build
        self.ram_path = ram_path

    def env(self) -> dict[str, str]:
        return dict(self.build.env)

    def qemu_command(self, args: Sequence[str]) -> list[str]:
        return [*self.build.argv, *args]

    def machine_args(self, **kw: Any) -> list[str]:
        cmd = super().machine_args(**kw)
        i = next((i for i, a in enumerate(cmd) if a.startswith("memory-backend-memfd,")), None)
        if i is None:
            raise EnvironmentFailure("the lab's machine has no memory-backend-memfd to replace "
                                     f"with a RAM file: {cmd}")
        size = qemu_lab.parse_ram(kw.get("ram", "1G"))
        cmd[i] = f"memory-backend-file,id=mem,size={size},mem-path={self.ram_path},share=on"
        return cmd


def tcg_dirty_note(version: str, ram_bytes: int) -> str | None:
    """A warning for a QEMU older than 9.0 with RAM of whole 64-page words: its dirty-bitmap
    sync under TCG loses writes (QEMU commit 03bfc2188f fixed it; docs/qemu-lab.md)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) >= (9, 0) or ram_bytes % (256 << 10):
        return None
    return (f"note: QEMU {version} predates 9.0's fix of its dirty tracking under TCG (commit "
            "03bfc2188f): a guest running long in the kernel (hints with init_on_alloc=1) loses "
            "pages; a --ram that is not a multiple of 256K avoids it (docs/qemu-lab.md)")


# -- diff and classification -------------------------------------------------------------------

@dataclass
class Classification:
    differing: int = 0
    hinted: int = 0            # inside a captured hint
    hinted_dst_zero: int = 0   # ... and never sent (zero on the destination)
    lost: int = 0              # outside every captured hint
    lost_runs: list[tuple[int, int]] = field(default_factory=list)  # [gpa, end) runs
    device_ring: int = 0       # outside hints, differing only in a used ring (device-written)
    device_ring_pages: list[int] = field(default_factory=list)  # their gpas

    def as_dict(self) -> dict[str, Any]:
        return {"differing": self.differing, "hinted": self.hinted,
                "hinted_dst_zero": self.hinted_dst_zero, "lost": self.lost,
                "lost_runs": [[hex(a), hex(b)] for a, b in self.lost_runs[:50]],
                "device_ring": self.device_ring,
                "device_ring_pages": [hex(a) for a in self.device_ring_pages]}


def differing_pages(src: str, dst: str, chunk: int = 64 << 20) -> np.ndarray:
    """Page numbers (file offset / 4096) where the two RAM files differ."""
    a = np.memmap(src, dtype=np.uint64, mode="r")
    b = np.memmap(dst, dtype=np.uint64, mode="r")
    if a.size != b.size:
        raise EnvironmentFailure(f"RAM files differ in size: {src} {a.size * 8}, "
                                 f"{dst} {b.size * 8}")
    words = PAGE // 8
    step = chunk // 8
    out = []
    for o in range(0, a.size, step):
        x = a[o:o + step].reshape(-1, words)
        y = b[o:o + step].reshape(-1, words)
        out.append(np.flatnonzero((x != y).any(axis=1)) + o // words)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def zero_pages(path: str, pages: np.ndarray) -> np.ndarray:
    m = np.memmap(path, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
    return ~m[pages].any(axis=1) if pages.size else np.zeros(0, bool)


def classify(pages: np.ndarray, ranges: list[tuple[int, int]], dst_zero: np.ndarray
             ) -> Classification:
    """Sort differing pages (page numbers, gpa = page * 4096) into hinted and lost."""
    c = Classification(differing=int(pages.size))
    if not pages.size:
        return c
    gpa = pages.astype(np.int64) * PAGE
    if ranges:
        starts = np.array([r[0] for r in ranges], np.int64)
        ends = np.array([r[1] for r in ranges], np.int64)
        k = np.searchsorted(starts, gpa, side="right") - 1
        inside = (k >= 0) & (gpa < ends[np.maximum(k, 0)])
    else:
        inside = np.zeros(pages.size, bool)
    c.hinted = int(inside.sum())
    c.hinted_dst_zero = int((inside & dst_zero).sum())
    c.lost = int((~inside).sum())
    lost = pages[~inside]
    if lost.size:
        breaks = np.flatnonzero(np.diff(lost) != 1) + 1
        for run in np.split(lost, breaks):
            c.lost_runs.append((int(run[0]) * PAGE, (int(run[-1]) + 1) * PAGE))
    return c


def set_apart_device_rings(cls: Classification, src: str, dst: str,
                           used: Sequence[tuple[int, int]]) -> None:
    """Move the lost pages whose differing bytes all lie in a used ring ([gpa, end) ranges:
    written by the device only) from ``lost`` to ``device_ring``."""
    if not cls.lost or not used:
        return
    a = np.memmap(src, dtype=np.uint8, mode="r")
    b = np.memmap(dst, dtype=np.uint8, mode="r")
    keep: list[int] = []
    for start, end in cls.lost_runs:
        for gpa in range(start, end, PAGE):
            diff = np.flatnonzero(a[gpa:gpa + PAGE] != b[gpa:gpa + PAGE]) + gpa
            in_ring = np.zeros(diff.size, bool)
            for u0, u1 in used:
                in_ring |= (diff >= u0) & (diff < u1)
            if diff.size and in_ring.all():
                cls.device_ring_pages.append(gpa)
            else:
                keep.append(gpa // PAGE)
    cls.device_ring = len(cls.device_ring_pages)
    cls.lost = len(keep)
    cls.lost_runs = []
    if keep:
        lost = np.array(keep, np.int64)
        for run in np.split(lost, np.flatnonzero(np.diff(lost) != 1) + 1):
            cls.lost_runs.append((int(run[0]) * PAGE, (int(run[-1]) + 1) * PAGE))


def used_rings(queues: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """[gpa, end) of each queue's used ring (flags, idx, the elements, avail_event) from
    ``x-query-virtio-queue-status`` answers."""
    out = []
    for st in queues:
        used, num = int(st["vring-used"]), int(st["vring-num"])
        if used and num:
            out.append((used, used + 6 + 8 * num))
    return out


# -- guest scripts -----------------------------------------------------------------------------

def _meminfo(vm: GuestVM, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", vm.run("cat /proc/meminfo"), re.M)
    if not m:
        raise EnvironmentFailure(f"no {key} in the guest's /proc/meminfo")
    return int(m.group(1))


WRITER = ("(i=0; while :; do i=$((i+1)); dd if=/dev/urandom of=/tmp/w.$i bs=64k count=32 "
          "2>/dev/null; md5sum /tmp/w.$i >>/tmp/w.md5; rm -f /tmp/w.$((i-8)); done) "
          ">/dev/null 2>&1 & echo $! >/tmp/w.pid")

# Kernel log lines that mean trouble (case-sensitive: "panic=-1" on the command line is fine).
DMESG_BAD = re.compile(r"\bBUG\b|Oops|Kernel panic|corrupt|Bad page|general protection fault|"
                       r"WARNING:|segfault|Call Trace|virtio.*(error|broken)")


def health(vm: GuestVM, writer: bool) -> dict[str, Any]:
    """Checks on the destination guest after ``cont``; every value is measured, none assumed."""
    h: dict[str, Any] = {}
    vm.run("echo alive", timeout=120)
    if writer:
        vm.run("kill $(cat /tmp/w.pid); sleep 1", check=False)
        # Only files still present were written whole on one side or the other.
        out = vm.run("for f in /tmp/w.*[0-9]; do grep \" $f\\$\" /tmp/w.md5 | tail -1; done "
                     ">/tmp/w.check; md5sum -c /tmp/w.check", check=False)
        h["writer_files"] = out.count(": OK")
        h["writer_ok"] = vm.last_status == 0
    vm.run("md5sum -c /tmp/keep.md5", check=False)
    h["keeper_ok"] = vm.last_status == 0
    free_kib = _meminfo(vm, "MemFree")
    # The memory test: copies of the keeper (random data) over 60% of free memory, all read
    # back and compared with the keeper's checksum (copying is far faster than urandom under
    # TCG, and every copy must come back intact from pages the guest just allocated).
    copies = max(1, free_kib * 6 // 10 // 1024 // KEEP_MIB)
    mib = copies * KEEP_MIB
    out = vm.run(f"k=$(md5sum </tmp/keep); i=0; while [ $i -lt {copies} ]; do "
                 "cat /tmp/keep >/tmp/mt.$i || exit 1; i=$((i+1)); done; bad=0; i=0; "
                 f"while [ $i -lt {copies} ]; do [ \"$(md5sum </tmp/mt.$i)\" = \"$k\" ] || "
                 "bad=$((bad+1)); i=$((i+1)); done; rm -f /tmp/mt.*; "
                 "[ $bad = 0 ] && echo MT_OK", timeout=900, check=False)
    h["memtest_mib"] = mib
    h["memtest_ok"] = "MT_OK" in out
    bad = [ln for ln in vm.dmesg().splitlines() if DMESG_BAD.search(ln)]
    h["dmesg_bad"] = bad[:20]
    h["healthy"] = bool(h["keeper_ok"] and h["memtest_ok"] and not bad
                        and h.get("writer_ok", True))
    return h


# -- one run -----------------------------------------------------------------------------------

@dataclass
class CheckConfig:
    ram: str = "512M"
    init_on_alloc: int = 0
    fill_mib: int = 256
    writer: bool = False
    max_bandwidth: int = 128 << 20
    downtime_limit: int = 300
    timeout: float = 600
    keep_ram: str | None = None   # folder: keep both RAM files there when a page was lost
    hints: bool = True            # free-page-hint=on (off: the control run, nothing hinted)
    stream_dir: str | None = None  # folder: record the migration stream, trace lost pages in it
    clear_bitmap_shift: int | None = None  # QEMU's x-clear-bitmap-shift on the source
    during: str | None = None     # a guest shell command run in the background while migrating
    timeline: bool = False        # fingerprint the source RAM while migrating: when did a lost
                                  # page last change, relative to the syncs and hint rounds?
    capture: bool = True          # hinted runs: poll the free page queue (False: time the
                                  # guest and QEMU alone; no hint is known, nothing classified)


def run_check(lab: QemuLab, build: QemuBuild, cfg: CheckConfig) -> dict[str, Any]:
    size = qemu_lab.parse_ram(cfg.ram)
    if size >= Q35_LOWMEM_LIMIT:
        raise UsageError(f"--ram {cfg.ram}: keep it below 2.75 GiB (RAM file offsets are "
                         "guest addresses only while q35 puts all RAM below 4 GiB)")
    if shutil.disk_usage("/dev/shm").free < 2 * size + (64 << 20):
        raise EnvironmentFailure(f"/dev/shm has no room for two {cfg.ram} RAM files")
    work = tempfile.mkdtemp(prefix="bh-migcheck-", dir="/dev/shm")
    src_ram, dst_ram = f"{work}/src.ram", f"{work}/dst.ram"
    dev = ["virtio-balloon-pci,id=balloon0,iothread=io0,free-page-hint="
           + ("on" if cfg.hints else "off")]
    io = ["-object", "iothread,id=io0"]
    append = f"init_on_alloc={cfg.init_on_alloc}"
    result: dict[str, Any] = {"qemu": build.name, "hints": cfg.hints,
                              "init_on_alloc": cfg.init_on_alloc,
                              "ram": cfg.ram, "fill_mib": cfg.fill_mib, "writer": cfg.writer}
    capture: HintCapture | None = None
    try:
        src_lab = FileRamLab(lab, build, src_ram)
        dst_lab = FileRamLab(lab, build, dst_ram)
        src_extra = list(io)
        if cfg.clear_bitmap_shift is not None:
            # The dirty-log clearing chunk: 2^shift pages (QEMU's default 18: 1 GiB).
            src_extra += ["-global", f"migration.x-clear-bitmap-shift={cfg.clear_bitmap_shift}"]
            result["clear_bitmap_shift"] = cfg.clear_bitmap_shift
        with src_lab.boot(ram=cfg.ram, devices=dev, extra_args=src_extra, append=append,
                          timeout=300) as src:
            v = src.qmp("query-version")["qemu"]
            result["qemu_version"] = f"{v['major']}.{v['minor']}.{v['micro']}"
            # The boot footprint: what the kernel holds (RAM - MemTotal: image, memmap,
            # reservations) plus what is in use after boot (MemTotal - MemFree).
            result["boot_memtotal_kib"] = _meminfo(src, "MemTotal")
            result["boot_memfree_kib"] = _meminfo(src, "MemFree")
            # tmpfs defaults to half of RAM; the fill and the memory test need more.
            src.run("mount -o remount,size=90% /tmp")
            src.run(f"dd if=/dev/urandom of=/tmp/keep bs=1M count={KEEP_MIB} 2>/dev/null"
                    " && md5sum /tmp/keep >/tmp/keep.md5", timeout=300)
            src.run(f"dd if=/dev/urandom of=/tmp/fill bs=1M count={cfg.fill_mib} 2>/dev/null"
                    " && rm /tmp/fill", timeout=600)
            result["memfree_before_kib"] = _meminfo(src, "MemFree")
            nq = FREE_PAGE_VQ + 1 if cfg.hints else FREE_PAGE_VQ
            queues = [src.qmp("x-query-virtio-queue-status", path=BALLOON_PATH, queue=q)
                      for q in range(nq)]
            # Where the device's rings are: a lost page there points at the device's writes.
            result["rings"] = {q: {k: hex(int(st[k])) for k in ("vring-desc", "vring-avail",
                                                                "vring-used")}
                               for q, st in enumerate(queues)}
            ring = RingAddrs.from_qmp(queues[FREE_PAGE_VQ]) if cfg.hints else None
            if cfg.writer:
                src.run(WRITER)
            if cfg.during:
                src.run(f"({cfg.during}) >/dev/null 2>&1 &")
                result["during"] = cfg.during
            with dst_lab.boot(ram=cfg.ram, devices=dev, append=append, wait_ready=False,
                              extra_args=[*io, "-incoming", "defer", "-S"]) as dst:
                sock = f"{dst.tmpdir}/migration.sock"
                dst.qmp("migrate-incoming", uri=f"unix:{sock}")
                stream_path = None
                if cfg.stream_dir:
                    Path(cfg.stream_dir).mkdir(parents=True, exist_ok=True)
                    stream_path = (f"{cfg.stream_dir}/{build.name}-ioa{cfg.init_on_alloc}-"
                                   f"{int(time.time())}.stream")
                    tap = StreamTap(f"{dst.tmpdir}/tap.sock", sock, stream_path)
                    sock = tap.listen_path
                result["captured"] = ring is not None and cfg.capture
                if ring is not None and cfg.capture:
                    capture = HintCapture(src_ram, ring)
                    capture.start()
                src.qmp("migrate-set-parameters", **{"max-bandwidth": cfg.max_bandwidth,
                                                     "downtime-limit": cfg.downtime_limit})
                t0 = time.monotonic()
                src.qmp("migrate", uri=f"unix:{sock}")
                tl = Timeline(src_ram) if cfg.timeline else None
                st = _wait_migration(src, cfg.timeout, t0, tl)
                _wait_status(dst, "paused", 120)
                if stream_path:
                    tap.close()
                    result["stream"] = stream_path
                realtime = capture.realtime if capture is not None else False
                cap = capture.stop() if capture is not None else CaptureResult([], 0, 0.0)
                capture = None
                result["migration"] = _migration_figures(st)
                result["capture"] = _capture_figures(cap)
                result["capture"]["realtime_poller"] = realtime
                result["hint_ranges"] = [[hex(a), hex(b)] for a, b in cap.ranges()]
                if st["status"] != "completed":
                    result["error"] = f"migration {st['status']}: {st.get('error-desc')}"
                    return result
                if src.qmp("query-status")["status"] != "postmigrate":
                    raise EnvironmentFailure("the source is not paused after the migration")
                # A paused source must not change: count pages that do within a second.
                fp = Timeline(src_ram)
                time.sleep(1.0)
                fp.sample(0)
                result["src_pages_changed_while_paused"] = int(
                    np.count_nonzero(fp.samples[0][2] != fp.samples[1][2]))
                dfp = Timeline(dst_ram)
                time.sleep(1.0)
                dfp.sample(0)
                result["dst_pages_changed_while_paused"] = int(
                    np.count_nonzero(dfp.samples[0][2] != dfp.samples[1][2]))
                pages = differing_pages(src_ram, dst_ram)
                if cfg.hints and not cfg.capture:
                    # Without the capture no page can be told hinted from lost: the run only
                    # times the migration (the safety check needs the poller).
                    result["pages"] = {"differing": int(pages.size), "classified": False}
                    src.close()
                    dst.qmp("cont")
                    result["health"] = health(dst, cfg.writer)
                    return result
                cls = classify(pages, cap.ranges(), zero_pages(dst_ram, pages))
                set_apart_device_rings(cls, src_ram, dst_ram, used_rings(queues))
                result["pages"] = cls.as_dict()
                # Free memory holding data when the round took it: the hinted pages that are
                # not zero on the source (with init_on_alloc=0 the driver does not clear them).
                result["hinted_nonzero_pages"] = nonzero_pages_in(src_ram, cap.ranges())
                if cls.lost:
                    result["lost_detail"] = describe_lost(src_ram, dst_ram, cls)
                    if tl is not None:
                        result["lost_timeline"] = tl.explain(cls, cap, dst_ram)
                    if stream_path:
                        result["lost_in_stream"] = trace_lost(stream_path, cls, src_ram,
                                                              dst_ram)
                    if cfg.keep_ram:
                        keep = Path(cfg.keep_ram)
                        keep.mkdir(parents=True, exist_ok=True)
                        stem = f"{build.name}-ioa{cfg.init_on_alloc}-{int(time.time())}"
                        shutil.copyfile(src_ram, keep / f"{stem}.src.ram")
                        shutil.copyfile(dst_ram, keep / f"{stem}.dst.ram")
                        result["kept_ram"] = str(keep / stem)
                src.close()   # one guest at a time from here on
                dst.qmp("cont")
                result["health"] = health(dst, cfg.writer)
    except qemu_lab.LabVMError as e:
        result["error"] = f"guest failed: {str(e)[:3000]}"
    finally:
        if capture is not None:
            capture.kill()
        shutil.rmtree(work, ignore_errors=True)
    return result


def nonzero_pages_in(path: str, ranges: list[tuple[int, int]]) -> int:
    m = np.memmap(path, dtype=np.uint64, mode="r")
    n = 0
    for a, b in ranges:
        n += int(m[a // 8:b // 8].reshape(-1, PAGE // 8).any(axis=1).sum())
    return n


def describe_lost(src: str, dst: str, cls: Classification, limit: int = 8) -> list[dict]:
    """For the first lost runs: where they sit and what the pages hold on both sides."""
    a = np.memmap(src, dtype=np.uint8, mode="r")
    b = np.memmap(dst, dtype=np.uint8, mode="r")
    out = []
    for start, end in cls.lost_runs[:limit]:
        s, d = a[start:end], b[start:end]
        diff = np.flatnonzero(s != d)
        out.append({"bytes": [[int(o), int(s[o]), int(d[o])] for o in diff[:32]],
                    "gpa": hex(start), "pages": (end - start) // PAGE,
                    "block_4m": hex(start & ~((4 << 20) - 1)),
                    "bytes_differing": int(diff.size),
                    "first_diff_offset": int(diff[0]) if diff.size else None,
                    "src_zero": bool(not s.any()), "dst_zero": bool(not d.any())})
    return out


def trace_lost(stream: str, cls: Classification, src: str, dst: str,
               limit: int = 64) -> dict[str, Any]:
    """Where each lost page appears in the recorded stream: every iteration that carried it,
    and whether the last copy sent equals the destination's page (it should) and the source's
    (it cannot, or the page would not differ)."""
    recs = ram_records(stream)
    data = open(stream, "rb").read()
    per_iter: dict[int, int] = {}
    by_page: dict[int, list[Any]] = {}
    lost = {a // PAGE for a0, a1 in cls.lost_runs for a in range(a0, a1, PAGE)}
    for r in recs:
        if r.block != "mem":
            continue
        per_iter[r.iteration] = per_iter.get(r.iteration, 0) + 1
        if r.offset // PAGE in lost:
            by_page.setdefault(r.offset // PAGE, []).append(r)
    a = np.memmap(src, dtype=np.uint8, mode="r")
    b = np.memmap(dst, dtype=np.uint8, mode="r")
    pages = []
    for p in sorted(lost)[:limit]:
        sends = by_page.get(p, [])
        last = sends[-1] if sends else None
        if last is None:
            last_eq_dst = bool(not b[p * PAGE:(p + 1) * PAGE].any())
        elif last.zero:
            last_eq_dst = bool(not b[p * PAGE:(p + 1) * PAGE].any())
        else:
            last_eq_dst = data[last.pos:last.pos + PAGE] == bytes(b[p * PAGE:(p + 1) * PAGE])
        pages.append({"gpa": hex(p * PAGE),
                      "sent": [[s.iteration, "zero" if s.zero else "page"] for s in sends],
                      "last_copy_is_dst": last_eq_dst,
                      "src_zero": bool(not a[p * PAGE:(p + 1) * PAGE].any())})
    return {"pages_per_iteration": [per_iter.get(i, 0) for i in range(max(per_iter) + 1)]
            if per_iter else [], "lost": pages}


class Timeline:
    """Per-page fingerprints of the source RAM taken while the migration runs, each with the
    migration's sync count at that moment (QMP ``dirty-sync-count``)."""

    def __init__(self, ram: str) -> None:
        self.m = np.memmap(ram, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
        self.samples: list[tuple[int, int, np.ndarray]] = []   # (t_ns, syncs, fingerprints)
        self.sample(0)

    def fingerprint(self) -> np.ndarray:
        out = np.empty(self.m.shape[0], np.uint64)
        step = 8192
        for i in range(0, self.m.shape[0], step):
            blk = self.m[i:i + step]
            out[i:i + step] = np.bitwise_xor.reduce(blk, axis=1) ^ blk.sum(axis=1, dtype=np.uint64)
        return out

    def sample(self, syncs: int) -> None:
        self.samples.append((time.perf_counter_ns(), syncs, self.fingerprint()))

    def explain(self, cls: Classification, cap: CaptureResult, dst: str) -> dict[str, Any]:
        """For each lost page: the sample after which it last changed on the source, the sync
        count then, and which sample (if any) equals the destination's copy."""
        d = np.memmap(dst, dtype=np.uint64, mode="r").reshape(-1, PAGE // 8)
        rounds: dict[int, tuple[int, int]] = {}
        for h in cap.hints:
            a, b = rounds.get(h.round, (h.t_ns, h.t_ns))
            rounds[h.round] = (min(a, h.t_ns), max(b, h.t_ns))
        t0 = self.samples[0][0]
        pages = []
        for a0, a1 in cls.lost_runs:
            for p in range(a0 // PAGE, a1 // PAGE):
                fps = [int(fp[p]) for _t, _s, fp in self.samples]
                blk = d[p:p + 1]
                dfp = int((np.bitwise_xor.reduce(blk, axis=1)
                           ^ blk.sum(axis=1, dtype=np.uint64))[0])
                changes = [i for i in range(1, len(fps)) if fps[i] != fps[i - 1]]
                pages.append({"gpa": hex(p * PAGE), "changed_after_samples": changes,
                              "dst_equals_samples": [i for i, f in enumerate(fps) if f == dfp]})
        return {"samples": [[round((t - t0) / 1e6), s] for t, s, _ in self.samples],
                "hint_rounds_ms": {r: [round((a - t0) / 1e6), round((b - t0) / 1e6)]
                                   for r, (a, b) in rounds.items()},
                "pages": pages[:64]}


def _wait_migration(vm: GuestVM, timeout: float, t0: float,
                    tl: Timeline | None = None) -> dict[str, Any]:
    while True:
        st = vm.qmp("query-migrate")
        if tl is not None:
            tl.sample(st.get("ram", {}).get("dirty-sync-count", 0))
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        if time.monotonic() - t0 > timeout:
            vm.qmp("migrate_cancel")
            raise EnvironmentFailure(f"migration still {st.get('status')} after {timeout} s")
        time.sleep(0.1)


def _wait_status(vm: GuestVM, want: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (s := vm.qmp("query-status")["status"]) != want:
        if time.monotonic() > deadline:
            raise EnvironmentFailure(f"destination is {s}, expected {want}")
        time.sleep(0.1)


def _migration_figures(st: dict[str, Any]) -> dict[str, Any]:
    ram = st.get("ram", {})
    return {"status": st.get("status"), "total_time_ms": st.get("total-time"),
            "downtime_ms": st.get("downtime"), "transferred": ram.get("transferred"),
            "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            # where the time and the bytes went: set-up, and what was sent with the VM stopped
            "setup_time_ms": st.get("setup-time"), "precopy_bytes": ram.get("precopy-bytes"),
            "downtime_bytes": ram.get("downtime-bytes")}


def _capture_figures(cap: CaptureResult) -> dict[str, Any]:
    return {"hints": len(cap.hints), "hinted_bytes": cap.hinted_bytes,
            "rounds_started": len(cap.rounds), "entries": len(cap.readings),
            "suspect": cap.suspect, "polls": cap.polls, "max_poll_gap_us": round(cap.max_gap_us),
            "hints_per_round": _per_round(cap), "round_us_per_hint": _round_pace(cap),
            # the capture order: [round, ms since the first hint, guest address, bytes]
            "order": [[h.round, round((h.t_ns - cap.hints[0].t_ns) / 1e6, 1), hex(h.addr),
                       h.length] for h in cap.hints]}


def _round_pace(cap: CaptureResult) -> list[float]:
    """Per round with at least 8 hints: microseconds between its first and last hint read,
    per hint (the guest's cost of capturing and posting one block, as the poller saw it)."""
    out = []
    for rnd in range(1, len(cap.rounds) + 1):
        t = [h.t_ns for h in cap.hints if h.round == rnd]
        if len(t) >= 8:
            out.append(round((t[-1] - t[0]) / 1000 / (len(t) - 1), 1))
    return out


def _per_round(cap: CaptureResult) -> list[int]:
    counts = [0] * len(cap.rounds)
    for h in cap.hints:
        counts[h.round - 1] += 1
    return counts


# -- command line ------------------------------------------------------------------------------

def _row(r: dict[str, Any]) -> str:
    name = r["qemu"] + ("" if r.get("hints", True) else "/off")
    if "migration" not in r:
        return f"{name:<10} {r['init_on_alloc']:>3}  ERROR {r.get('error', '?')[:200]}"
    m, c = r["migration"], r["capture"]
    p = r.get("pages", {})
    h = r.get("health", {})
    health_s = ("ok" if h.get("healthy") else
                ("BAD " + ",".join(k for k in ("keeper_ok", "memtest_ok", "writer_ok")
                                   if h.get(k) is False) + (" dmesg" if h.get("dmesg_bad")
                                                            else "")) if h else "-")
    return (f"{name:<10} {r['init_on_alloc']:>3} {(m['transferred'] or 0) / 2**20:9.1f} "
            f"{m['normal_pages']:>7} {m['zero_pages']:>7} {c['hinted_bytes'] / 2**20:8.1f} "
            f"{c['hints']:>5} {c['rounds_started']:>3} {c['suspect']:>4} "
            f"{p.get('differing', '-'):>6} {p.get('hinted', '-'):>6} {p.get('lost', '-'):>5} "
            f"{p.get('device_ring', '-'):>4}  {health_s}"
            + (f"  ({r['error'][:80]})" if "error" in r else ""))


HEADER = ("qemu       ioa  sent MiB  normal    zero  hint MiB hints rnd susp   diff hinted  lost"
          " ring  health")


def run(args: argparse.Namespace) -> int:
    """Every requested run, one table row each; exit 1 if any run lost a page, failed or left
    an unhealthy guest."""
    try:
        size = qemu_lab.parse_ram(args.ram)
    except ValueError as e:
        raise UsageError(f"--ram: {e}") from e
    if not (256 << 20) <= size <= (2 << 30):
        raise UsageError(f"--ram {args.ram}: between 256M and 2G")
    if size % RAM_ALIGN:
        # QEMU rounds -m up to 8 KiB; the RAM file would then be smaller than the RAM.
        raise UsageError(f"--ram {args.ram}: a multiple of 8K")
    if args.runs < 1 or args.fill_mib < 0 or args.max_bandwidth < 1 or args.downtime_limit < 1:
        raise UsageError("--runs, --max-bandwidth and --downtime-limit must be positive, "
                         "--fill-mib not negative")
    try:
        lab = QemuLab.find()
    except qemu_lab.LabMissing as e:
        raise EnvironmentFailure(str(e)) from e
    builds = {"lab": lab_build(lab)} if "lab" in args.qemu else {}
    if "debian" in args.qemu:
        builds["debian"] = debian_build(lab.cache)
    for b in builds.values():
        v = b.version()
        print(f"{b.name}: QEMU {v}", flush=True)
        note = tcg_dirty_note(v, size)
        if note:
            print(note, flush=True)
    results = []
    print(HEADER, flush=True)
    try:
        for build in builds.values():
            for ioa, hints in [(i, h) for i in args.init_on_alloc for h in args.hints]:
                for _ in range(args.runs):
                    cfg = CheckConfig(hints=hints == "on", ram=args.ram, init_on_alloc=ioa,
                                      fill_mib=args.fill_mib, writer=args.writer,
                                      max_bandwidth=args.max_bandwidth << 20,
                                      downtime_limit=args.downtime_limit,
                                      keep_ram=args.keep_ram, stream_dir=args.stream,
                                      timeline=args.timeline,
                                      clear_bitmap_shift=args.clear_bitmap_shift,
                                      during=args.during, capture=not args.no_capture)
                    r = run_check(lab, build, cfg)
                    results.append(r)
                    print(_row(r), flush=True)
                    if args.json:   # after every run: a long series keeps what it measured
                        Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [r for r in results if r.get("pages", {}).get("lost") or "error" in r
           or not r.get("health", {}).get("healthy")]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    from vmsim.cli import main as cli_main
    return cli_main(["migrate-check", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
