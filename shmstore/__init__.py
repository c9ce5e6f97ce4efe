"""shmstore: a shared in-memory store of AI coding-agent sessions for a multi-process daemon.

A manager process owns the sessions and serves them through a ``multiprocess`` manager;
worker and subscriber processes connect by address and authkey::

    import shmstore
    with shmstore.start_server("/tmp/demo.sock") as server:
        with shmstore.connect(server.address) as store:
            store.set(shmstore.Session(id="abc", working_dir="/src/app"))
            store.transition("abc", shmstore.Status.ATTENTION)
"""

__version__ = "0.1.0"  # when not installed; else importlib.metadata's

from .client import Client, Watch, connect
from .config import Limits, ServeOptions
from .errors import (
    AddressInUseError,
    AuthKeyError,
    ConflictError,
    NotFoundError,
    ResyncRequiredError,
    ShmstoreError,
    StoreFullError,
    StoreUnavailableError,
    ValidationError,
)
from .feed import Changes, Event, EventKind, Snapshot
from .model import AgentType, ApiUsage, Session, StateTransition, Status
from .server import ServerProcess, serve, start_server
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
    "StoreUnavailableError",
    "ValidationError",
    "Watch",
    "connect",
    "serve",
    "start_server",
]
