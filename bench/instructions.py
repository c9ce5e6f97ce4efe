"""Instructions per operation, in the manager and in the client, counted by callgrind.

Wall and CPU time swing several-fold on a loaded machine; the user-space instructions a
process executes do not, so this tells whether a change to the call path made it cheaper
when ``bench.py``'s timings cannot. Each figure is the difference between two runs of the
same process under ``valgrind --tool=callgrind`` (start-up, connecting and 100 warm-up
calls in both; ``n`` more calls in one), divided by ``n``. Kernel work (the socket's
syscalls, waking the other side) is not counted: compare it with ``pingpong``, the echo
of ``bench.py``'s floor, counted the same way.

    python bench/instructions.py                      # every op, both sides, n=1000
    python bench/instructions.py --ops set,revision --side manager --n 300

Needs valgrind; a run takes 20-40 s per process.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

OPS = ("pingpong", "revision", "get", "set", "transition")
KEY = b"k" * 32
WARM_UP = 100


def _serve(address: str) -> None:
    from shmstore import Store, serve

    serve(address, KEY, store=Store(max_history=10))


def _echo(address: str) -> None:
    import multiprocess.connection

    with multiprocess.connection.Listener(address, authkey=KEY) as listener, listener.accept() as conn:
        try:
            while True:
                conn.send_bytes(conn.recv_bytes())
        except EOFError:
            pass


def _client(address: str, op: str, n: int) -> None:
    from bench import IDS, make_session

    data = make_session(IDS[0]).to_json()
    _wait_for(address)
    if op == "pingpong":
        import multiprocess.connection

        with multiprocess.connection.Client(address, authkey=KEY) as conn:
            for _ in range(WARM_UP + n):
                conn.send_bytes(data)
                conn.recv_bytes()
        return
    import shmstore

    with shmstore.connect(address, KEY, shared_memory=False, timeout=60) as store:
        for id in IDS[:2]:
            store.set(make_session(id))
        session, flip = make_session(IDS[0]), itertools.cycle((shmstore.Status.WORKING, shmstore.Status.ATTENTION))
        call = {
            "revision": lambda: store._call("revision"),
            "get": lambda: store.get(IDS[0]),
            "set": lambda: store.set(session),
            "transition": lambda: store.transition(IDS[1], next(flip)),
        }[op]
        for _ in range(WARM_UP + n):
            call()


def _wait_for(address: str) -> None:
    deadline = time.monotonic() + 120  # a manager under valgrind takes seconds to start
    while not os.path.exists(address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens at {address}")
        time.sleep(0.1)
    time.sleep(0.5)


def _me(*args: str) -> list[str]:
    return [sys.executable, __file__, *args]


def _callgrind(command: list[str]) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]


def _collected(stderr: str) -> int:
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{stderr[-2000:]}")
    return int(found.group(1))


def count(op: str, side: str, n: int) -> int:
    """Instructions the ``side`` process ran for ``WARM_UP + n`` calls of ``op``, start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        address = os.path.join(tmp, "s.sock")
        server = _me("--child-echo" if op == "pingpong" else "--child-serve", address)
        client = _me("--child-client", address, op, str(n))
        if side == "manager":
            server = _callgrind(server)
        else:
            client = _callgrind(client)
        with subprocess.Popen(server, stderr=subprocess.PIPE, text=True) as manager:
            try:
                ran = subprocess.run(client, stderr=subprocess.PIPE, text=True, check=True, timeout=600)
            finally:
                if op != "pingpong":  # the echo ends when its client hangs up
                    time.sleep(0.5)
                    manager.terminate()
                _, manager_err = manager.communicate(timeout=120)
        return _collected(manager_err if side == "manager" else ran.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    parser.add_argument("--side", choices=("manager", "client", "both"), default="both")
    parser.add_argument("--n", type=int, default=1000, help="calls counted (default 1000)")
    parser.add_argument("--child-serve", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--child-echo", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--child-client", nargs=3, metavar=("ADDRESS", "OP", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_serve:
        _serve(args.child_serve)
        return 0
    if args.child_echo:
        _echo(args.child_echo)
        return 0
    if args.child_client:
        address, op, n = args.child_client
        _client(address, op, int(n))
        return 0
    sides = ("manager", "client") if args.side == "both" else (args.side,)
    print(f"{'op':12s}" + "".join(f"{side + ' Ir/op':>16s}" for side in sides))
    for op in args.ops.split(","):
        if op not in OPS:
            parser.error(f"unknown op {op!r}; one of {', '.join(OPS)}")
        per_op = [(count(op, side, args.n) - count(op, side, 0)) / args.n for side in sides]
        print(f"{op:12s}" + "".join(f"{value:16,.0f}" for value in per_op), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
