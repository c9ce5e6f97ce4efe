"""A stand-in for the model API that Claude Code calls, on the loopback, for tests that drive
the real CLI (``tests/test_real_claude.py``).

Claude Code (2.1.332) sends ``POST /v1/messages?beta=true`` with ``"stream": true`` and reads
server-sent events (message_start, content_block_start/delta/stop, message_delta,
message_stop), as the Messages API's streaming reference gives them
(https://docs.anthropic.com/en/api/messages-streaming). The reply is scripted by the prompt
itself, so that a test reads as what it asks of the agent; the *last user message* decides
(system reminders may follow the prompt in the same message, so its first text is read):

- ``run: COMMAND``: a Bash tool call running COMMAND, then "done" once its result is back;
- ``ask: QUESTION``: an AskUserQuestion tool call with two options;
- ``delegate: TASK``: a subagent (the Agent, or Task, tool) given ``TASK``;
- ``fail``: an API error (400, which Claude does not retry);
- ``slow: SECONDS``: a text reply that takes that long to start;
- anything else, a tool's result included: a short text reply.

Every request is kept (``requests``) for a test to look at.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from loopback import JsonHandler, LoopbackServer

_ids = itertools.count(1)


class ModelStub(LoopbackServer):
    """The stand-in server, serving from a thread of the test's process until ``close()``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        stub = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    request = json.loads(body)
                except ValueError:
                    request = {}
                stub.requests.append({"path": self.path, **request})
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    return self._json(200, {"input_tokens": 10})
                stub.answer(self, request)

            def do_GET(self) -> None:
                self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "stub"}})

            def do_HEAD(self) -> None:
                self._json(200, {})

        self._serve(Handler)

    # -- the script ------------------------------------------------------------------------

    def answer(self, handler: Any, request: dict[str, Any]) -> None:
        text, after_tool = last_user_text(request.get("messages", []))
        tools = {tool.get("name") for tool in request.get("tools", []) if isinstance(tool, dict)}
        if after_tool or not text:
            return self._stream(handler, request, [text_block("done")])
        verb, _, rest = text.partition(":")
        verb, rest = verb.strip().lower(), rest.strip()
        if verb == "run" and "Bash" in tools:
            return self._stream(handler, request, [tool_block("Bash", {"command": rest, "description": "run it"})])
        if verb == "ask" and "AskUserQuestion" in tools:
            question = {"question": rest, "header": "Pick", "multiSelect": False}
            question["options"] = [{"label": "Yes", "description": "go on"}, {"label": "No", "description": "stop"}]
            return self._stream(handler, request, [tool_block("AskUserQuestion", {"questions": [question]})])
        if verb == "delegate" and tools & {"Agent", "Task"}:
            name = "Agent" if "Agent" in tools else "Task"
            task = {
                "description": "a subtask",
                "prompt": rest,
                "subagent_type": "general-purpose",
                "run_in_background": True,
            }
            return self._stream(handler, request, [tool_block(name, task)])
        if verb == "fail":
            error = {"type": "error", "error": {"type": "invalid_request_error", "message": "scripted failure"}}
            return handler._json(400, error)
        if verb == "slow":
            time.sleep(float(rest or 1))
        return self._stream(handler, request, [text_block("ok")])

    def _stream(self, handler: Any, request: dict[str, Any], blocks: list[dict[str, Any]]) -> None:
        stop = "tool_use" if any(block["type"] == "tool_use" for block in blocks) else "end_turn"
        if not request.get("stream"):
            message = _message(request, [dict(block) for block in blocks], stop)
            return handler._json(200, message)
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"message": _message(request, [], None)})]
        for index, block in enumerate(blocks):
            start = {**block, "input": {}} if block["type"] == "tool_use" else {"type": "text", "text": ""}
            events.append(("content_block_start", {"index": index, "content_block": start}))
            if block["type"] == "tool_use":
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            else:
                delta = {"type": "text_delta", "text": block["text"]}
            events.append(("content_block_delta", {"index": index, "delta": delta}))
            events.append(("content_block_stop", {"index": index}))
        events.append(("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": _usage()}))
        events.append(("message_stop", {}))
        data = b"".join(
            f"event: {name}\ndata: {json.dumps({'type': name, **fields})}\n\n".encode() for name, fields in events
        )
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def last_user_text(messages: list[Any]) -> tuple[str, bool]:
    """The last text of the last message from the user (a failed turn leaves its prompt
    in the same message as the next one), and whether that message gives a
    tool's result (the agent then waits for the model to carry on)."""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return _prompt(content), False
        blocks = [block for block in content or [] if isinstance(block, dict)]
        if any(block.get("type") == "tool_result" for block in blocks):
            return "", True
        texts = [block.get("text", "") for block in blocks if block.get("type") == "text"]
        texts = [text for text in texts if not text.lstrip().startswith("<")]  # system reminders, commands
        return (_prompt(texts[-1]) if texts else ""), False
    return "", False


def _prompt(text: str) -> str:
    return text.strip()


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_block(name: str, input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{next(_ids):06d}", "name": name, "input": input}


def _usage() -> dict[str, int]:
    return {"input_tokens": 12, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _message(request: dict[str, Any], content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
    return {
        "id": f"msg_{next(_ids):06d}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "claude-stub"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(),
    }
