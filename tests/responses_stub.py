"""A stand-in for the OpenAI Responses API that the Codex CLI calls, on the loopback, for
tests that drive the real CLI (``tests/test_real_codex.py``; :mod:`model_stub` plays
Anthropic's API for Claude Code).

Codex (0.171.0, given a ``model_providers.<id>`` with ``wire_api = "responses"``) sends
``POST {base_url}/responses`` with ``"stream": true`` and reads server-sent events, as the
Responses API's streaming reference gives them
(https://developers.openai.com/api/reference/resources/responses/streaming-events), each
with its ``sequence_number``: ``response.created``, then for each output item
``response.output_item.added``, its text deltas and ``response.output_item.done``, and last
``response.completed``, whose ``response`` has an ``id`` and its ``usage``. Codex takes the
items from ``output_item.done`` (codex-rs/codex-api/src/sse/responses.rs); the rest is sent
as the real API sends it.

The reply is scripted by the prompt itself, so that a test reads as what it asks of the
agent; the *last user message* decides (texts Codex puts in the input itself, such as its
``<environment_context>``, start with ``<`` and are skipped):

- ``run: COMMAND``: a call of the shell tool Codex offers (``exec_command`` in 0.171.0),
  running COMMAND in the sandbox, then "done" once its output is back;
- ``escalate: COMMAND``: the same, asking to run it outside the sandbox
  (``sandbox_permissions: "require_escalated"``), which under ``-a on-request`` puts up
  Codex's approval prompt;
- ``fail``: an API error (400, which Codex does not retry with ``request_max_retries = 0``);
- ``slow: SECONDS``: a text reply that takes that long to start (or none, if the stub is
  closed meanwhile);
- anything else, a tool's output included: a short text reply.

Every request is kept (``requests``) for a test to look at.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from typing import Any

from loopback import JsonHandler, LoopbackServer

_ids = itertools.count(1)


class ResponsesStub(LoopbackServer):
    """The stand-in server, serving from a thread of the test's process until ``close()``;
    ``url`` is the base URL to give Codex (it appends ``/responses``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._closing = threading.Event()
        stub = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    request = json.loads(body)
                except ValueError:
                    request = {}
                stub.requests.append({"path": self.path, **request})
                if not self.path.rstrip("/").endswith("/responses"):
                    return self._json(404, _error("no such endpoint"))
                stub.answer(self, request)

            def do_GET(self) -> None:
                self._json(404, _error("no such endpoint"))

        self._serve(Handler, "/v1")

    def close(self) -> None:
        self._closing.set()  # a slow reply still waiting gives up
        super().close()

    # -- the script ------------------------------------------------------------------------

    def answer(self, handler: Any, request: dict[str, Any]) -> None:
        text, after_tool = last_user_text(request.get("input", []))
        tools = {tool.get("name") for tool in request.get("tools", []) if isinstance(tool, dict)}
        if after_tool or not text:
            return _stream(handler, request, [message_item("done")])
        verb, _, rest = text.partition(":")
        verb, rest = verb.strip().lower(), rest.strip()
        if verb in ("run", "escalate") and "exec_command" in tools:
            return _stream(handler, request, [shell_call(rest, escalate=verb == "escalate")])
        if verb == "fail":
            return handler._json(400, _error("scripted failure"))
        if verb == "slow" and self._closing.wait(float(rest or 1)):
            return None
        return _stream(handler, request, [message_item("ok")])


def _stream(handler: Any, request: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """Send ``items`` as one streamed response, the whole body at once (Codex parses the
    events as they come; one write keeps the test's timing out of it)."""
    events = response_events(request, items)
    data = b"".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events)
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        handler.wfile.write(data)  # else Codex dropped the request: a turn interrupted while it was slow


def response_events(request: dict[str, Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server-sent events of a response whose output is ``items``, in the API's order."""
    base = {"id": f"resp_{next(_ids):06d}", "object": "response", "model": request.get("model", "stub")}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {**base, "status": "in_progress", "output": []}}
    ]
    for index, item in enumerate(items):
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        if item["type"] == "message":
            delta = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append({"type": "response.output_text.delta", **delta, "delta": item["content"][0]["text"]})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    done = {**base, "status": "completed", "output": items, "usage": _usage()}
    events.append({"type": "response.completed", "response": done})
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def last_user_text(items: list[Any]) -> tuple[str, bool]:
    """The prompt of the last message from the user (Codex's own texts, which start with
    ``<``, skipped), and whether a tool's output came after it (the model must carry on)."""
    for item in reversed(items or []):
        if not isinstance(item, dict):
            continue
        if str(item.get("type", "")).endswith("_call_output"):
            return "", True
        if item.get("type", "message") != "message" or item.get("role") != "user":
            continue
        content = item.get("content")
        texts = (
            [content] if isinstance(content, str) else [c.get("text", "") for c in content or [] if isinstance(c, dict)]
        )
        texts = [text for text in texts if text.strip() and not text.lstrip().startswith("<")]
        if texts:
            return texts[-1].strip(), False
    return "", False


def shell_call(command: str, escalate: bool = False) -> dict[str, Any]:
    """A call of Codex's shell tool (``exec_command``) running ``command``; with ``escalate``,
    outside the sandbox, which Codex asks the user about under ``on-request`` approvals."""
    arguments: dict[str, Any] = {"cmd": command}
    if escalate:
        arguments.update(sandbox_permissions="require_escalated", justification=f"May I run {command}?")
    n = next(_ids)
    return {
        "type": "function_call",
        "id": f"fc_{n:06d}",
        "call_id": f"call_{n:06d}",
        "name": "exec_command",
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{next(_ids):06d}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _usage() -> dict[str, Any]:
    return {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 17,
    }


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": f"stub: {message}", "type": "invalid_request_error", "code": None}}
