"""What a :class:`~shmstore.clients.client.Client` calls for a Redis address, in place of a
manager's proxy: :class:`RedisProxy`, and Redis's errors as a manager connection's."""

from __future__ import annotations

from typing import Any

try:
    import redis
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "a redis:// address needs the redis package: pip install 'shmstore[redis]'", name="redis"
    ) from exc
from ..backend import EXPOSED
from ..errors import StoreUnavailableError, ValidationError
from .address import RedisAddress
from .store import RedisStore


class RedisProxy:
    """What a :class:`~shmstore.clients.client.Client` calls instead of a manager's proxy. Redis's
    errors become those of a manager's connection (OSError: the Client tries once more,
    then raises StoreUnavailableError), never with the password in them."""

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        # Making the store reads the namespace's limits: the first command, so the one that a
        # wrong password, a TLS mistake or a key outside the user's ACL fails. It is raised as
        # connect() promises, StoreUnavailableError at once (the Client's retry is for calls).
        try:
            self.store = RedisStore(address, timeout)
        except _FAILURES as exc:
            where = str(address)
            raise StoreUnavailableError(
                f"cannot use Redis at {where}: {_os_error(exc, address)}", address=where
            ) from None

    def call(self, method: str, args: tuple[Any, ...], deadline: float, waits: bool = False) -> Any:
        if method not in EXPOSED:
            raise ValidationError("method", f"{method!r} is not an operation of the store")
        try:
            return getattr(self.store, method)(*args)
        except _FAILURES as exc:
            raise _os_error(exc, self.address) from None

    def close(self) -> None:
        self.store.close()

    def retire(self) -> None:
        """The Client made a new proxy after a failed call: close the idle connections now,
        and leave those other threads' calls hold to finish (redis-py closes them as it
        gives them back, since the pool was disconnected)."""
        self.store._redis.connection_pool.disconnect(inuse_connections=False)


#: Redis's errors that say the store cannot be used (redis-py's AuthenticationError is a
#: ConnectionError, its NoPermissionError a ResponseError).
_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ResponseError)


def _os_error(exc: Exception, address: RedisAddress) -> OSError:
    """Redis's error ``exc`` as the OSError a manager's connection raises. Its text is
    scrubbed of the password (redis-py puts server replies and command arguments in its
    messages; none should hold it, and then none ever can), with a hint for the usual
    mistakes."""
    text = str(exc) or type(exc).__name__
    if address.password:
        text = text.replace(address.password, "***")
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return PermissionError(f"Redis refused the credentials: {text}")
    # Refused inside a Lua script, it is a plain error ("The user executing the script can't ...").
    if isinstance(exc, redis.exceptions.NoPermissionError) or "user executing the script can't" in text:
        return PermissionError(f"Redis refused it (NOPERM: outside the user's ACL): {text}")
    if isinstance(exc, redis.exceptions.ResponseError):
        return ConnectionError(f"Redis answered with an error: {text}")
    if isinstance(exc, redis.exceptions.TimeoutError):
        return TimeoutError(text)
    return ConnectionError(text + _hint(text, address))


def _hint(text: str, address: RedisAddress) -> str:
    """What a connection error most likely means, when its text alone does not say."""
    if address.tls and address.ssl_ca_certs is None and "CERTIFICATE_VERIFY_FAILED" in text:
        return " (a server certificate from a private CA needs ?ssl_ca_certs=/path/to/ca.pem)"
    if address.tls_options() and "No such file" in text:  # redis-py names no file
        return " (a TLS file the URL names is missing)"
    # A server that wants a client certificate ends the handshake without saying why (TLS 1.3):
    # as an EOF, an alert, or (seen with Python 3.13's OpenSSL) a reset of the connection.
    cut_off = ("EOF occurred", "CERTIFICATE_REQUIRED", "Connection reset by peer")
    if address.tls and address.ssl_certfile is None and any(sign in text for sign in cut_off):
        return " (if the server asks for a client certificate: &ssl_certfile=/path/me.pem&ssl_keyfile=/path/me.key)"
    plain_tcp = not address.tls and address.path is None
    if plain_tcp and ("reset by peer" in text or "closed by server" in text):
        return " (a TLS port drops a plain connection: use rediss:// if the server wants TLS)"
    return ""
