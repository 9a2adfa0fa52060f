"""A queue that would silently drop messages is refused at start-up (seed 6.6.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from magasin.eventstore.sqlite import SqliteEventStore
from magasin.messaging.rabbitmq import RabbitMQBus, check_queue_arguments
from magasin.shared.errors import ConfigurationError
from magasin.shared.events import SCHEMAS


def test_a_delivery_limit_without_a_dead_letter_exchange_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"delivery limit .* no x-dead-letter-exchange"):
        check_queue_arguments("shop.payment", {"x-queue-type": "quorum", "x-delivery-limit": 5})


@pytest.mark.parametrize(
    "arguments",
    [
        None,
        {"x-queue-type": "quorum"},
        {"x-delivery-limit": 5, "x-dead-letter-exchange": "shop.dlx"},
        {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "shop.payment"},
    ],
)
def test_queues_that_keep_every_message_are_accepted(arguments: dict[str, object] | None) -> None:
    check_queue_arguments("shop.payment", arguments)


async def test_the_bus_refuses_to_start_before_touching_the_broker(tmp_path: Path) -> None:
    bus = RabbitMQBus(
        "amqp://guest:guest@127.0.0.1:1/",  # nobody listens: reaching it would be Unavailable
        store=SqliteEventStore(tmp_path / "x.db"), schemas=SCHEMAS,
        work_queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 3},
    )

    async def ignore(*_: object) -> None: ...

    bus.subscribe("payment", {"TransactionCreated": ignore})
    with pytest.raises(ConfigurationError, match=r"'magasin\.payment'"):
        await bus.start()
