"""The benchmark stack's port choice, and its CPU accounting between two readings of Triton's processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from workload import stack
from workload.stack import cpu_used, free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """Outgoing connections draw their local ports from the ephemeral range, so a port chosen there could be taken
    between the choice and the server's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener, socket.socket() as probe:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        monkeypatch.setattr(stack, "_below_ephemeral_range", lambda: [taken, free])
        assert free_port() == free


def test_a_stub_a_reload_replaced_between_readings_is_missed_not_subtracted() -> None:
    before = {1: ("tritonserver", 10.0), 2: ("router", 7.0), 3: ("model", 1.0)}
    after = {1: ("tritonserver", 12.0), 4: ("router", 0.5), 3: ("model", 1.0)}  # pid 2 replaced by pid 4
    assert cpu_used(before, after) == pytest.approx({"tritonserver": 2.0, "router": 0.5, "model": 0.0})


def test_a_reused_pid_counts_from_its_start_for_its_new_owner() -> None:
    before = {1: ("tritonserver", 10.0), 2: ("router", 7.0)}
    after = {1: ("tritonserver", 10.5), 2: ("model", 0.25)}
    assert cpu_used(before, after) == pytest.approx({"tritonserver": 0.5, "model": 0.25})
