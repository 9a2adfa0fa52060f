"""The end-to-end harness's ports: each process of a test run gets a port of its own."""

from __future__ import annotations

from tests.e2e.processes import free_port


def test_a_port_is_never_handed_out_twice_even_before_its_process_listens() -> None:
    # Nothing listens on these ports (as when the processes given them have not started
    # yet): the probe alone would hand some out twice (500 picks in ~12,000 ports: ~10).
    ports = [free_port() for _ in range(500)]

    assert len(set(ports)) == len(ports)
