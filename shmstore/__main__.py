"""``python -m shmstore``: the command line (:mod:`shmstore.commands.cli`).

``hook`` takes a fast path: it runs on every Claude Code event, so it imports only
:mod:`shmstore.hook.run` and what that needs, never the command line's parser and the whole
package behind it (``multiprocess``, ``dill``, ``orjson``: ~100 ms of start-up). Anything
but the plain ``hook [--address A] [--timeout T] [--pid N]`` (``--help``, a bad value)
goes to the full parser. ``status --line`` takes one too, for a status bar
(:mod:`shmstore.commands.status_line`).
"""

import time

STARTED = time.monotonic()  # the hook's deadline counts from here at the latest

import sys  # noqa: E402 - after the clock is read


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["hook"]:
        from .hook.run import main as hook

        code = hook(argv[1:], STARTED)
        if code is not None:
            return code
    if argv[:1] == ["status"] and "--line" in argv:
        from .commands.status_line import fast

        code = fast(argv[1:], STARTED)
        if code is not None:
            return code
    if argv[:1] == ["serve"]:
        _without_dill()
    from .commands.cli import main as cli

    return cli(argv)


def _without_dill() -> None:
    """Keep ``dill`` out of the manager that ``shmstore serve`` runs. Its calls travel as
    plain values pickled by the C pickler (:mod:`shmstore.transport.wire`) and it runs no one else's
    code, so nothing in it needs dill; ``multiprocess`` imports dill only to pickle what the
    standard pickler cannot, and uses the standard pickle when it cannot import it. This
    took ~1 MiB off serve's PSS (bench: 19.4 -> 18.5 MiB); dill costs an interpreter with
    only orjson and ``multiprocess.managers`` 2.8, but the CLI imports most of what dill does."""
    if "dill" not in sys.modules:
        sys.modules["dill"] = None  # type: ignore[assignment]  # None: importing it raises ImportError


if __name__ == "__main__":
    sys.exit(main())
