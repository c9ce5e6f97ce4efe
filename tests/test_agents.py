"""What every agent adapter must do (shmstore/agents/base.py), checked for each one in the
registry: a new adapter is held to these the moment its registry line is added."""

from __future__ import annotations

from pathlib import Path

import pytest

from shmstore import AgentType, ValidationError, agents
from shmstore.agents.base import STATUSES, HookReport


def test_the_registry_and_the_agent_types_name_the_same_agents() -> None:
    assert set(agents.names()) == {agent.value for agent in AgentType}
    assert agents.DEFAULT in agents.names()
    with pytest.raises(KeyError, match="no agent 'nobody'"):
        agents.get("nobody")


@pytest.mark.parametrize("name", agents.names())
def test_an_adapter_names_itself_and_maps_events_to_statuses_only(name: str) -> None:
    agent = agents.get(name)
    assert name == agent.NAME
    assert agent.TITLE
    assert agent.EVENT_STATUS
    assert set(agent.EVENT_STATUS.values()) <= set(STATUSES)
    assert not set(agent.EVENT_STATUS) & agent.QUIET_EVENTS  # an event says something, or nothing


@pytest.mark.parametrize("name", agents.names())
def test_an_adapter_refuses_a_payload_that_names_no_session(name: str) -> None:
    with pytest.raises(ValidationError):
        agents.get(name).read({}, {})


@pytest.mark.parametrize("name", agents.names())
def test_an_adapter_installs_into_and_uninstalls_from_an_empty_place_and_back(name: str, tmp_path: Path) -> None:
    agent = agents.get(name)
    assert agent.default_settings().is_absolute()
    settings = tmp_path / "settings"
    command = "/usr/bin/python3 -m shmstore hook"
    installed = agent.install(settings, command)
    assert installed.events
    assert agent.install(settings, command).events == []  # once is enough
    assert agent.uninstall(settings).events
    assert agent.uninstall(settings).events == []


def test_a_hook_report_says_what_it_holds() -> None:
    said = HookReport("Stop", "s1", "attention", "/src")
    assert (said.event, said.session, said.status, said.cwd, said.reason) == ("Stop", "s1", "attention", "/src", None)
    assert "attention" in repr(said)
