"""The hook's light client (shmstore.clients.reporter) against a real manager: it must land exactly as
Client.report does, be applied once however often its request is sent, and need nothing
heavier than the standard library. Also the lazy package namespace it relies on."""

from __future__ import annotations

import hmac
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, RawStore, snapshot

import shmstore
from shmstore import AuthKeyError, Status, StoreUnavailableError, ValidationError
from shmstore.clients import reporter
from shmstore.record import session_from_store
from shmstore.transport import protocol
from shmstore.transport.address import _runtime_dir


def light_report(server: shmstore.ServerProcess, id: str, status: str, **fields: object) -> bytes:
    working_dir = fields.get("working_dir", "/src/app")
    args = (id, status, working_dir, fields.get("pid", os.getpid()), fields.get("session_id"))
    data = reporter.report(server.address, server.authkey, args, deadline=time.monotonic() + 10)
    assert data is not None
    return data


def test_a_light_report_lands_exactly_as_a_client_report(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    steps = [Status.ATTENTION, Status.WORKING, Status.WORKING, Status.QUESTION, Status.CLOSED, Status.ATTENTION]
    for status in steps:
        heavy = store.report("heavy", status, "/src/app", pid=os.getpid(), session_id="r1")
        light = session_from_store(light_report(server, "light", status.value, session_id="r1"))
        assert light == store.get("light")  # what came back is what the store keeps
        assert light.status is heavy.status
        assert (light.pid, light.pid_start, light.session_id) == (heavy.pid, heavy.pid_start, heavy.session_id)
        assert [(h.from_, h.to) for h in light.history] == [(h.from_, h.to) for h in heavy.history]
        assert light.revision == heavy.revision + 1  # one change each, in turn
    assert store.revision() == 2 * len(steps)


def test_a_repeated_light_request_is_applied_once(server: shmstore.ServerProcess, store: shmstore.Client) -> None:
    token = os.urandom(16)

    def send() -> bytes | None:
        return reporter.report(
            server.address, server.authkey, ("s1", "working", "/src/app"), token=token, deadline=time.monotonic() + 10
        )

    first, again = send(), send()
    assert again == first
    assert store.revision() == 1
    assert [e.kind.value for e in store.changes(0).events] == ["report"]


def test_bad_input_is_the_managers_typed_error_and_changes_nothing(
    server: shmstore.ServerProcess, store: shmstore.Client
) -> None:
    before = snapshot(store)
    with pytest.raises(ValidationError, match="status: must be one of"):
        light_report(server, "s1", "sleeping")
    with pytest.raises(ValidationError, match="working_dir: must be an absolute path"):
        light_report(server, "s1", "working", working_dir="relative")
    assert snapshot(store) == before


def test_a_wrong_key_or_no_manager_is_a_typed_error_in_time(server: shmstore.ServerProcess, sock_dir: Path) -> None:
    with pytest.raises(AuthKeyError):
        reporter.report(server.address, b"wrong", ("s1", "working", "/a"), deadline=time.monotonic() + 5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="failed during report"):
        reporter.report(str(sock_dir / "nobody.sock"), b"key", ("s1", "working", "/a"), deadline=time.monotonic() + 5)
    assert time.monotonic() - started < 1.0


def test_the_light_client_needs_only_the_standard_library(server: shmstore.ServerProcess) -> None:
    code = (
        "import sys, time; from shmstore.clients import reporter; "
        f"reporter.report({server.address!r}, {server.authkey!r}, ('s1', 'question', '/a'), "
        "deadline=time.monotonic() + 10); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'multiprocess', 'dill', 'orjson'}))"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=30)
    assert (result.stdout, result.stderr) == ("[]\n", "")
    with RawStore(server.address, server.authkey) as raw:
        assert raw.call("get", "s1") is not None


# -- the package's namespace is lazy ------------------------------------------------------------


def test_importing_shmstore_imports_nothing_heavy_until_a_name_is_used() -> None:
    code = (
        "import sys, shmstore; heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & "
        "{'multiprocess', 'dill', 'orjson'}); print(heavy()); shmstore.Client; print(heavy())"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.splitlines() == ["[]", "['dill', 'multiprocess', 'orjson']"]


def test_every_public_name_resolves_and_an_unknown_one_is_an_attribute_error() -> None:
    assert set(shmstore._SOURCES) == set(shmstore.__all__)
    for name in shmstore.__all__:
        value = getattr(shmstore, name)
        assert value.__module__ == f"shmstore.{shmstore._SOURCES[name]}", name
    assert set(shmstore.__all__) <= set(dir(shmstore))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        shmstore.Nope  # type: ignore[attr-defined]  # noqa: B018


# -- the default address -------------------------------------------------------------------------


def test_the_default_runtime_dir_is_the_same_with_or_without_xdg_runtime_dir(tmp_path: Path) -> None:
    """The agent's hooks and the user's shell may differ in XDG_RUNTIME_DIR (set by logind
    to /run/user/UID in a login session, unset under some service managers and sudo): both
    resolve to /run/user/UID/shmstore when that directory is the user's."""
    uid = os.getuid()
    run_user = tmp_path / "run-user"
    (run_user / str(uid)).mkdir(parents=True)
    with_xdg = Path(_runtime_dir(str(run_user / str(uid)), uid, run_user, tmp_path))
    assert with_xdg == Path(_runtime_dir(None, uid, run_user, tmp_path)) == run_user / str(uid) / "shmstore"


def test_the_handshakes_hmac_is_the_standard_librarys_for_every_key_length() -> None:
    """protocol signs with HMAC-SHA256 over the built-in SHA-256 (no OpenSSL at start-up):
    it must give hmac's digests, keys longer than a block (hashed first) included."""
    rng = random.Random(11)
    for length in [0, 1, 31, 32, 63, 64, 65, 100, 1000]:
        key, message = rng.randbytes(length), rng.randbytes(rng.randrange(200))
        assert protocol.hmac_sha256(key, message) == hmac.digest(key, message, "sha256")
