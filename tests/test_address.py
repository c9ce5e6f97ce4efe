"""Where a manager listens and keeps its key, and what clients and managers refuse to trust.

Another local user is simulated as root: files and directories are chowned to
:data:`OTHER_UID`. A planted "manager" is a bare listening socket, so a test can tell
whether a client ever connected to it (a connection would wait in its backlog).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTHON, make_session, serving

import shmstore
from shmstore import AddressInUseError, StoreUnavailableError
from shmstore.transport.address import _runtime_dir, key_path, new_key

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
        assert key_path(server.address) == str(key_file)
        assert key_file.read_bytes() == server.authkey
        assert mode(key_file) == 0o600
        assert not (sock_dir / "store.key").exists()
        with shmstore.connect(server.address) as store:  # the client looks for the same name
            assert store.set(make_session()).revision == 1
    assert not key_file.exists()


def test_serve_at_server_sock_never_touches_a_users_server_key(sock_dir: Path) -> None:
    notes = sock_dir / "server.key"
    notes.write_text("my own notes\n")
    sock = sock_dir / "server.sock"
    with serving(sock) as proc:
        with shmstore.connect(sock) as store:
            assert store.revision() == 0
        assert notes.read_text() == "my own notes\n"
        proc.terminate()
        assert proc.wait(10) == 0
    assert notes.read_text() == "my own notes\n"
    assert not sock.exists()
    assert not Path(f"{sock}.key").exists()


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
        assert path.is_symlink()
        assert path.readlink() == target
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
    assert path.exists()
    assert key_file.read_bytes() == first.authkey
    with shmstore.start_server(path) as second:
        assert key_file.read_bytes() == second.authkey != first.authkey
        with shmstore.connect(path) as store:
            assert store.revision() == 0
    assert not path.exists()
    assert not key_file.exists()


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


# -- item: directories and key files another user could have planted -------------------------


def test_without_xdg_runtime_dir_the_runtime_dir_is_run_user_uid_if_it_is_ours(tmp_path: Path) -> None:
    run_user, tmp, uid = tmp_path / "run" / "user", tmp_path / "tmp", os.getuid()
    assert Path(_runtime_dir(None, uid, run_user, tmp)) == tmp / f"shmstore-{uid}"  # no /run/user/UID
    (run_user / str(uid)).mkdir(mode=0o700, parents=True)
    assert Path(_runtime_dir(None, uid, run_user, tmp)) == run_user / str(uid) / "shmstore"
    assert Path(_runtime_dir("", uid, run_user, tmp)) == run_user / str(uid) / "shmstore"
    assert Path(_runtime_dir("/run/xdg", uid, run_user, tmp)) == Path("/run/xdg/shmstore")


@as_root
def test_a_run_user_directory_of_another_user_or_a_symlink_is_passed_over(tmp_path: Path) -> None:
    run_user, tmp, uid = tmp_path / "run" / "user", tmp_path / "tmp", os.getuid()
    (run_user / str(uid)).mkdir(parents=True)
    os.chown(run_user / str(uid), OTHER_UID, OTHER_UID)
    assert Path(_runtime_dir(None, uid, run_user, tmp)) == tmp / f"shmstore-{uid}"
    (run_user / str(uid)).rmdir()
    (tmp_path / "mine").mkdir(mode=0o700)
    (run_user / str(uid)).symlink_to(tmp_path / "mine")
    assert Path(_runtime_dir(None, uid, run_user, tmp)) == tmp / f"shmstore-{uid}"


def _squat(runtime: Path) -> tuple[socket.socket, Path]:
    """What another user plants: the runtime directory, a key file and a fake manager."""
    runtime.mkdir(mode=0o755)
    listener = plant_manager(runtime / "store.sock")
    key_file = runtime / "store.sock.key"
    plant_key(key_file, mode=0o644)
    for path in (runtime, runtime / "store.sock", key_file):
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
    return listener, key_file


@as_root
def test_a_client_refuses_a_runtime_directory_another_user_made_and_never_connects(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, _ = _squat(runtime)
    refused = "^" + re.escape(f"refusing the runtime directory {runtime}: it belongs to uid {OTHER_UID}")
    with pytest.raises(StoreUnavailableError, match=refused):
        shmstore.connect(timeout=1.0)
    monkeypatch.setenv("SHMSTORE_AUTHKEY", "a-key-of-my-own")  # no key file, but still the directory
    with pytest.raises(StoreUnavailableError, match=refused):
        shmstore.connect(timeout=1.0)
    assert nobody_connected(listener)
    listener.close()


@as_root
def test_serve_refuses_a_runtime_directory_another_user_made_and_leaves_it_alone(runtime: Path) -> None:
    listener, key_file = _squat(runtime)
    key = key_file.read_bytes()
    with pytest.raises(
        StoreUnavailableError,
        match="^" + re.escape(f"refusing the runtime directory {runtime}: it belongs to uid {OTHER_UID}"),
    ):
        shmstore.start_server()
    assert key_file.read_bytes() == key
    assert mode(runtime) == 0o755
    assert (runtime / "store.sock").is_socket()
    listener.close()


def test_a_runtime_directory_that_is_a_symlink_is_refused_by_client_and_manager(runtime: Path, sock_dir: Path) -> None:
    real = sock_dir / "real"
    real.mkdir(mode=0o700)
    listener = plant_manager(real / "store.sock")
    plant_key(real / "store.sock.key")
    runtime.symlink_to(real)
    problem = "^" + re.escape(f"refusing the runtime directory {runtime}: it is a symbolic link, not a directory")
    with pytest.raises(StoreUnavailableError, match=problem):
        shmstore.connect(timeout=1.0)
    with pytest.raises(StoreUnavailableError, match=problem):
        shmstore.start_server()
    assert nobody_connected(listener)
    listener.close()


def test_a_manager_makes_its_own_runtime_directory_private_and_clients_insist_on_it(runtime: Path) -> None:
    runtime.mkdir(mode=0o755)
    os.chmod(runtime, 0o755)
    with shmstore.start_server() as server:
        assert mode(runtime) == 0o700
        with shmstore.connect() as store:
            assert store.revision() == 0
        os.chmod(runtime, 0o750)
        with pytest.raises(StoreUnavailableError, match="its mode is 0750, so others may enter it"):
            shmstore.connect(timeout=1.0)
        with shmstore.connect(server.address, server.authkey) as store:  # an explicit key checks nothing
            assert store.revision() == 0


SOCKET_DIRS = [
    pytest.param(OTHER_UID, 0o755, f"belongs to uid {OTHER_UID}", marks=as_root, id="another-users"),
    pytest.param(None, 0o777, "is writable by group and others without the sticky bit", id="world-writable"),
    pytest.param(None, 0o770, "is writable by its group without the sticky bit", id="group-writable"),
]


@pytest.mark.parametrize(("owner", "dir_mode", "problem"), SOCKET_DIRS)
def test_a_client_refuses_a_socket_directory_others_control_and_never_connects(
    sock_dir: Path, owner: int | None, dir_mode: int, problem: str
) -> None:
    directory = sock_dir / "shared"
    directory.mkdir()
    listener = plant_manager(directory / "s.sock")
    plant_key(directory / "s.sock.key")  # the key file itself would pass
    os.chmod(directory, dir_mode)
    if owner is not None:
        os.chown(directory, owner, owner)
    with pytest.raises(
        StoreUnavailableError, match="^" + re.escape(f"refusing the socket directory {directory}: it {problem}")
    ):
        shmstore.connect(directory / "s.sock", timeout=1.0)
    assert nobody_connected(listener)
    listener.close()


@pytest.mark.parametrize(("owner", "dir_mode", "problem"), SOCKET_DIRS)
def test_serve_refuses_a_socket_directory_others_control(
    sock_dir: Path, owner: int | None, dir_mode: int, problem: str
) -> None:
    directory = sock_dir / "shared"
    directory.mkdir()
    os.chmod(directory, dir_mode)
    if owner is not None:
        os.chown(directory, owner, owner)
    with pytest.raises(
        StoreUnavailableError, match="^" + re.escape(f"refusing the socket directory {directory}: it {problem}")
    ):
        shmstore.start_server(directory / "s.sock")
    assert list(directory.iterdir()) == []


def test_a_sticky_world_writable_directory_like_tmp_is_fine(sock_dir: Path) -> None:
    sticky = sock_dir / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    in_tmp = Path(tempfile.mktemp(prefix="shm-", suffix=".sock", dir="/tmp"))  # /tmp itself: root's, sticky
    for path in (sticky / "s.sock", in_tmp):
        with shmstore.start_server(path), shmstore.connect(path) as store:
            assert store.revision() == 0
        assert not path.exists()
        assert not Path(f"{path}.key").exists()


def _tamper(key_file: Path, how: str, sock_dir: Path) -> None:
    if how == "mode 0644":
        plant_key(key_file, mode=0o644)
    elif how == "mode 0400":
        plant_key(key_file, mode=0o400)
    elif how == "another user's":
        plant_key(key_file, owner=OTHER_UID)
    elif how == "a symlink":
        plant_key(sock_dir / "real.key")
        key_file.symlink_to(sock_dir / "real.key")
    else:
        os.mkfifo(key_file, 0o600)  # a FIFO would block a plain open() for ever


KEY_FILES = [
    ("mode 0644", "has mode 0644, not 0600"),
    ("mode 0400", "has mode 0400, not 0600"),
    pytest.param("another user's", f"belongs to uid {OTHER_UID}", marks=as_root),
    ("a symlink", "is a symbolic link, not a regular file"),
    ("a FIFO", "is a FIFO, not a regular file"),
]


@pytest.mark.parametrize(("how", "problem"), KEY_FILES)
def test_a_client_refuses_a_key_file_that_is_not_a_private_file_of_its_own(
    sock_dir: Path, how: str, problem: str
) -> None:
    listener = plant_manager(sock_dir / "s.sock")
    key_file = sock_dir / "s.sock.key"
    _tamper(key_file, how, sock_dir)
    with pytest.raises(StoreUnavailableError, match="^" + re.escape(f"refusing key file {key_file}: it {problem}")):
        shmstore.connect(sock_dir / "s.sock", timeout=1.0)
    assert nobody_connected(listener)
    listener.close()


def test_a_client_of_a_real_manager_refuses_its_key_file_once_others_may_read_it(sock_dir: Path) -> None:
    with shmstore.start_server(sock_dir / "s.sock") as server:
        key_file = Path(f"{server.address}.key")
        os.chmod(key_file, 0o644)
        with pytest.raises(StoreUnavailableError, match="has mode 0644, not 0600"):
            shmstore.connect(server.address, timeout=1.0)
        os.chmod(key_file, 0o600)
        with shmstore.connect(server.address) as store:
            assert store.revision() == 0


# The shmstore command as another user: root starts Python (its interpreter may live where
# only root can read), then becomes the user, then runs the command line.
AS_USER = (
    "import os, sys\n"
    "import shmstore.commands.cli\n"
    "uid = int(sys.argv[1])\n"
    "os.setgroups([])\n"
    "os.setgid(uid)\n"
    "os.setuid(uid)\n"
    "sys.exit(shmstore.commands.cli.main(sys.argv[2:]))\n"
)


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A user with no runtime directory (nothing at /run/user/UID or /tmp/shmstore-UID) and
    an environment without XDG_RUNTIME_DIR, as under cron or ssh without logind."""
    uid = 20000 + os.getpid() % 10000
    while Path(f"/run/user/{uid}").exists() or Path(f"/tmp/shmstore-{uid}").exists():
        uid += 1
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, uid, uid)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "SHMSTORE_ADDRESS", "SHMSTORE_AUTHKEY")}
    env["HOME"] = str(home)
    try:
        yield uid, env
    finally:
        shutil.rmtree(f"/tmp/shmstore-{uid}", ignore_errors=True)


def as_user(uid: int, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [PYTHON, "-c", AS_USER, str(uid), *args]
    return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=60)


@as_root
def test_shmstore_ls_refuses_a_squatted_tmp_directory_and_never_talks_to_the_planted_manager(
    victim: tuple[int, dict[str, str]],
) -> None:
    uid, env = victim
    squat = Path(f"/tmp/shmstore-{uid}")  # the default without XDG_RUNTIME_DIR or /run/user/UID
    listener, key_file = _squat(squat)
    os.chmod(key_file, 0o644)  # so the victim could read it
    key = key_file.read_bytes()

    ls = as_user(uid, env, "ls", "--timeout", "1")
    assert ls.returncode == 3  # the manager cannot be reached: not one to trust
    assert f"refusing the runtime directory {squat}: it belongs to uid {OTHER_UID}" in ls.stderr
    assert nobody_connected(listener)

    serve = as_user(uid, env, "serve")
    assert serve.returncode == 3  # StoreUnavailableError, whichever command meets it
    assert f"refusing the runtime directory {squat}" in serve.stderr
    assert key_file.read_bytes() == key
    assert (squat / "store.sock").is_socket()
    listener.close()

    shutil.rmtree(squat)  # without the squat, the same user's manager and client meet there
    argv = [PYTHON, "-c", AS_USER, str(uid), "serve"]
    with subprocess.Popen(argv, env=env, cwd="/", stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert f"serving at {squat}/store.sock" in proc.stderr.readline()  # type: ignore[union-attr]
            assert (os.lstat(squat).st_uid, mode(squat)) == (uid, 0o700)
            ls = as_user(uid, env, "ls", "--json")
            assert (ls.returncode, ls.stdout.strip()) == (0, "[]"), ls.stderr
        finally:
            proc.terminate()
            assert proc.wait(10) == 0


# -- item: serve() off the main thread, and the signal handlers it borrows -------------------

IN_A_THREAD = """
import signal, sys, threading, shmstore
stop, ready, failed = threading.Event(), threading.Event(), []
def run():
    try:
        shmstore.serve(sys.argv[1], stop_event=stop, on_ready=lambda address: ready.set())
    except BaseException as exc:
        failed.append(exc)
        ready.set()
thread = threading.Thread(target=run)
thread.start()
ready.wait(10)
print(repr(failed[0]) if failed else "ready", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
sys.stdin.readline()
stop.set()
thread.join(10)
print("running" if thread.is_alive() else "stopped", flush=True)
"""


def test_serve_runs_in_any_thread_and_stops_when_its_stop_event_is_set(sock_dir: Path) -> None:
    sock = sock_dir / "t.sock"
    with subprocess.Popen(
        [PYTHON, "-c", IN_A_THREAD, str(sock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline().split() == ["ready", "True"]  # and no signal handler was touched
            with shmstore.connect(sock) as store:
                assert store.set(make_session()).revision == 1
                assert store.get("s1") is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "stopped"
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not sock.exists()
    assert not Path(f"{sock}.key").exists()


IN_THE_MAIN_THREAD = """
import os, signal, sys, shmstore
caught = []
def mine(signum, frame):
    caught.append(signum)
signal.signal(signal.SIGTERM, mine)
before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
shmstore.serve(sys.argv[1], on_ready=lambda address: print("ready", flush=True))
after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
os.kill(os.getpid(), signal.SIGTERM)  # reaches our own handler again
print("restored" if after == before and caught == [signal.SIGTERM] else f"{before} -> {after}", flush=True)
"""


def test_serve_puts_back_the_signal_handlers_it_replaced(sock_dir: Path) -> None:
    sock = sock_dir / "m.sock"
    with subprocess.Popen([PYTHON, "-c", IN_THE_MAIN_THREAD, str(sock)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline().strip() == "ready"
            with shmstore.connect(sock) as store:
                assert store.revision() == 0
            proc.send_signal(signal.SIGTERM)  # stops the manager: serve() handles it while it runs
            assert proc.stdout.readline().strip() == "restored"
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not sock.exists()
    assert not Path(f"{sock}.key").exists()
