"""One list of operations: what the manager exposes, what the Client offers, and what README
documents must name the same calls."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import shmstore
from shmstore.backend import EXPOSED, WRITES
from shmstore.store import Store

README = Path(__file__).resolve().parent.parent / "README.md"
#: Client methods that are not calls on the manager.
CLIENT_ONLY = {"connect", "close", "watch"}
#: Manager methods the Client wraps rather than offers.
MANAGER_ONLY = {"once"}


def client_calls() -> set[str]:
    names = {name for name, _ in inspect.getmembers(shmstore.Client, inspect.isfunction) if not name.startswith("_")}
    return names - CLIENT_ONLY


def readme_operations() -> set[str]:
    """The calls in the first table of README's Operations section (a blank line would end
    the table there, which is how rows went missing from the rendered page once)."""
    section = README.read_text().split("## Operations", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("\n|") :].split("\n\n", 1)[0]
    return set(re.findall(r"^\| `(\w+)\(", table, re.M))


def test_every_exposed_method_is_a_client_call_and_nothing_else_is() -> None:
    assert set(EXPOSED) - MANAGER_ONLY == client_calls()


def test_readme_documents_exactly_the_client_calls() -> None:
    assert readme_operations() == client_calls()


def test_every_exposed_name_is_a_store_method_and_every_write_is_exposed() -> None:
    assert all(callable(getattr(Store, name, None)) for name in EXPOSED)
    assert set(WRITES) <= set(EXPOSED)
    assert len(EXPOSED) == len(set(EXPOSED))
