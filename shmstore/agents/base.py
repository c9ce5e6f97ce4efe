"""What an agent adapter provides: the written protocol (:class:`Agent`) that each module
of this package implements, and the one value an adapter makes of a hook payload
(:class:`HookReport`).

An adapter is a module (``shmstore/agents/claude.py`` is Claude Code's) with:

* ``NAME``: its :class:`~shmstore.model.AgentType` value, and ``TITLE``, its name for people;
* ``EVENT_STATUS``: each event that says something of a session, and the status it means
  (one of :data:`STATUSES`); ``QUIET_EVENTS``: events it knows say nothing (ignored
  without a note, and never installed);
* ``read(payload, environ)``: the :class:`HookReport` a hook payload makes, with the
  environment the hook runs in (``None`` from ``status`` for a report that says nothing),
  or a ValidationError naming the field that is wrong;
* optionally ``settled(line)``: for an agent that may leave a question without an event
  (Esc at its permission prompt), whether a line its transcript gained since shows it back
  at its prompt (True), going on (False: stop watching) or neither (None); its ``read``
  then names the transcript of a question (:mod:`shmstore.hook.settle` watches it);
* ``default_settings()``, ``install(path, command, url=, dry_run=)`` and ``uninstall(path,
  dry_run=)``: where its hook settings live, and putting the hook command in and taking
  it out (:mod:`shmstore.agents.settings` does the careful file work for JSON settings);
  ``TAKES_HTTP``: whether ``install`` can write http hooks to the manager's ``url``;
  ``found()``: whether this machine has the agent (``install-hooks --agent all``).

The hook runner (:mod:`shmstore.hook.run`) and the failure log know nothing of any agent:
they call these. Adapters are on the hook's path, so they import the standard library's
light modules only, and what installing needs, inside ``install``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any, Protocol

    from .settings import Change

# The values of shmstore.model.Status (importing that module would import orjson).
WORKING, ATTENTION, QUESTION, CLOSED = "working", "attention", "question", "closed"
STATUSES = (WORKING, ATTENTION, QUESTION, CLOSED)


class HookReport:
    """What one hook payload says: the ``event``'s name, the agent's ``session`` id, the
    ``status`` it puts the session in (None: it says nothing of it), the working directory
    ``cwd``; when it closes the session, the agent's ``reason`` (None: none given); the
    ``subagent`` of the agent that fired it (None: the agent itself); the agent's
    ``background`` job, when it runs as one (None: in a terminal); and for a question the
    agent may leave without an event, the ``transcript`` file that shows it did (see
    :mod:`shmstore.hook.settle`)."""

    __slots__ = ("background", "cwd", "event", "reason", "session", "status", "subagent", "transcript")

    def __init__(
        self,
        event: str,
        session: str,
        status: str | None,
        cwd: str,
        reason: str | None = None,
        subagent: str | None = None,
        background: str | None = None,
        transcript: str | None = None,
    ) -> None:
        self.event, self.session, self.status, self.cwd = event, session, status, cwd
        self.reason, self.subagent, self.background, self.transcript = reason, subagent, background, transcript

    def __repr__(self) -> str:
        fields = (self.event, self.session, self.status, self.cwd, self.reason, self.subagent, self.background)
        return f"HookReport{fields!r}"


if TYPE_CHECKING:

    class Agent(Protocol):
        """An agent adapter module, as mypy checks it (see the module's docstring)."""

        @property
        def NAME(self) -> str: ...  # noqa: N802 - a module's constant
        @property
        def TITLE(self) -> str: ...  # noqa: N802
        @property
        def EVENT_STATUS(self) -> Mapping[str, str]: ...  # noqa: N802
        @property
        def QUIET_EVENTS(self) -> frozenset[str]: ...  # noqa: N802
        @property
        def TAKES_HTTP(self) -> bool: ...  # noqa: N802

        def found(self) -> bool: ...

        def read(self, payload: Mapping[str, Any], environ: Mapping[str, str]) -> HookReport: ...

        def default_settings(self) -> Path: ...

        def install(self, path: Path, command: str, *, url: str | None = None, dry_run: bool = False) -> Change: ...

        def uninstall(self, path: Path, *, dry_run: bool = False) -> Change: ...
