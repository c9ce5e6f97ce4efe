"""The ``notify`` command: follow the change feed (through manager restarts, as ``watch``
does) and tell the user when a session enters ``question`` or ``attention``, through the
channels of :mod:`shmstore.notifications`."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from .. import notifications as n
from .. import tmux
from ..clients.follow import Follower, Link, Notice
from ..errors import ValidationError
from ..model import Status
from ..transport import address as addr
from .common import client_for
from .render import printable

#: The statuses ``--on`` may name.
NOTIFYING = (Status.QUESTION, Status.ATTENTION)


def add_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--on",
        default=",".join(NOTIFYING),
        metavar="STATUSES",
        help="the statuses whose entry is told, comma-separated, of question and attention (default: %(default)s)",
    )
    cmd.add_argument(
        "--coalesce",
        type=float,
        default=n.DEFAULT_COALESCE,
        metavar="SECONDS",
        help="tell the sessions that enter within this many seconds in one notification, and none that leaves "
        "again within it; 0 tells each change at once (default: %(default)s)",
    )
    cmd.add_argument(
        "--no-desktop",
        action="store_true",
        help="no desktop notification (by default one is shown through notify-send, or osascript on macOS, when "
        "found on PATH)",
    )
    cmd.add_argument(
        "--bell",
        nargs="?",
        const="-",
        metavar="TTY",
        help="ring the terminal and write a notification escape (OSC 9, or --osc 777) to TTY, or to stdout "
        "when none is given",
    )
    cmd.add_argument("--osc", type=int, choices=(9, 777), default=9, help="the escape --bell writes (default: 9)")
    cmd.add_argument("--url", help="POST each notification as text to this URL, its title in a Title header (ntfy)")
    cmd.add_argument(
        "--command",
        dest="user_command",
        metavar="CMD",
        help="run CMD (with sh -c) for each session told, with SHMSTORE_ID, SHMSTORE_AGENT, SHMSTORE_OLD_STATUS, "
        "SHMSTORE_STATUS, SHMSTORE_DIR, SHMSTORE_SECONDS (how long it was in the old status), SHMSTORE_SINCE, "
        "SHMSTORE_SESSION_ID, SHMSTORE_PID, SHMSTORE_TMUX_PANE, SHMSTORE_TMUX_SOCKET, SHMSTORE_TTY, SHMSTORE_TITLE "
        "and SHMSTORE_MESSAGE set",
    )
    cmd.add_argument(
        "--tell-looked-at",
        action="store_true",
        help="notify about a session in tmux even when its pane is the one shown in an attached tmux session "
        "(skipped by default)",
    )


def check_flags(words: list[str]) -> None:
    """Refuse with a ValidationError on ``field`` what ``shmstore notify`` would not take
    among ``words`` (its flags but --address and --timeout), as its parser would."""
    parser = argparse.ArgumentParser(prog="shmstore notify", add_help=False, exit_on_error=False)
    add_flags(parser)
    try:
        args, unknown = parser.parse_known_args(words)
    except argparse.ArgumentError as exc:
        raise ValidationError("--notify", str(exc)) from None
    if unknown:
        raise ValidationError("--notify", f"shmstore notify does not take {' '.join(unknown)} here")
    _statuses(args.on)


def _statuses(text: str) -> list[Status]:
    chosen = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word not in NOTIFYING:
            raise ValidationError("--on", f"{word!r} is not one of {', '.join(NOTIFYING)}")
        chosen.append(Status(word))
    if not chosen:
        raise ValidationError("--on", "names no status")
    return chosen


def channels(args: argparse.Namespace) -> list[n.Channel]:
    """The channels the flags ask for; a ValidationError when there is none."""
    found: list[n.Channel] = []
    if not args.no_desktop and (desktop := n.Desktop.found()) is not None:
        found.append(desktop)
    if args.bell is not None:
        found.append(n.TerminalBell(None if args.bell == "-" else args.bell, args.osc))
    if args.url:
        if not args.url.startswith(("http://", "https://")):
            raise ValidationError("--url", f"{args.url!r} is not an http:// or https:// URL")
        found.append(n.Url(args.url))
    if args.user_command:
        found.append(n.Command(args.user_command))
    if not found:
        why = "desktop notifications are off" if args.no_desktop else "no notify-send (or osascript) is on PATH"
        raise ValidationError("channel", f"none to notify through: {why}; give --bell, --url or --command")
    return found


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _count(sessions: int) -> str:
    return f"{sessions} session{'' if sessions == 1 else 's'}"


def run(args: argparse.Namespace) -> int:
    on = _statuses(args.on)
    if not 0 <= args.coalesce <= 600:
        raise ValidationError("--coalesce", f"must be seconds in [0, 600]; got {args.coalesce!r}")
    through = channels(args)
    coalescer = n.Coalescer(on, args.coalesce)
    dispatcher = n.Dispatcher(through, skip=(lambda s: False) if args.tell_looked_at else tmux.looked_at)
    ready = False
    # SIGTERM (a service's stop) ends it as Ctrl-C does: what a channel runs is killed too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with client_for(args) as store, Follower(store) as follow:
            while True:
                due = coalescer.due()
                wait = follow.poll_interval if due is None else max(0.0, due - time.monotonic())
                item = follow.poll(wait)
                if isinstance(item, Notice):
                    if item.link is Link.LIVE or item.attempt == 1:  # not every try of a long outage
                        print(f"shmstore: notify: {printable(item.message)}", file=sys.stderr, flush=True)
                elif item is not None:
                    coalescer.feed(item)
                    if not ready:
                        ready = True
                        where = addr.format_address(follow.client.address)
                        names = ", ".join(channel.name for channel in through)
                        print(
                            f"shmstore: notify: following {printable(where)} ({_count(len(follow.sessions))}); "
                            f"telling {', '.join(on)} through {names}",
                            file=sys.stderr,
                            flush=True,
                        )
                dispatcher.put(coalescer.take())
    except KeyboardInterrupt:
        pass
    finally:
        dispatcher.close()
    return 0
