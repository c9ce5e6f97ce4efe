"""How ``start_server`` makes the manager's process: forked from a caller that runs one
thread, from a fork server when the caller runs others (so no process with threads is
forked, and Python 3.12+ has nothing to warn about), or spawned when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PYTHON, StartServer

import shmstore
from shmstore.errors import StoreFullError, ValidationError

# Run as a script of its own: the pytest process under xdist runs a thread of execnet's.
# Prints whether the manager is this process's own child, and the warnings about forking a
# process with threads (Python 3.12+), after serving one call. The warning is recorded, not
# made an error: CPython drops the error that warning raises (3.12.1 and 3.13.0 checked).
CALLER = """
import os, sys, threading, warnings, psutil, shmstore
if __name__ == "__main__":
    if sys.argv[2] == "threads":
        threading.Thread(target=threading.Event().wait, daemon=True).start()
    os.environ["XDG_RUNTIME_DIR"] = sys.argv[1]  # set late: the manager must still see it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = shmstore.start_server()
    with server, shmstore.connect(server.address, server.authkey) as store:
        assert store.revision() == 0
        forks = [w for w in caught if "fork" in str(w.message)]
        print(psutil.Process(server.pid).ppid() == os.getpid(), server.address, len(forks))
"""


def _start_from(caller_threads: str, runtime: Path) -> list[str]:
    result = subprocess.run(
        [PYTHON, "-c", CALLER, str(runtime), caller_threads], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.split()


def test_a_caller_with_one_thread_forks_the_manager_itself(sock_dir: Path) -> None:
    assert _start_from("single", sock_dir) == ["True", f"{sock_dir}/shmstore/store.sock", "0"]


def test_a_caller_running_threads_gets_its_manager_from_a_fork_server_with_its_environment(sock_dir: Path) -> None:
    assert _start_from("threads", sock_dir) == ["False", f"{sock_dir}/shmstore/store.sock", "0"]


def test_forking_a_caller_that_runs_threads_is_what_python_warns_about(sock_dir: Path) -> None:
    # The check above could not fail if Python never warned: with start_method="fork" it does.
    script = CALLER.replace("shmstore.start_server()", 'shmstore.start_server(start_method="fork")')
    result = subprocess.run(
        [PYTHON, "-c", script, str(sock_dir), "threads"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[::2] == ["True", "1" if sys.version_info >= (3, 12) else "0"]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_manager_not_forked_from_its_caller_holds_the_store_it_was_given(
    start_server: StartServer, method: str
) -> None:
    server = start_server(max_sessions=1, start_method=method)
    with shmstore.connect(server.address, server.authkey) as store:
        store.set(shmstore.Session(id="a", working_dir="/src"))
        with pytest.raises(StoreFullError):
            store.set(shmstore.Session(id="b", working_dir="/src"))
        assert [s.id for s in store.list_all()] == ["a"]


def test_an_unknown_start_method_is_refused_with_a_validation_error(sock_dir: Path) -> None:
    with pytest.raises(ValidationError) as error:
        shmstore.start_server(sock_dir / "s.sock", start_method="thread")
    assert error.value.field == "start_method"
    assert not (sock_dir / "s.sock").exists()


def test_a_script_that_starts_threads_and_no_main_guard_is_told_what_to_do(sock_dir: Path) -> None:
    script = sock_dir / "daemon.py"
    script.write_text(
        "import threading, shmstore\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
        f"shmstore.start_server({str(sock_dir / 's.sock')!r})\n"
    )
    result = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "StoreUnavailableError: manager process died while starting" in result.stderr
    assert "start the manager under `if __name__ == '__main__':`, or before any thread" in result.stderr
