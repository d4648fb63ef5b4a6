"""Property: a session fed any bytes (with fds) never raises, answers every command that wants an
answer, and never leaks an fd (h11's rule: parse, or raise the peer's error, never anything else).
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import vfio_user as vu
from tests.balloon_dev.transport.vfio_user.client import Client, perform
from tests.fdutil import eventfd, open_fds

commands = st.sampled_from([int(c) for c in vu.Command] + [0, 99])
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(vu.build_region_access, st.integers(0, 0x5000), st.integers(0, 9),
              st.integers(0, 16)),
    st.builds(vu.build_irq_set, st.integers(0, 0x7F), st.integers(0, 6), st.integers(0, 3),
              st.integers(0, 3)),
    st.builds(vu.build_dma_unmap, st.integers(0, 3), st.integers(0, 1 << 24),
              st.integers(0, 1 << 24)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(commands, payloads, st.integers(0, 3), st.sampled_from([0, 0x10])),
                max_size=12))
def test_session_survives_any_message_sequence(msgs: list[tuple[int, bytes, int, int]]) -> None:
    c = Client()
    c.version()
    before = open_fds()
    for i, (cmd, payload, nfds, flags) in enumerate(msgs):
        data = vu.encode_request(i, cmd, payload, flags=flags)
        header = vu.decode_header(data[:16])
        fds = [eventfd() for _ in range(nfds)]
        outcome = c.session.handle(vu.Message(header, data[16:], tuple(fds)))
        perform(outcome)
        assert (outcome.reply is None) == bool(flags & vu.VFIO_USER_F_NO_REPLY)
    c.session.close()
    assert open_fds() <= before  # every fd handed over was kept until close, then closed
    c.close()


accesses = st.lists(st.tuples(st.sampled_from(["cfg_r", "cfg_w", "bar_r", "bar_w"]),
                              st.sampled_from([1, 4]), st.integers(-8, 0x4008),
                              st.integers(1, 9), st.integers(0, (1 << 64) - 1)), max_size=60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(accesses)
def test_virtio_pci_function_never_raises_on_guest_accesses(
        ops: list[tuple[str, int, int, int, int]]) -> None:
    c = Client()
    c.version()
    c.map_ram()
    for kind, bar, off, size, value in ops:
        data = (value & ((1 << (8 * min(size, 8))) - 1)).to_bytes(min(size, 8), "little")
        if kind == "cfg_r":
            c.pci.config_read(off, size)
        elif kind == "cfg_w":
            c.pci.config_write(off, data)
        elif kind == "bar_r":
            c.pci.bar_read(bar, off, size)
        else:
            c.pci.bar_write(bar, off, data)
    c.close()
