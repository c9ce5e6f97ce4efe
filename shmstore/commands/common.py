"""Shared by the command modules: a command's client, and its settings from the flags."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar

from ..clients.client import Client
from ..config import Limits, ServeOptions

_Settings = TypeVar("_Settings", Limits, ServeOptions)

#: What ``shmstore`` exits with (argparse itself exits 2 on a usage error).
EXIT_OK = 0
EXIT_ERROR = 1  # any other error of ours
EXIT_BAD_INPUT = 2  # usage, or a ValidationError
EXIT_UNAVAILABLE = 3  # no manager running or reachable: StoreUnavailableError
EXIT_NOT_FOUND = 4  # no such session: NotFoundError
EXIT_REFUSED = 5  # `go` would not switch to the session's terminal: JumpRefusedError
EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 any other error; 2 bad input (usage or an invalid value); "
    "3 the manager is not running or cannot be reached; 4 no such session; 5 `go` refused to switch "
    "(the pane is no longer the agent's, or there is none); 130/143 interrupted "
    "(SIGINT/SIGTERM; serve stops so, with 0); 141 the reader of the output went away (as if "
    "killed by SIGPIPE)."
)


def settings_from(args: argparse.Namespace, settings: type[_Settings]) -> _Settings:
    return settings(**{field.name: getattr(args, field.name) for field in dataclasses.fields(settings)})


def client_for(args: argparse.Namespace) -> Client:
    # Over the socket: a command reads once (or follows the feed, which is the socket's), and
    # mapping the segment first costs more than that read (measured: a one-shot list_all of 20
    # sessions, 8.6-11.6 ms with the map, 3.7-6.5 ms without), and would have the manager
    # make a segment nobody reads.
    return Client(args.address, timeout=args.timeout, shared_memory=False)


# -- commands ------------------------------------------------------------------------------
