"""A stand-in for the Gemini API that Gemini CLI calls, on the loopback, for tests that drive
the real CLI (``tests/test_real_gemini.py``), as :mod:`model_stub` is for Claude Code.

Gemini CLI (0.61.0) sends its requests through the @google/genai SDK to the base URL
``GOOGLE_GEMINI_BASE_URL`` names, with ``GEMINI_API_KEY`` as ``x-goog-api-key``. The wire
format is the API reference's (https://ai.google.dev/api/generate-content, and
https://ai.google.dev/api/tokens for countTokens):

- ``POST /v1beta/models/MODEL:streamGenerateContent?alt=sse``: the agent's turn, read as
  server-sent events, each ``data:`` a ``GenerateContentResponse``;
- ``POST /v1beta/models/MODEL:generateContent``: the CLI's side requests (its model
  router's classifier, the next-speaker check), which ask for JSON with a response schema:
  answered by filling the schema (:func:`fill`);
- ``POST /v1beta/models/MODEL:countTokens``: ``{"totalTokens": N}``.

The reply is scripted by the prompt itself, so that a test reads as what it asks of the
agent; the last text of the *last user content* decides:

- ``run: COMMAND``: a ``run_shell_command`` function call running COMMAND (offered only in
  interactive mode and with ``--approval-mode yolo``), then "done" once its
  ``functionResponse`` is back;
- anything else: a short text reply ("ok").

Every request is kept (``requests``) for a test to look at.
"""

from __future__ import annotations

import http.server
import json
from typing import Any

from loopback import JsonHandler, LoopbackServer

#: Gemini CLI's shell tool, the one ``run:`` calls.
SHELL_TOOL = "run_shell_command"
#: Answers to the properties the CLI's side requests ask for: the router picks a model, and
#: the next-speaker check must say "user", or the CLI would carry on by itself.
FIELD_VALUES = {"next_speaker": "user", "model_choice": "flash", "complexity_score": 10}


class GeminiStub(LoopbackServer):
    """The stand-in server, serving from a thread of the test's process until ``close()``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._serve(_handler(self))

    def answer(self, path: str, request: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        """The status, body and framing (server-sent events or not) for one POST to ``path``."""
        self.requests.append({"path": path, **request})
        method = path.split("?")[0].rpartition(":")[2]
        if method == "countTokens":
            return 200, {"totalTokens": 10}, False
        if method not in ("generateContent", "streamGenerateContent"):
            return 404, {"error": {"code": 404, "message": f"stub: no {path}", "status": "NOT_FOUND"}}, False
        schema = _schema(request)
        if schema is not None:
            return 200, response([{"text": json.dumps(fill(schema))}]), False
        return 200, response(reply(request)), method == "streamGenerateContent"


def _handler(stub: GeminiStub) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler class, bound to ``stub`` (the server makes one per connection)."""

    class Handler(JsonHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                request = json.loads(body) if body else {}
            except ValueError:
                request = {}
            code, value, stream = stub.answer(self.path, request if isinstance(request, dict) else {})
            if stream:  # one event holds the whole reply: the CLI reads it as a stream of one
                self._send(code, "text/event-stream", f"data: {json.dumps(value)}\r\n\r\n".encode())
            else:
                self._send(code, "application/json; charset=UTF-8", json.dumps(value).encode())

        def do_GET(self) -> None:
            self._send(200, "application/json; charset=UTF-8", b'{"models": []}')  # GET /v1beta/models

    return Handler


def _schema(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a side request wants its answer in (None for the agent's turn)."""
    config = request.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    return schema if isinstance(schema, dict) else None


def reply(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of the model's reply to the agent's turn, by the script (see the module)."""
    text, after_tool = last_user_text(request.get("contents") or [])
    verb, _, rest = text.partition(":")
    if not after_tool and verb.strip().lower() == "run" and SHELL_TOOL in tool_names(request):
        return [{"functionCall": {"name": SHELL_TOOL, "args": {"command": rest.strip(), "description": "run it"}}}]
    return [{"text": "done" if after_tool else "ok"}]


def last_user_text(contents: list[Any]) -> tuple[str, bool]:
    """The last text of the last user content, and whether that content gives a tool's
    result (a ``functionResponse``: the model is to carry on). Texts in angle brackets are
    the CLI's own context (the session's directory, the date), not the user's prompt."""
    for content in reversed(contents):
        if not isinstance(content, dict) or content.get("role", "user") != "user":
            continue
        parts = [part for part in content.get("parts") or [] if isinstance(part, dict)]
        if any("functionResponse" in part for part in parts):
            return "", True
        texts = [part["text"].strip() for part in parts if isinstance(part.get("text"), str)]
        texts = [text for text in texts if text and not text.startswith("<")]
        return (texts[-1] if texts else ""), False
    return "", False


def tool_names(request: dict[str, Any]) -> set[str]:
    """The functions the request offers the model: the tools the CLI lets it call."""
    return {
        declaration.get("name")
        for tool in request.get("tools") or []
        for declaration in (tool or {}).get("functionDeclarations") or []
    }


def fill(schema: dict[str, Any], name: str = "") -> Any:
    """A value of the JSON ``schema`` (of the property ``name``): :data:`FIELD_VALUES` where
    it names one, else the first of an enum, else the simplest value of its type."""
    if name in FIELD_VALUES:
        return FIELD_VALUES[name]
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "object")).lower()
    if kind == "object":
        return {key: fill(value or {}, key) for key, value in (schema.get("properties") or {}).items()}
    return {"array": [], "number": 1, "integer": 1, "boolean": False}.get(kind, "stub")


def response(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``GenerateContentResponse`` of one candidate holding ``parts``, finished."""
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 5, "totalTokenCount": 17},
        "modelVersion": "gemini-stub",
    }
