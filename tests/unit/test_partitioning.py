"""Seed check of issue 12: partition = stable_hash(customerId) % N, stable across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from magasin.messaging.partitioning import (
    configured_partitions,
    inherited,
    partition_metadata,
    partition_of,
    stable_hash,
)


def test_stable_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from magasin.messaging.partitioning import stable_hash; print(stable_hash('cust-42'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert int(out.stdout) == stable_hash("cust-42")


def test_partition_is_stable_hash_modulo_n_and_spreads_keys() -> None:
    keys = [f"cust-{i}" for i in range(200)]
    assert all(partition_of(k, 4) == stable_hash(k) % 4 for k in keys)
    counts = [sum(partition_of(k, 4) == p for k in keys) for p in range(4)]
    assert min(counts) > 20  # every partition gets a share of 200 customers


def test_metadata_carries_key_and_partition_and_caused_events_inherit_it() -> None:
    meta = partition_metadata("cust-7", 4)
    assert meta == {"partition_key": "cust-7", "partition": stable_hash("cust-7") % 4}
    assert inherited({"correlation": "x", **meta}, 4) == meta
    assert inherited({"correlation": "x"}, 4) == {}


def test_partitions_setting_defaults_to_four_and_refuses_zero() -> None:
    assert configured_partitions({}) == 4
    assert configured_partitions({"MAGASIN_PARTITIONS": "8"}) == 8
    with pytest.raises(ValueError, match="MAGASIN_PARTITIONS"):
        configured_partitions({"MAGASIN_PARTITIONS": "0"})
