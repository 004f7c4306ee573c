"""A local CloudEvents receiver (the exporter tests' OpenMeter stand-in): a real HTTP server on a
loopback port, recording every batch it acknowledges."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """A local CloudEvents endpoint: records each batch; fails the first `fail` POSTs with 503."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.content_types: set[str] = set()
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if outer.fail > 0:
                    outer.fail -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.content_types.add(self.headers["content-type"])
                outer.batches.append(json.loads(body))
                self.send_response(202)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in b]

    def close(self) -> None:
        self.server.shutdown()
