"""``python -m shmstore``: the command line (:mod:`shmstore.cli`).

``hook`` takes a fast path: it runs on every Claude Code event, so it imports only
:mod:`shmstore.hooks` and what that needs, never the command line's parser and the whole
package behind it (``multiprocess``, ``dill``, ``orjson``: ~100 ms of start-up). Anything
but the plain ``hook [--address A] [--timeout T] [--pid N]`` (``--help``, a bad value)
goes to the full parser.
"""

import time

STARTED = time.monotonic()  # the hook's deadline counts from here at the latest

import sys  # noqa: E402 - after the clock is read


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["hook"]:
        from .hooks import main as hook

        code = hook(argv[1:], STARTED)
        if code is not None:
            return code
    from .cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
