"""A stand-in for an OpenAI-compatible Chat Completions API, on the loopback, for tests that
drive the real GitHub Copilot CLI in its BYOK mode (``tests/test_real_copilot.py``;
:mod:`model_stub` plays Anthropic's API for Claude Code, :mod:`responses_stub` the Responses
API for Codex).

Copilot CLI (1.0.102, with ``COPILOT_PROVIDER_TYPE=openai`` and
``COPILOT_PROVIDER_BASE_URL=URL``) sends ``POST URL/chat/completions`` with ``"stream":
true`` and ``"stream_options": {"include_usage": true}``, and reads server-sent events of
``chat.completion.chunk`` objects ending in ``data: [DONE]``, as the Chat Completions
streaming reference gives them (https://platform.openai.com/docs/api-reference/chat-streaming):
a first chunk with the assistant's ``role``, the content or ``tool_calls`` deltas, a chunk
with the ``finish_reason`` (``stop``, ``tool_calls``), and, asked for by ``include_usage``,
a last chunk with no choices and the ``usage``. It asked for nothing else here (no model
list).

The reply is scripted by the prompt itself, so that a test reads as what it asks of the
agent; the *last user message* decides (Copilot puts its own tagged blocks before the
prompt, ``<current_datetime>...</current_datetime>``, which are skipped):

- ``run: COMMAND``: a call of Copilot's ``bash`` tool running COMMAND, then "done" once
  its result is back;
- ``ask: QUESTION``: a call of its ``ask_user`` tool (offered in the interactive mode only),
  in the structured form 1.0.102 takes (``message``, ``requestedSchema``) with a choice of
  "Yes" or "No";
- ``fail``: an API error (400, which Copilot does not retry);
- ``slow: SECONDS``: a text reply that takes that long to start;
- anything else, a tool's result included: a short text reply.

Every request is kept (``requests``) for a test to look at.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from typing import Any

from loopback import JsonHandler, LoopbackServer

_ids = itertools.count(1)
#: A block Copilot puts in the user's message before the prompt: ``<name>...</name>``.
_TAGGED = re.compile(r"<([\w-]+)>.*?</\1>", re.DOTALL)


class ChatStub(LoopbackServer):
    """The stand-in server, serving from a thread of the test's process until ``close()``;
    ``url`` is the base URL to give Copilot (it appends ``/chat/completions``)."""

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
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._json(404, _error("no such endpoint", "not_found"))
                stub.answer(self, request)

            def do_GET(self) -> None:
                self._json(404, _error("no such endpoint", "not_found"))

        self._serve(Handler, "/v1")

    def close(self) -> None:
        self._closing.set()  # a slow reply still waiting gives up
        super().close()

    def prompts(self) -> list[str]:
        """The prompt each request answered, in order ("" after a tool's result)."""
        return [last_user_text(request.get("messages", []))[0] for request in self.requests]

    # -- the script ------------------------------------------------------------------------

    def answer(self, handler: Any, request: dict[str, Any]) -> None:
        text, after_tool = last_user_text(request.get("messages", []))
        tools = {tool_name(tool) for tool in request.get("tools") or []}
        if after_tool or not text:
            return _stream(handler, request, content="done")
        verb, _, rest = text.partition(":")
        verb, rest = verb.strip().lower(), rest.strip()
        if verb == "run" and "bash" in tools:
            return _stream(handler, request, call=tool_call("bash", {"command": rest, "description": "run it"}))
        if verb == "ask" and "ask_user" in tools:
            return _stream(handler, request, call=tool_call("ask_user", ask_arguments(rest)))
        if verb == "fail":
            return handler._json(400, _error("scripted failure", "invalid_request_error"))
        if verb == "slow" and self._closing.wait(float(rest or 1)):
            return None
        return _stream(handler, request, content="ok")


def _stream(handler: Any, request: dict[str, Any], content: str = "", call: dict[str, Any] | None = None) -> None:
    """Send one streamed completion, the whole body at once (Copilot parses the chunks as
    they come; one write keeps the test's timing out of it)."""
    chunks = completion_chunks(request, content, call)
    data = b"".join(f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks) + b"data: [DONE]\n\n"
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        handler.wfile.write(data)  # else Copilot dropped the request: a turn cancelled while it was slow


def completion_chunks(request: dict[str, Any], content: str, call: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The chunks of a completion saying ``content`` or making ``call``, in the API's order:
    the role, the deltas, the finish reason, then the usage (asked for by ``include_usage``)."""
    base = {
        "id": f"chatcmpl-{next(_ids):06d}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.get("model", "stub"),
    }

    usage = bool((request.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return {**base, "choices": choices, **({"usage": None} if usage else {})}

    chunks = [chunk({"role": "assistant", "content": content})]
    if call is not None:
        chunks.append(chunk({"tool_calls": [{"index": 0, **call}]}))
    chunks.append(chunk({}, "tool_calls" if call is not None else "stop"))
    if usage:  # the usage in a last chunk of its own, its choices empty; null in the others
        chunks.append({**base, "choices": [], "usage": _usage()})
    return chunks


def last_user_text(messages: list[Any]) -> tuple[str, bool]:
    """The prompt of the last message from the user (Copilot's tagged blocks before it
    taken out), and whether a tool's result came after it (the model must carry on)."""
    for message in reversed(messages or []):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            return "", True
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):  # content parts: the texts among them
            content = "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
        return _TAGGED.sub("", str(content or "")).strip(), False
    return "", False


def tool_name(tool: object) -> str:
    """A tool's name as the request offers it (``{"type": "function", "function": {...}}``)."""
    if not isinstance(tool, dict):
        return ""
    return str((tool.get("function") or {}).get("name") or "")


def tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A call of the function ``name``, its arguments a JSON string, as the API gives them."""
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"id": f"call_{next(_ids):06d}", "type": "function", "function": function}


def ask_arguments(question: str) -> dict[str, Any]:
    """``ask_user``'s arguments in 1.0.102's structured form (its older ``question`` and
    ``choices`` get a tool failure): one field, "Yes" or "No"."""
    answer = {"type": "string", "title": "Pick", "enum": ["Yes", "No"]}
    return {"message": question, "requestedSchema": {"properties": {"answer": answer}, "required": ["answer"]}}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
