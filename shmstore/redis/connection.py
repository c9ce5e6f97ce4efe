"""How the Redis backend connects: a connection pool to a :class:`RedisAddress`."""

from __future__ import annotations

from typing import Any

import redis

from .address import RedisAddress


def connection_pool(address: RedisAddress, options: dict[str, Any]) -> Any:
    """A connection pool to ``address``: its unix socket, or TCP, with TLS (and the URL's
    TLS files; the server's certificate and host name are always checked) for rediss://."""
    if address.path is not None:
        return redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=address.path, **options)
    if address.tls:
        secure: dict[str, Any] = dict(options, **address.tls_options())
        return redis.ConnectionPool(
            connection_class=redis.SSLConnection, host=address.host, port=address.port, **secure
        )
    return redis.ConnectionPool(connection_class=redis.Connection, host=address.host, port=address.port, **options)
