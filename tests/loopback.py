"""What the stand-ins for the agents' model APIs share: an HTTP server on the loopback,
serving from a thread of the test's process until ``close()``, and a request handler that
answers in JSON and logs nothing (the test's output is for its failures)."""

from __future__ import annotations

import http.server
import sys
import threading
from typing import Any, Self


class JsonHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the agents' SDKs keep their connection open between requests

    def _send(self, code: int, kind: str, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, code: int, value: object) -> None:
        import json

        self._send(code, "application/json", json.dumps(value).encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An agent a test kills mid-reply (a terminal closed mid-turn) closes its end of the
        stream: that is the test's doing, not a failure of the stand-in, and is not printed."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """A stand-in's server; ``url`` is its base URL (with ``path``)."""

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler], path: str = "") -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
