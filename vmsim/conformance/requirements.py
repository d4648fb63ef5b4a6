"""The requirement ids the conformance checks carry: one rule and its sources per id.

Theory of operation: every normative rule of the virtio specification that the balloon and its
free page hints depend on has a short id: ``V-n`` for the split virtqueue rules a device must
enforce, ``D-n`` for the balloon device's rules and ``DR-n`` for the balloon driver's rules. A
test checks an id by carrying the marker ``@pytest.mark.spec("D-10")``; ``balloon-hint
conformance`` and the pytest plugin (``vmsim.conformance.plugin``) list every id with its
verdict. ``REQUIREMENTS`` below is the one table of ids; ``docs/requirements.md`` is generated
from it (``python -m vmsim.conformance.requirements > docs/requirements.md``; a test keeps the
two equal), so the rule a report prints and the rule the documentation states cannot drift.

Sections are those of VIRTIO 1.3 (csd01, the ``v1.3-wd02`` tag of oasis-tcs/virtio-spec).
"(legacy)" marks a rule of the legacy interface only; "(impl)" a rule the spec does not state
but QEMU and Linux rely on to interoperate. The sentences are ours, not the specification's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

#: Where the table is documented (in the source repository; also printed by the tools).
DOCS = "docs/requirements.md"

SPEC = "VIRTIO 1.3"
QEMU_VIRTIO = "QEMU hw/virtio/virtio.c"
QEMU_BALLOON = "QEMU hw/virtio/virtio-balloon.c"
LINUX_BALLOON = "Linux drivers/virtio/virtio_balloon.c"


@dataclass(frozen=True, slots=True)
class Requirement:
    rid: str
    rule: str
    #: VIRTIO 1.3 section(s), then QEMU / Linux sources (file and function).
    sources: tuple[str, ...]


def _r(rid: str, rule: str, *sources: str) -> Requirement:
    return Requirement(rid, rule, sources)


_TABLE = (
    # -- split virtqueue: what a device must refuse (QEMU marks the device broken) -------------
    _r("V-1", "The device treats more pending available entries than the queue size as a "
       "broken driver.", f"{SPEC} 2.7.6, 2.7.13.3", f"{QEMU_VIRTIO} virtqueue_num_heads"),
    _r("V-2", "The device refuses an available ring entry (a chain head) that is not below "
       "the queue size.", f"{SPEC} 2.7.6", f"{QEMU_VIRTIO} virtqueue_get_head"),
    _r("V-3", "The device refuses a `next` index outside the descriptor table (or outside "
       "the indirect table it is walking).", f"{SPEC} 2.7.5",
       f"{QEMU_VIRTIO} virtqueue_split_read_next_desc"),
    _r("V-4", "The device refuses a chain longer than the queue size (or than its indirect "
       "table): such a chain loops.", f"{SPEC} 2.7.5.2, 2.7.5.3.1",
       f"{QEMU_VIRTIO} virtqueue_split_pop"),
    _r("V-5", "The device refuses a chain with a device-readable descriptor after a "
       "device-writable one.", f"{SPEC} 2.7.4.2", f"{QEMU_VIRTIO} virtqueue_split_pop"),
    _r("V-6", "The device refuses an indirect table whose length is zero or not a multiple of "
       "16, an indirect table inside another, and INDIRECT combined with NEXT.",
       f"{SPEC} 2.7.5.3.1, 2.7.5.3.2", f"{QEMU_VIRTIO} virtqueue_split_pop"),
    _r("V-7", "The device refuses zero-length buffers (QEMU's rule; the spec does not forbid "
       "them).", f"{QEMU_VIRTIO} virtqueue_map_desc"),
    _r("V-8", "The device refuses a buffer that is not wholly inside guest RAM.",
       f"{SPEC} 2.7.5", f"{QEMU_VIRTIO} virtqueue_map_desc"),
    _r("V-9", "The device never writes a device-readable buffer or the descriptor table.",
       f"{SPEC} 2.7.5.1"),
    _r("V-10", "The device uses no buffer and sends no used-buffer notification before "
       "DRIVER_OK.", f"{SPEC} 2.1.2"),
    # -- the balloon device ----------------------------------------------------------------
    _r("D-1", "The device may refuse FEATURES_OK only when it offered MUST_TELL_HOST and the "
       "driver declined it.", f"{SPEC} 5.5.3.2"),
    _r("D-2", "(legacy) The device works with a driver that does not negotiate "
       "MUST_TELL_HOST.", f"{SPEC} 5.5.3.2 (legacy interface)"),
    _r("D-3", "The device may change an inflated page's content only between reading its "
       "pfn on inflateq and using that buffer.", f"{SPEC} 5.5.6.2",
       f"{QEMU_BALLOON} virtio_balloon_handle_output"),
    _r("D-4", "With MUST_TELL_HOST the device may change an inflated page until it has read "
       "and acknowledged the page's deflate; never afterwards.", f"{SPEC} 5.5.6.2",
       f"{QEMU_BALLOON} virtio_balloon_handle_output"),
    _r("D-5", "(legacy) The device does not act on `actual` until all four of its bytes are "
       "written.", f"{SPEC} 5.5.6.2 (legacy interface)"),
    _r("D-6", "Stats: the device ignores tags it does not know and accepts the entries in any "
       "order.", f"{SPEC} 5.5.6.3.2", f"{QEMU_BALLOON} virtio_balloon_receive_stats"),
    _r("D-7", "(legacy) Stats: the device ignores the values of the first stats buffer.",
       f"{SPEC} 5.5.6.3.3"),
    _r("D-8", "Hint: the device publishes STOP whenever it cannot use hints.",
       f"{SPEC} 5.5.6.5.2", f"{QEMU_BALLOON} virtio_balloon_free_page_stop"),
    _r("D-9", "Hint: the device does not reuse a command id before the driver has sent STOP "
       "for it.", f"{SPEC} 5.5.6.5.2", f"{QEMU_BALLOON} virtio_balloon_free_page_start"),
    _r("D-10", "Hint: the device ignores pages hinted under a command id that is not the "
       "current one.", f"{SPEC} 5.5.6.5.2", f"{QEMU_BALLOON} get_free_page_hints"),
    _r("D-11", "Hint: the device may change a hinted page only if the guest has not written "
       "it since that hint's command id was published.", f"{SPEC} 5.5.6.5.2"),
    _r("D-12", "Hint: after publishing DONE the device changes no hinted page.",
       f"{SPEC} 5.5.6.5.2", f"{QEMU_BALLOON} virtio_balloon_free_page_done"),
    _r("D-13", "Hint: the device publishes DONE once it no longer needs the hinted pages.",
       f"{SPEC} 5.5.6.5.2", f"{QEMU_BALLOON} virtio_balloon_free_page_done"),
    _r("D-14", "Poison: the device uses `poison_val` only as a hint about the guest.",
       f"{SPEC} 5.5.6.6.2"),
    _r("D-15", "Reporting: without PAGE_POISON the device may change a reported page before "
       "using the buffer; with it, only to `poison_val`.", f"{SPEC} 5.5.6.7.2",
       f"{QEMU_BALLOON} virtio_balloon_handle_report"),
    _r("D-16", "The device uses no buffer and notifies nothing before DRIVER_OK, and the "
       "config fields of every offered feature read before FEATURES_OK.",
       f"{SPEC} 2.1.2, 2.5.2"),
    _r("D-17", "(impl) Queue indices follow the negotiated features, free_page_vq out "
       "buffers are 4 bytes, and used elements of inflateq, deflateq and statsq have "
       "len 0.", f"{SPEC} 5.5.2, 2.7.8.2", f"{QEMU_BALLOON} virtio_balloon_device_realize",
       f"{LINUX_BALLOON} init_vqs"),
    # -- the balloon driver (our guest model is judged by these) -----------------------------
    _r("DR-1", "The driver accepts MUST_TELL_HOST when it is offered.", f"{SPEC} 5.5.3.1",
       f"{LINUX_BALLOON} features[]"),
    _r("DR-2", "The driver declines PAGE_POISON unless it writes `poison_val` into reused "
       "pages, and takes REPORTING without PAGE_POISON only if free pages need not keep "
       "their content.", f"{SPEC} 5.5.3.1", f"{LINUX_BALLOON} virtballoon_validate"),
    _r("DR-3", "The driver inflates while num_pages > actual, may deflate while "
       "num_pages < actual, and may inflate while num_pages >= actual.", f"{SPEC} 5.5.6.1",
       f"{LINUX_BALLOON} fill_balloon"),
    _r("DR-4", "Without DEFLATE_ON_OOM the driver does not use balloon pages while "
       "num_pages <= actual; with it, only for the guest's stability.", f"{SPEC} 5.5.6.1",
       f"{LINUX_BALLOON} virtio_balloon_oom_notify"),
    _r("DR-5", "The driver tells the device on deflateq which pages it takes back; with "
       "MUST_TELL_HOST it waits for that acknowledgement before using them.",
       f"{SPEC} 5.5.6.1", f"{LINUX_BALLOON} leak_balloon"),
    _r("DR-6", "The driver does not use a page between posting it on inflateq and the "
       "acknowledgement, nor deflates a page whose inflate is unacknowledged.",
       f"{SPEC} 5.5.6.1", f"{LINUX_BALLOON} tell_host"),
    _r("DR-7", "The driver updates `actual` after the balloon changes (batching allowed); "
       "(legacy) as one 4-byte write.", f"{SPEC} 5.5.6.1, 5.5.6.2 (legacy interface)",
       f"{LINUX_BALLOON} update_balloon_size"),
    _r("DR-8", "Stats: at most one buffer outstanding, one posted after initialisation and "
       "after each use, one entry per supported statistic, the same subset each time.",
       f"{SPEC} 5.5.6.3.1", f"{LINUX_BALLOON} stats_handle_request"),
    _r("DR-9", "Hint: the driver's out buffers are exactly 4 bytes, and it sends one start "
       "per command id.", f"{SPEC} 5.5.6.5.1", f"{LINUX_BALLOON} send_cmd_id_start"),
    _r("DR-10", "Hint: the driver hints while the command id is 2 or more, stops on STOP or "
       "DONE, and sends STOP when it runs out of pages.", f"{SPEC} 5.5.6.5.1",
       f"{LINUX_BALLOON} send_free_pages"),
    _r("DR-11", "Hint: the driver may reuse hinted pages early but treats their content as "
       "garbage, initialises them if reused before DONE, and releases them all on DONE.",
       f"{SPEC} 5.5.6.5.1", f"{LINUX_BALLOON} return_free_pages_to_mm"),
    _r("DR-12", "Poison: the driver fills reused deflated pages with `poison_val`, writes "
       "`poison_val` before DRIVER_OK and never changes it afterwards.", f"{SPEC} 5.5.6.6.1",
       f"{LINUX_BALLOON} virtballoon_probe"),
    _r("DR-13", "Reporting: without PAGE_POISON reported pages are uninitialised for the "
       "driver, with it they are filled with `poison_val` first; none is used before its "
       "buffer is used; reporting starts after DRIVER_OK, preferring large blocks.",
       f"{SPEC} 5.5.6.7.1", f"{LINUX_BALLOON} virtballoon_free_page_report"),
)

#: id -> requirement, in the order of the documentation.
REQUIREMENTS: dict[str, Requirement] = {r.rid: r for r in _TABLE}
#: Every id, V first, then D, then DR.
REQUIREMENT_IDS: tuple[str, ...] = tuple(REQUIREMENTS)
#: Driver requirements: checked against our own guest driver, never against a target device.
DRIVER_REQUIREMENT_IDS: tuple[str, ...] = tuple(i for i in REQUIREMENT_IDS
                                                if i.startswith("DR-"))
#: What a target device can be checked for: everything but the driver's rules.
TARGET_REQUIREMENT_IDS: tuple[str, ...] = tuple(i for i in REQUIREMENT_IDS
                                                if i not in DRIVER_REQUIREMENT_IDS)


def id_key(rid: str) -> tuple[int, str, int]:
    """Sort key: the documentation's order for known ids, then others by prefix and number."""
    known = list(REQUIREMENTS)
    if rid in REQUIREMENTS:
        return (0, "", known.index(rid))
    prefix, _, num = rid.partition("-")
    return (1, prefix, int(num) if num.isdigit() else 0)


_HEAD = """\
# Requirement ids

Every normative rule balloon-hint checks has an id: **V-n** for the split virtqueue rules a device
must enforce, **D-n** for the balloon device, **DR-n** for the balloon driver. A check carries its
id as a pytest marker, `@pytest.mark.spec("D-10")`; `balloon-hint conformance` and
`pytest --balloon-target` print one verdict per id (PASS, FAIL, NOT COVERED, NOT SELECTED).

Sources: sections of the VIRTIO 1.3 specification (csd01; OASIS virtio-spec, tag `v1.3-wd02`),
QEMU's device (`hw/virtio/virtio.c`, `hw/virtio/virtio-balloon.c`) and Linux's driver
(`drivers/virtio/virtio_balloon.c`), named by function. "(legacy)": a rule of the legacy
interface only. "(impl)": not in the spec, but QEMU and Linux depend on it. V-7 is QEMU's rule:
the spec does not forbid zero-length buffers. The rules below are summaries in our words; the
cited section is authoritative.

This file is generated from `vmsim/conformance/requirements.py`
(`python -m vmsim.conformance.requirements > docs/requirements.md`); edit the table there.
"""

_FAMILIES = (("V", "## Virtqueue (device side)"), ("D", "## Balloon device"),
             ("DR", "## Balloon driver"))


def markdown() -> str:
    """docs/requirements.md: the head, then one table per family."""
    out = [_HEAD.rstrip("\n")]
    for family, title in _FAMILIES:
        out += ["", title, "", "| id | rule | sources |", "|---|---|---|"]
        out += [f"| {r.rid} | {r.rule} | {'; '.join(r.sources)} |"
                for r in _TABLE if r.rid.partition("-")[0] == family]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
