"""Stand-ins for the services behind a real gateway (nginx): each answers with its own name
and what it received, so a test sees which service a request reached and how; the paths the
gateway merges answer what a service would (its real OpenAPI document, say)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from magasin.config import Settings
from magasin.gateway.routes import SERVICES
from tests.e2e.processes import Gateway

Answer = Callable[["Stub", BaseHTTPRequestHandler], "tuple[int, Any] | None"]


class Stub:
    """One process of `service`: an HTTP/1.1 server on a free port in a thread."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.answers: dict[str, Answer] = {}
        """Path (without query) -> how to answer it instead of the echo."""
        self.received: list[tuple[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                stub.received.append((self.command, self.path))
                special = stub.answers.get(path)
                answer = special(stub, self) if special else None
                if answer is None and special is not None:
                    return  # the special answer wrote the response itself
                status, doc = answer or (200, {
                    "service": stub.service, "method": self.command, "path": self.path,
                    "request_id": self.headers.get("X-Request-Id"), "body_bytes": len(body),
                })
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def gateway(directory: Path, stubs: list[Stub], **limits: Any) -> Iterator[Gateway]:
    """The real gateway in front of `stubs` (`stubs` may change: `reload()`)."""
    running = Gateway(directory, lambda: {s: [x.address for x in stubs if x.service == s]
                                          for s in SERVICES}, Settings(**limits))
    running.start()
    try:
        yield running
    finally:
        running.stop()
