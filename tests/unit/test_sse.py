"""The event-stream response: what it sends, and that a client's going away ends its body."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.types import Message

from magasin.api.sse import EventStream

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


async def test_a_stream_sends_its_chunks_then_ends_the_response() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"event: status\ndata: {}\n\n"
        yield b": keep-alive\n\n"

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    await asyncio.wait_for(EventStream(body())(SCOPE, receive, send), 5)

    start, *chunks = sent
    headers = dict(start["headers"])
    assert start["status"] == 200
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert (headers[b"cache-control"], headers[b"x-accel-buffering"]) == (b"no-cache", b"no")
    assert [(c["body"], c["more_body"]) for c in chunks] == [
        (b"event: status\ndata: {}\n\n", True), (b": keep-alive\n\n", True), (b"", False)]


async def test_a_client_going_away_ends_the_body_and_the_response() -> None:
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"event: status\ndata: {}\n\n"
            started.set()
            await asyncio.sleep(3600)  # waiting for the next change
            yield b"never"
        finally:
            cleaned.set()

    gone = asyncio.Event()

    async def receive() -> Message:
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    response = asyncio.create_task(EventStream(body())(SCOPE, receive, send))
    await asyncio.wait_for(started.wait(), 5)
    gone.set()
    await asyncio.wait_for(response, 5)

    assert cleaned.is_set()  # before the response returned: the feed it followed is left
    assert b"never" not in sent


async def test_a_body_that_fails_fails_the_response() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"event: status\ndata: {}\n\n"
        raise RuntimeError("the feed broke")

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        pass

    with pytest.raises(RuntimeError, match="the feed broke"):
        await asyncio.wait_for(EventStream(body())(SCOPE, receive, send), 5)
