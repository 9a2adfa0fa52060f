"""What the outbox relays publish to the broker: the messages some business consumer
handles (`shared.events.CONSUMED`), checked against every service's registries."""

from __future__ import annotations

from pathlib import Path

import pytest

from magasin.bootstrap import Runtime
from magasin.config import Settings
from magasin.shared.events import CONSUMED, SCHEMAS


@pytest.mark.parametrize("saga_mode", ["choreography", "orchestration"])
def test_the_published_messages_are_exactly_those_some_business_consumer_handles(
    tmp_path: Path, saga_mode: str
) -> None:
    runtime = Runtime.embedded(Settings(data_dir=tmp_path, saga_mode=saga_mode))
    handled = {
        event_type
        for service in runtime.services
        for consumer, registry in service.consumers.items()
        if consumer not in service.whole_log  # they get every event in shipped batches
        for event_type in registry
    }
    missing = handled - CONSUMED
    assert not missing, (
        f"a consumer handles {sorted(missing)}, which no relay would publish: add them to "
        "shared.events.CONSUMED")
    unhandled = CONSUMED - handled
    assert not unhandled, f"published, but no consumer handles them: {sorted(unhandled)}"
    assert not CONSUMED - SCHEMAS.types



@pytest.mark.parametrize(("publish_all", "published"), [(False, CONSUMED), (True, None)])
def test_a_distributed_service_s_relay_publishes_what_the_setting_says(
    publish_all: bool, published: frozenset[str] | None
) -> None:
    runtime = Runtime.distributed(Settings(publish_all=publish_all), "inventory")
    assert runtime.relay is not None
    assert runtime.relay.publishes == published
