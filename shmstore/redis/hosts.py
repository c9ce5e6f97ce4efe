"""Several hosts sharing one Redis store: each host's lease (renewed by its reaper and its
reports), and when a host whose lease lapsed was first found gone, by Redis's clock."""

from __future__ import annotations

from typing import Any

from ..config import Limits


def lease_ms(limits: Limits) -> int:
    """How long a host stays alive without a report or a reaper pass: three passes."""
    return max(1, round(3 * limits.reap_interval * 1000))


def gone_since(redis: Any, tag: str, hosts: list[str], at: float, limits: Limits) -> dict[str, float]:
    """Of ``hosts``, those whose lease expired, each with when a reaper first found it so
    (``{NS}:gone:HOST``, by Redis's clock): the grace counts from then, not from the
    session's last activity (an idle session of a host cut off for a moment must not
    close at once). A host whose lease is back has its mark cleared."""
    pipe = redis.pipeline(transaction=False)
    for host in hosts:
        pipe.exists(f"{tag}:lease:{host}")
    alive = [bool(found) for found in pipe.execute()]
    keep = round((limits.host_grace + limits.reap_interval * 10) * 1000)
    pipe = redis.pipeline(transaction=False)
    for host, lease in zip(hosts, alive, strict=True):
        mark = f"{tag}:gone:{host}"
        if lease:  # back: forget when it went (SET XX PX 1, as DEL is not ours to use)
            pipe.set(mark, b"", xx=True, px=1)
        else:
            pipe.set(mark, repr(at), nx=True, px=keep)
            pipe.get(mark)
    marks = iter(pipe.execute())
    since: dict[str, float] = {}
    for host, lease in zip(hosts, alive, strict=True):
        next(marks)
        if not lease:
            when = next(marks)
            since[host] = float(when) if when else at
    return since
