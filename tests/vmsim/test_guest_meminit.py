"""Every combination of init_on_alloc, init_on_free and page_poison migrates and verifies in
every hinting mode (issue 15 item 5). The one known loss is the seed's walk with page
poisoning: it hints free pages that keep their poison at the source, the host skips them, and
the destination lacks the poison; those violations are counted apart and must be all of them."""
from __future__ import annotations

import itertools

import pytest

from guest_model.driver import PAGE_POISON_VAL
from vmsim.scenario import loads
from vmsim.vm import SimVM, VMOptions, run_scenario

SCENARIO = """
name = "meminit-matrix"

[guest]
ram = "64MiB"
seed = 5
init_on_alloc = {ioa}
init_on_free = {iof}
page_poison = {poison}

[[workload]]
kind = "fill"
size = "4MiB"

[[workload]]
kind = "fill_free"
size = "32MiB"
keep = 0.5

[[workload]]
kind = "churn"
during = true
rate = "40MiB/s"
lifetime = "10s"
footprint = "12MiB"

[migration]
bandwidth = "1Gbit/s"
"""


def scenario(ioa: bool, iof: bool, poison: bool):
    return loads(SCENARIO.format(ioa=str(ioa).lower(), iof=str(iof).lower(),
                                 poison=str(poison).lower()))


@pytest.mark.parametrize("mode", ["off", "walk", "capture"])
@pytest.mark.parametrize(("ioa", "iof", "poison"), list(itertools.product([False, True],
                                                                          repeat=3)))
def test_every_meminit_combination_verifies(mode: str, ioa: bool, iof: bool,
                                            poison: bool) -> None:
    r = run_scenario(scenario(ioa, iof, poison), mode)
    assert r.error is None and r.mismatched_pages == 0, r
    assert ("will take precedence" in " ".join(r.guest_log)) == (poison and (ioa or iof))
    if mode == "walk" and poison:
        # The seed's known loss, all of it on hinted pages; nothing else.
        assert r.poison_violations > 0
        assert r.poison_violations_from_hints == r.poison_violations
    else:
        assert r.verified and r.poison_violations == 0, r


@pytest.mark.spec("DR-12")
@pytest.mark.parametrize(("iof", "poison", "expect"), [
    (True, False, 0), (False, True, PAGE_POISON_VAL), (True, True, PAGE_POISON_VAL)])
def test_device_is_told_the_poison_value_in_force(iof: bool, poison: bool, expect: int) -> None:
    vm = SimVM(scenario(False, iof, poison), VMOptions(mode="capture"))
    assert vm.dev.poison_val == expect == vm.guest.driver.poison_val
