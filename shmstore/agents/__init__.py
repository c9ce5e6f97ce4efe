"""The agents shmstore follows, one adapter module each (the protocol they implement is in
:mod:`shmstore.agents.base`), and the registry that finds them by name.

Adding an agent is adding its module here (and its tests), and one line in
:data:`ADAPTERS`; its name must be a value of :class:`~shmstore.model.AgentType`. Modules
are imported when first asked for, so the hook loads only the agent it runs for.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)
if TYPE_CHECKING:
    from .base import Agent

#: Each agent's name (its AgentType value) and the module of this package that adapts it.
ADAPTERS = {
    "claude_code": "claude",
    "codex": "codex",
    "gemini_cli": "gemini",
    "copilot_cli": "copilot",
    "cursor": "cursor",
    "opencode": "opencode",
}
#: The agent a hook reports for when none is named.
DEFAULT = "claude_code"


def get(name: str) -> Agent:
    """The adapter of agent ``name``; KeyError names the agents there are."""
    module = ADAPTERS.get(name)
    if module is None:
        raise KeyError(f"no agent {name!r}; the agents are {', '.join(ADAPTERS)}")
    agent: Agent = importlib.import_module(f".{module}", __name__)
    return agent


def names() -> list[str]:
    """Every agent's name, as the registry lists them."""
    return list(ADAPTERS)
