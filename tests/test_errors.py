"""Errors carry the fields a caller acts on, and keep them across the process boundary."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from helpers import StartServer, make_session

import shmstore
from shmstore import errors

EXAMPLES = [
    errors.ValidationError("working_dir", "must be an absolute path"),
    errors.NotFoundError("s1"),
    errors.StoreFullError("full", limit="max_sessions", id="s1"),
    errors.ConflictError("s1", expected=3, current=5),
    errors.ResyncRequiredError("gone", reason="compacted", after_revision=7),
    errors.StoreUnavailableError("down", address="/run/x.sock"),
    errors.AuthKeyError("refused", address="/run/x.sock"),
    errors.AddressInUseError("taken", address="/run/x.sock"),
    errors.JumpRefusedError("s1", "pane_gone", "tmux pane %3 of session 's1' is gone"),
]


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_pickles_with_its_message_and_fields(error: errors.ShmstoreError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
    assert vars(copy)  # every error has fields


def test_our_authentication_error_is_not_named_like_multiprocess_s() -> None:
    import multiprocess

    assert not hasattr(shmstore, "AuthenticationError")
    assert shmstore.AuthKeyError.__name__ != multiprocess.AuthenticationError.__name__


def test_errors_raised_in_the_manager_arrive_with_their_fields(any_store: shmstore.Client) -> None:
    any_store.set(make_session("s1"))
    with pytest.raises(shmstore.ConflictError) as conflict:
        any_store.set(make_session("s1"), expected_revision=0)
    assert (conflict.value.id, conflict.value.expected, conflict.value.current) == ("s1", 0, 1)
    with pytest.raises(shmstore.NotFoundError) as missing:
        any_store.transition("nobody", "attention")
    assert missing.value.id == "nobody"
    with pytest.raises(shmstore.ResyncRequiredError) as resync:
        any_store.changes(99)
    assert (resync.value.reason, resync.value.after_revision) == ("ahead", 99)
    with pytest.raises(shmstore.ValidationError) as invalid:
        any_store.add_usage("s1", -1)
    assert invalid.value.field == "input_tokens"


def test_a_full_store_names_the_limit(start_server: StartServer) -> None:
    server = start_server(max_sessions=1)
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(make_session("a"))
        with pytest.raises(shmstore.StoreFullError) as full:
            store.set(make_session("b"))
    assert (full.value.limit, full.value.id) == ("max_sessions", "b")


def test_an_unreachable_manager_names_its_address(sock_dir: Path) -> None:
    with pytest.raises(shmstore.StoreUnavailableError) as down:
        shmstore.connect(sock_dir / "nobody.sock", authkey=b"k" * 64)
    assert down.value.address == str(sock_dir / "nobody.sock")
