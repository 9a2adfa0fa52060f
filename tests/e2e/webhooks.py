"""A local webhook endpoint for the callback tests: records every request and answers
from a script (tests/e2e/conftest.py's `hook` fixture serves one on a free port)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    answered: int


@dataclass
class Hook:
    """A local HTTP endpoint that records every request and answers from a script."""

    script: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    async def serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (h.partition(":") for h in header_lines if h)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.script.pop(0) if self.script else 200
            self.requests.append(Received(method, path, headers, json.loads(body), status))
            writer.write(
                f"HTTP/1.1 {status} Scripted\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
        finally:
            writer.close()

    def arrived(self, count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(self.requests) >= count

        return check
