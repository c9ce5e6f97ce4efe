"""Redis (and Valkey) addresses: the URLs that select the Redis backend instead of a
manager (:mod:`shmstore.redis.store`), parsed, checked, and shown without their password.
Standard library only; imported when such a URL is used."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import urllib.parse

from ..errors import ValidationError

#: URL schemes that select the Redis backend: scheme -> (TLS, unix socket).
SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+unix": (False, True),
    "valkey": (False, False),
    "valkeys": (True, False),
    "valkey+unix": (False, True),
}
#: Environment variable that holds the Redis password when the URL has none.
ENV_REDIS_PASSWORD = "SHMSTORE_REDIS_PASSWORD"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: URL options that name the files TLS needs (passed to redis-py's SSLConnection as they are):
#: the CA that signed the server's certificate (a private CA is not in the system's store),
#: and a certificate and key of the client's own for a server that asks for one.
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True, slots=True)
class RedisAddress:
    """A Redis or Valkey server that holds the store, from a URL such as
    ``redis://[user:pass@]host[:port][/db][?namespace=NAME]``, ``rediss://`` (TLS) or
    ``redis+unix:///path.sock[?db=N&namespace=NAME]``. A TLS URL may name the CA that
    signed the server's certificate and a client certificate:
    ``rediss://...?ssl_ca_certs=/ca.pem[&ssl_certfile=/me.pem&ssl_keyfile=/me.key]``.
    Shown (``str``) without its password."""

    scheme: str
    host: str | None  # None: a unix socket at ``path``
    port: int
    path: str | None
    db: int
    namespace: str
    username: str | None
    password: str | None = dataclasses.field(repr=False)
    tls: bool
    allow_insecure: bool
    ssl_ca_certs: str | None = None  # TLS_FILES: absolute paths, or None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __str__(self) -> str:
        who = "" if self.username is None and self.password is None else f"{self.username or ''}:***@"
        where = f"{self.path}" if self.host is None else f"{who}{self.host}:{self.port}/{self.db}"
        # The TLS files are shown: where they are is no secret, and a wrong one is a likely mistake.
        files = "".join(f"&{name}={value}" for name, value in self.tls_options().items())
        if self.host is None:
            return f"{self.scheme}://{who}{where}?db={self.db}&namespace={self.namespace}{files}"
        return f"{self.scheme}://{where}?namespace={self.namespace}{files}"

    def tls_options(self) -> dict[str, str]:
        """The TLS files the URL named, as redis-py's SSLConnection takes them."""
        named = {name: getattr(self, name) for name in TLS_FILES}
        return {name: value for name, value in named.items() if value is not None}


def parse_redis(text: str) -> RedisAddress:
    """A Redis URL as a :class:`RedisAddress`. The password comes from the URL, else from
    the file its ``password_file`` option names (this user's, mode 0600), else from
    ``$SHMSTORE_REDIS_PASSWORD``. A plain (not TLS) connection to a host off the loopback
    is refused unless the URL says ``allow_insecure=true``: it would send the password and
    every session in the clear."""
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError:
        # Not urllib's words: they quote the piece they could not read, which may be part
        # of a password with an unescaped / # ? or @ in it.
        raise ValidationError(
            "address", "is not a Redis URL (a password's / # ? @ : must be %-encoded, e.g. %2F for /)"
        ) from None
    scheme = url.scheme.lower()
    tls, unix = SCHEMES[scheme]
    query = dict(urllib.parse.parse_qsl(url.query))
    unknown = sorted(set(query) - {"db", "namespace", "allow_insecure", "password_file", *TLS_FILES})
    if unknown:
        # Named only when they look like names: a password with an unescaped ? puts its tail here.
        shown = ", ".join(name if name.isidentifier() else "(not a name)" for name in unknown)
        raise ValidationError("address", f"unknown Redis URL option(s) {shown}")
    files = _tls_files(query, scheme, tls)
    namespace = query.get("namespace", "shmstore")
    if not _NAMESPACE.fullmatch(namespace):
        raise ValidationError("address", f"namespace must be 1 to 64 of A-Z a-z 0-9 _ . -; got {namespace!r:.80}")
    path, host = None, url.hostname
    db_text = query.get("db", "0")
    if unix:
        path, host = urllib.parse.unquote(url.path), None
        if not path.startswith("/"):
            raise ValidationError("address", f"{scheme}:// needs an absolute socket path; got {path!r:.80}")
    else:
        if not host:
            raise ValidationError("address", f"a {scheme}:// URL needs a host")
        if url.path.strip("/"):
            db_text = url.path.strip("/")
    if not db_text.isdigit() or int(db_text) > 1_000_000:
        raise ValidationError("address", f"db must be a number; got {db_text!r:.80}")
    insecure = query.get("allow_insecure", "false").lower() in ("1", "true", "yes")
    if host is not None and not tls and host not in _LOOPBACK and not insecure:
        raise ValidationError(
            "address",
            f"{scheme}://{host} is off this host without TLS: use {'valkeys' if 'valkey' in scheme else 'rediss'}://, "
            "or add ?allow_insecure=true to send sessions and the password in the clear",
        )
    if url.password is not None:
        password: str | None = urllib.parse.unquote(url.password)
    elif "password_file" in query:
        password = _read_password(query["password_file"])
    else:
        password = os.environ.get(ENV_REDIS_PASSWORD)
    username = urllib.parse.unquote(url.username) if url.username else None
    if host is not None and host not in _LOOPBACK and not password and not insecure:
        raise ValidationError(
            "address",
            f"{scheme}://{host} is off this host: give a password (in the URL or ${ENV_REDIS_PASSWORD}), "
            "or add ?allow_insecure=true for a server that asks none",
        )
    return RedisAddress(
        scheme, host, port or 6379, path, int(db_text), namespace, username, password or None, tls, insecure, **files
    )


def _tls_files(query: dict[str, str], scheme: str, tls: bool) -> dict[str, str]:
    """The TLS files among the URL's options, checked: only on a TLS scheme (elsewhere they
    would be ignored, and the user believe the server verified), absolute (a hook runs in
    the agent's directory, where a relative path means another file), and a key only with
    its certificate."""
    files = {name: query[name] for name in TLS_FILES if name in query}
    if files and not tls:
        secure = "valkeys" if "valkey" in scheme else "rediss"
        raise ValidationError("address", f"{', '.join(files)}: TLS files are for a {secure}:// address only")
    for name, value in files.items():
        if not os.path.isabs(value):
            raise ValidationError("address", f"{name} must be an absolute path; got {value!r:.80}")
    if "ssl_keyfile" in files and "ssl_certfile" not in files:
        raise ValidationError("address", "ssl_keyfile needs ssl_certfile (the client certificate it goes with)")
    return files


def _read_password(path: str) -> str:
    """The first line of ``path``: a regular file of this user's that no one else may read
    (as ssh asks of a key), so that a password in it is not everyone's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValidationError("address", f"password_file {path!r}: {exc.strerror or exc}") from None
    with open(fd, encoding="utf-8", errors="replace") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ValidationError(
                "address", f"password_file {path!r} must be a regular file of yours with mode 0600 (chmod 600)"
            )
        password = file.readline(4096).rstrip("\r\n")
    if not password:
        raise ValidationError("address", f"password_file {path!r} is empty")
    return password


def password_in_url(text: str) -> bool:
    """Whether the URL ``text`` itself holds a password (not a file or the environment)."""
    try:
        return urllib.parse.urlsplit(text).password is not None
    except ValueError:
        return False
