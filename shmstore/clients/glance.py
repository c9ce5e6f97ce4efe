"""One look at the live sessions, for ``shmstore status --line``, with the standard library only.

A tmux status bar or a shell prompt runs the line every few seconds and waits for it, so
it must answer within 50 ms and never hang. The full
:class:`~shmstore.clients.client.Client` imports ``multiprocess``, ``dill`` and ``orjson``
(~100 ms); this asks the manager for ``list_all`` as the first and only request of one
connection (as the hook's :mod:`~shmstore.clients.reporter` asks for its report), reads
the records with :mod:`json`, and gives up at its deadline.
"""

from __future__ import annotations

import json

from ..errors import ShmstoreError
from ..transport import address as addr
from ..transport.protocol import Address
from .reporter import one_call, unavailable

TYPE_CHECKING = False  # as typing's, without importing typing
if TYPE_CHECKING:
    from typing import Any

#: Positions in a record, and the statuses by their code there (:mod:`shmstore.record`'s,
#: which imports orjson: ~16 ms cold; tests/test_status_line.py holds them equal).
ID, AGENT, STATUS, DIR, SINCE = 0, 1, 2, 3, 4
STATUSES = ("working", "attention", "question", "closed")


def live_records(address: Address, authkey: bytes | None, deadline: float) -> list[list[Any]]:
    """The live sessions' records, decoded, by ``deadline`` (a ``time.monotonic()`` value);
    :class:`StoreUnavailableError` when the manager does not answer by then."""
    key = addr.read_key(address) if authkey is None else authkey
    try:
        records = one_call(address, key, "list_all", (), deadline)
    except ShmstoreError:  # the manager's own (StoreUnavailableError is an OSError too)
        raise
    except (EOFError, OSError) as exc:
        raise unavailable(address, "list_all", exc) from None
    return [json.loads(record) for record in records]
