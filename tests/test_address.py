"""Where a manager listens and keeps its key, and what clients and managers refuse to trust.

Another local user is simulated as root: files and directories are chowned to
:data:`OTHER_UID`. A planted "manager" is a bare listening socket, so a test can tell
whether a client ever connected to it (a connection would wait in its backlog).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, make_session

import shmstore
from shmstore import AddressInUseError
from shmstore.address import key_path, new_key

OTHER_UID = 12345
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def plant_manager(path: Path) -> socket.socket:
    """A socket that listens at ``path`` and never answers: a fake manager."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    os.chmod(path, 0o777)
    return listener


def nobody_connected(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def contents(directory: Path) -> dict[str, tuple[object, ...]]:
    """What is in ``directory``: each entry's kind, owner, mode, inode and content."""
    return {
        p.name: (
            *(getattr(os.lstat(p), f) for f in ("st_mode", "st_uid", "st_ino", "st_mtime_ns")),
            p.read_bytes() if p.is_file() else None,
        )
        for p in directory.iterdir()
    }


def plant_key(path: Path, *, mode: int = 0o600, owner: int | None = None) -> bytes:
    key = new_key()
    path.write_bytes(key)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)
    return key


@pytest.fixture
def runtime(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default runtime directory of this test (not yet created): $XDG_RUNTIME_DIR/shmstore."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir))
    monkeypatch.delenv("SHMSTORE_ADDRESS", raising=False)
    monkeypatch.delenv("SHMSTORE_AUTHKEY", raising=False)
    return sock_dir / "shmstore"


# -- item: the key file's name and how a manager claims it -----------------------------------


def test_the_key_file_is_the_socket_path_plus_key(sock_dir: Path) -> None:
    key_file = sock_dir / "store.sock.key"
    with shmstore.start_server(sock_dir / "store.sock") as server:
        assert key_path(server.address) == key_file
        assert key_file.read_bytes() == server.authkey and mode(key_file) == 0o600
        assert not (sock_dir / "store.key").exists()
        with shmstore.connect(server.address) as store:  # the client looks for the same name
            assert store.set(make_session()).revision == 1
    assert not key_file.exists()


def test_serve_at_server_sock_never_touches_a_users_server_key(sock_dir: Path) -> None:
    notes = sock_dir / "server.key"
    notes.write_text("my own notes\n")
    sock = sock_dir / "server.sock"
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmstore", "serve", "--address", str(sock)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert "serving at" in proc.stderr.readline()  # type: ignore[union-attr]
        with shmstore.connect(sock) as store:
            assert store.revision() == 0
        assert notes.read_text() == "my own notes\n"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert notes.read_text() == "my own notes\n"
    assert not sock.exists() and not Path(f"{sock}.key").exists()


def test_sockets_that_differ_only_in_their_suffix_have_key_files_of_their_own(sock_dir: Path) -> None:
    with (
        shmstore.start_server(sock_dir / "agents.sock") as first,
        shmstore.start_server(sock_dir / "agents.v2") as second,
    ):
        for server in (first, second):
            with shmstore.connect(server.address, timeout=2.0) as store:  # each by its own key file
                assert store.revision() == 0
        assert Path(f"{first.address}.key").read_bytes() == first.authkey
        assert Path(f"{second.address}.key").read_bytes() == second.authkey


@pytest.mark.parametrize("kind", ["regular file", "directory", "symbolic link"])
def test_serve_refuses_an_address_that_is_not_a_socket_and_leaves_it_untouched(sock_dir: Path, kind: str) -> None:
    path = sock_dir / "notes.txt"
    target = sock_dir / "target.txt"
    target.write_text("keep me")
    if kind == "regular file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
        (path / "inside.txt").write_text("keep me")
    else:
        path.symlink_to(target)
    with pytest.raises(AddressInUseError, match="^" + re.escape(f"{path} exists and is a {kind}, not a socket")):
        shmstore.start_server(path)
    if kind == "regular file":
        assert path.read_text() == "keep me"
    elif kind == "directory":
        assert (path / "inside.txt").read_text() == "keep me"
    else:
        assert path.is_symlink() and path.readlink() == target
    assert target.read_text() == "keep me"
    assert not Path(f"{path}.key").exists()


def _occupy_key_path(key_file: Path, what: str, elsewhere: Path) -> None:
    if what == "a file of the user's":
        key_file.write_text("not a key at all\n")
        os.chmod(key_file, 0o600)
    elif what == "a key-shaped file readable by others":
        plant_key(key_file, mode=0o644)
    elif what == "a key-shaped file of another user":
        plant_key(key_file, owner=OTHER_UID)
    elif what == "a symlink to a key-shaped file":
        plant_key(elsewhere)
        key_file.symlink_to(elsewhere)
    else:
        key_file.mkdir()


@pytest.mark.parametrize(
    "what",
    [
        "a file of the user's",
        "a key-shaped file readable by others",
        pytest.param("a key-shaped file of another user", marks=as_root),
        "a symlink to a key-shaped file",
        "a directory",
    ],
)
def test_serve_never_overwrites_an_existing_file_at_the_key_path(sock_dir: Path, what: str) -> None:
    sock = sock_dir / "s.sock"
    key_file = sock_dir / "s.sock.key"
    elsewhere = sock_dir / "elsewhere"
    _occupy_key_path(key_file, what, elsewhere)
    before = contents(sock_dir)
    with pytest.raises(AddressInUseError, match="^" + re.escape(f"{key_file} is where this manager's key file goes")):
        shmstore.start_server(sock)
    assert contents(sock_dir) == before  # everything as it was, and no socket left behind


def test_a_key_file_left_by_a_killed_manager_does_not_block_a_restart(sock_dir: Path) -> None:
    path = sock_dir / "k.sock"
    key_file = Path(f"{path}.key")
    first = shmstore.start_server(path)
    os.kill(first.pid, signal.SIGKILL)
    first.process.join(5)
    assert path.exists() and key_file.read_bytes() == first.authkey  # what SIGKILL leaves
    with shmstore.start_server(path) as second:
        assert key_file.read_bytes() == second.authkey != first.authkey
        with shmstore.connect(path) as store:
            assert store.revision() == 0
    assert not path.exists() and not key_file.exists()


def test_a_manager_that_finds_another_answering_leaves_its_key_file_alone(sock_dir: Path) -> None:
    with shmstore.start_server(sock_dir / "s.sock") as server:
        with pytest.raises(AddressInUseError, match="already serving"):
            shmstore.start_server(server.address)
        assert Path(f"{server.address}.key").read_bytes() == server.authkey
        with shmstore.connect(server.address) as store:
            assert store.revision() == 0


def test_a_manager_removes_its_key_file_only_while_it_is_still_its_own(sock_dir: Path) -> None:
    key_file = sock_dir / "s.sock.key"
    with shmstore.start_server(sock_dir / "s.sock"):
        replacement = sock_dir / "replacement"
        other = plant_key(replacement)
        os.replace(replacement, key_file)  # as if another manager had since written its key there
    assert key_file.read_bytes() == other
