"""shmstore: a shared in-memory store of AI coding-agent sessions for a multi-process daemon.

A manager process owns the sessions and serves them through a ``multiprocess`` manager;
worker and subscriber processes connect by address and authkey::

    import shmstore
    with shmstore.start_server("/tmp/demo.sock") as server:
        with shmstore.connect(server.address) as store:
            store.set(shmstore.Session(id="abc", working_dir="/src/app"))
            store.transition("abc", shmstore.Status.ATTENTION)
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # as typing's, without importing typing (~4 ms of the hook's start-up)

__version__ = "0.1.0"  # when not installed; else importlib.metadata's

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ imports on first use
    from .clients.client import Client, Watch, connect
    from .clients.follow import Follower
    from .config import Limits, ServeOptions
    from .errors import (
        AddressInUseError,
        AuthKeyError,
        ConflictError,
        JumpRefusedError,
        NotFoundError,
        ResyncRequiredError,
        ShmstoreError,
        StoreFullError,
        StoreUnavailableError,
        ValidationError,
    )
    from .feed import Changes, Event, EventKind, Snapshot
    from .manager.launch import ServerProcess, start_server
    from .manager.lifecycle import serve
    from .model import AgentType, ApiUsage, Session, StateTransition, Status, Terminal
    from .store import Store

__all__ = [
    "AddressInUseError",
    "AgentType",
    "ApiUsage",
    "AuthKeyError",
    "Changes",
    "Client",
    "ConflictError",
    "Event",
    "EventKind",
    "Follower",
    "JumpRefusedError",
    "Limits",
    "NotFoundError",
    "ResyncRequiredError",
    "ServeOptions",
    "ServerProcess",
    "Session",
    "Snapshot",
    "ShmstoreError",
    "StateTransition",
    "Status",
    "Store",
    "StoreFullError",
    "Terminal",
    "StoreUnavailableError",
    "ValidationError",
    "Watch",
    "connect",
    "serve",
    "start_server",
]

#: The module each public name comes from. Importing ``shmstore`` imports none of them, so
#: ``shmstore hook`` (and anything else that needs only part of the package) never pays for
#: ``multiprocess``, ``dill`` and ``orjson`` (~100 ms, measured with ``python -X importtime``).
_SOURCES = {
    "Client": "clients.client",
    "Watch": "clients.client",
    "connect": "clients.client",
    "Follower": "clients.follow",
    "Limits": "config",
    "ServeOptions": "config",
    "AddressInUseError": "errors",
    "AuthKeyError": "errors",
    "ConflictError": "errors",
    "JumpRefusedError": "errors",
    "NotFoundError": "errors",
    "ResyncRequiredError": "errors",
    "ShmstoreError": "errors",
    "StoreFullError": "errors",
    "StoreUnavailableError": "errors",
    "ValidationError": "errors",
    "Changes": "feed",
    "Event": "feed",
    "EventKind": "feed",
    "Snapshot": "feed",
    "AgentType": "model",
    "ApiUsage": "model",
    "Session": "model",
    "StateTransition": "model",
    "Status": "model",
    "Terminal": "model",
    "ServerProcess": "manager.launch",
    "serve": "manager.lifecycle",
    "start_server": "manager.launch",
    "Store": "store",
}


def __getattr__(name: str) -> object:
    """Import a public name's module on first use (PEP 562), and keep the name here."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
