"""Nothing held by threads that are gone: a Client keeps a small pool of connections, not
one per thread that ever called it, and a process that holds connections by the hundred
cannot turn the hooks away. Real threads, a real manager, real hooks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import SID, StartServer, hook, payload

import shmstore
from shmstore import StoreUnavailableError
from shmstore.clients.proxy import DEFAULT_MAX_CONNECTIONS


def test_a_client_shared_by_short_lived_threads_holds_a_few_connections(server: shmstore.ServerProcess) -> None:
    """A thread per request, as threaded servers do: 300 threads, each one call, each gone
    after. (Before, each left its connection open: 300 of them filled the manager's 256
    slots, 45 calls were refused, and every hook was then turned away.)"""
    errors: list[BaseException] = []
    with shmstore.connect(server.address, server.authkey, shared_memory=False) as client:

        def call(n: int) -> None:
            try:
                client.report(f"t{n}", "working", "/src/app")
            except BaseException as exc:
                errors.append(exc)

        for wave in range(10):
            threads = [threading.Thread(target=call, args=(wave * 30 + n,)) for n in range(30)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert errors == []
        assert client._get_proxy(0).connections() <= DEFAULT_MAX_CONNECTIONS
        assert client.info()["clients"] <= DEFAULT_MAX_CONNECTIONS + 1
        assert len(client.list_all()) == 300
    assert hook(server.address, payload("Stop")).returncode == 0
    with shmstore.connect(server.address, server.authkey) as store:
        assert store.get(SID) is not None


def test_a_call_that_finds_every_connection_in_use_waits_its_deadline_and_says_why(
    server: shmstore.ServerProcess,
) -> None:
    """Calls that wait in the manager (long polls) have max_connections of their own: when
    they are all taken, another such call waits by its deadline and says why, and a call
    that does not wait is not held up by them (it was, for its whole timeout)."""
    with shmstore.connect(server.address, server.authkey, timeout=0.5, max_connections=2) as client:
        waiting = [threading.Thread(target=client.changes, args=(0, 3.0)) for _ in range(2)]
        for thread in waiting:
            thread.start()
        proxy = client._get_proxy(time.monotonic() + 5)
        while sum(proxy._busy.values()) < 2:  # both long polls under way
            time.sleep(0.01)
        try:
            with pytest.raises(StoreUnavailableError, match="all 2 connections of this client"):
                client.changes(0, 0.2)
            started = time.monotonic()
            assert client.report("s1", "working", "/src") is not None  # at once, beside them
            assert time.monotonic() - started < 0.5
        finally:
            for thread in waiting:
                thread.join()
        assert client.revision() == 1


def test_many_lasting_connections_cannot_turn_the_hooks_away(start_server: StartServer, sock_dir: Path) -> None:
    """A process opening lasting connections until refused gets a clear error when only
    the slots kept for one-call connections are left; a hook then still reports."""
    server = start_server(max_connections=32)
    clients, refused = [], None
    try:
        for _ in range(40):
            client = shmstore.Client(server.address, server.authkey, shared_memory=False)
            try:
                client.revision()  # a lasting connection of its own
            except StoreUnavailableError as exc:
                refused = exc
                client.close()
                break
            clients.append(client)
        assert refused is not None
        assert "kept for hook reports" in str(refused)
        assert len(clients) == 32 - 32 // 16
        result = hook(server.address, payload("Stop"))
        assert (result.returncode, result.stderr) == (0, b"")
        assert clients[0].get(SID) is not None
    finally:
        for client in clients:
            client.close()
