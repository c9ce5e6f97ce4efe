"""The Redis backend as a shared deployment runs it: TLS only, a private CA, and a
least-privilege ACL user that may touch its own namespace's keys with the commands the
backend sends and nothing else. Real processes: a throwaway CA and server certificate made
with ``openssl``, and a ``redis-server`` of this module's own (per xdist worker).

:data:`COMMANDS` and :func:`user_rules` are the ACL line README documents; the tests check
that the backend needs every one of those commands (and Redis logs no refusal of any other)
and that the user can do nothing else: no key outside its namespace, nothing dangerous."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import make_session, run

import shmstore
from shmstore import Status, StoreUnavailableError, ValidationError
from shmstore.redis.address import parse_redis

if os.environ.get("CI") != "true":  # in CI the imports must work
    pytest.importorskip("redis")
import redis

from shmstore.redis.store import RedisStore

#: The test namespace: the only one the restricted user's key pattern covers.
NAMESPACE = "team"
#: Every command the backend sends (Redis 7.0, redis-py 8), checked one by one by
#: test_the_user_needs_every_command_it_is_given. Not here, and not needed: AUTH and HELLO
#: (Redis allows them to every user), PING (never sent), EVAL (redis-py runs a script with
#: EVALSHA, and SCRIPT LOAD when Redis does not have it yet), CONFIG GET (the check of
#: maxmemory-policy; refused, the backend skips it: CONFIG GET would also show
#: requirepass and the rest of the configuration). Commands inside the Lua scripts are
#: checked against the ACL too (HEXISTS, HINCRBY, EXPIRE, ZCARD... are only sent there).
#: GET, SET, EXISTS and PEXPIRE are the reaper's (host leases and its election); SCAN and
#: DEL only the demo's (RedisStore.delete_namespace, in a namespace of its own).
COMMANDS = (
    *("hget", "hset", "hsetnx", "hdel", "hlen", "hvals", "hgetall", "hmget", "hexists", "hincrby"),
    *("zadd", "zrem", "zcard", "zrange", "zrevrange", "xadd", "xrange", "xrevrange", "xread"),
    *("get", "set", "exists", "expire", "pexpire", "time", "evalsha", "script|load", "multi", "exec"),
)
#: redis-py sends CLIENT SETINFO on connect (and ignores a refusal); Redis 7.2 and Valkey
#: have it, and 7.0 has not, where ACL SETUSER refuses the name: granted where known.
SETINFO = "client|setinfo"
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = shmstore test
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
subjectAltName = IP:127.0.0.1,DNS:localhost
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


def user_rules(password: str, commands: Sequence[str] = COMMANDS, namespace: str = NAMESPACE) -> list[str]:
    """``ACL SETUSER shmstore`` + these: README's line. ``reset`` first, so that nothing
    granted before survives (keys, channels, passwords, selectors)."""
    return ["reset", "on", f">{password}", f"%RW~{{{namespace}}}:*", "-@all", *(f"+{name}" for name in commands)]


@dataclasses.dataclass
class TlsRedis:
    """This module's redis-server: TLS only on ``port``, its CA at ``ca``, the restricted
    user ``shmstore`` with ``password``, and ``admin`` (an ACL user with every right, for
    the tests' own checks: ACL LOG, FLUSHALL between tests)."""

    port: int
    directory: Path  # the certificates (ca.crt, server.*, client.*) and users.acl
    password: str
    admin_password: str
    admin: Any
    setinfo: bool  # whether the server knows CLIENT SETINFO (and the user was granted it)

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.crt")

    def url(self, namespace: str = NAMESPACE, password: str | None = None, scheme: str = "rediss") -> str:
        secret = urllib.parse.quote(self.password if password is None else password, safe="")
        tls = f"&ssl_ca_certs={self.ca}" if scheme == "rediss" else ""
        return f"{scheme}://shmstore:{secret}@127.0.0.1:{self.port}?namespace={namespace}{tls}"

    def restrict(self, commands: Sequence[str] = COMMANDS) -> None:
        """Give the user ``commands`` (README's line), and CLIENT SETINFO where Redis has it."""
        self.admin.execute_command("ACL", "SETUSER", "shmstore", *user_rules(self.password, commands))
        if self.setinfo:
            self.admin.execute_command("ACL", "SETUSER", "shmstore", f"+{SETINFO}")

    def refusals(self) -> list[tuple[str, str]]:
        """What Redis refused since the last flush (ACL LOG), but CONFIG GET, which the
        backend tries on connect and does without."""
        return [(entry["reason"], entry["object"]) for entry in self.admin.acl_log() if entry["object"] != "config|get"]

    def hidden(self, *texts: str) -> bool:
        """Whether the user's password is in none of ``texts``, as it is or URL-quoted."""
        forms = (self.password, urllib.parse.quote(self.password, safe=""))
        return not any(form in text for form in forms for text in texts)

    def raw(self, **options: Any) -> Any:
        """A plain redis-py connection over TLS as the restricted user."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=self.ca, username="shmstore", **options
        )


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs redis-server and openssl)")
        pytest.skip(f"{name} is not installed")
    return path


def _make_certificates(openssl: str, directory: Path) -> None:
    """A throwaway CA (ca.crt), its certificate for 127.0.0.1 and localhost (server.crt,
    server.key) and one for a client (client.crt, client.key): EC keys (fast to make), the
    extensions Python 3.13's strict verification asks for, and a configuration of our own
    rather than the system's."""
    config = directory / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)
    key = ["-config", config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-x509", "-extensions", "ca", "-days", "2", "-subj", "/CN=shmstore test CA"]
    signed = ["-CA", "ca.crt", "-CAkey", "ca.key", "-days", "2", "-extfile", config]
    steps = [["req", *key, *ca, "-keyout", "ca.key", "-out", "ca.crt"]]
    for serial, name in enumerate(["server", "client"], 2):
        steps.append(["req", "-new", *key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr"])
        steps.append(["x509", "-req", "-in", f"{name}.csr", *signed, "-extensions", name, "-set_serial", str(serial)])
        steps[-1] += ["-out", f"{name}.crt"]
    for step in steps:
        done = subprocess.run([openssl, *map(str, step)], cwd=directory, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            pytest.fail(f"openssl {step[0]} failed: {done.stderr.strip()}")


def _free_port() -> int:
    """A TCP port free now (the kernel's pick); taken by another process before redis-server
    binds it, the start fails and is tried again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(binary: str, directory: Path, clients: str = "no") -> tuple[subprocess.Popen[bytes], int]:
    """redis-server on TLS only (no plain port), keeping nothing on disk, with its users
    from users.acl, asking clients for a certificate (``clients``: ``--tls-auth-clients``)
    or not; returns it once its port accepts connections."""
    for _ in range(3):
        port = _free_port()
        options = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "-::1"]
        options += ["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"]
        options += ["--tls-auth-clients", clients, "--save", "", "--appendonly", "no", "--aclfile", "users.acl"]
        # DEBUG enabled, so that the ACL is what refuses it to the user (else Redis would first).
        options += ["--logfile", f"redis-{clients}.log", "--enable-debug-command", "yes"]
        server = subprocess.Popen([binary, *options], cwd=directory, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, port
            time.sleep(0.02)
        server.kill()
        server.wait(10)
    log = (directory / f"redis-{clients}.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"redis-server did not start on TLS: {log}")


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsRedis]:
    binary, openssl = _tool("redis-server"), _tool("openssl")
    directory = Path(tempfile.mkdtemp(prefix="rdt-", dir="/tmp"))
    try:
        _make_certificates(openssl, directory)
        # URL-quoted in the URLs: the characters a URL gives a meaning of its own.
        admin_password, password = secrets.token_hex(16), f"pw-{secrets.token_hex(12)}:@/%+"
        acl = directory / "users.acl"
        # The default user is off, without a password: no one gets in without a name.
        acl.write_text(
            f"user default off resetpass resetkeys resetchannels -@all\nuser admin on >{admin_password} ~* &* +@all\n"
        )
        acl.chmod(0o600)
        server, port = _start(binary, directory)
        ca = str(directory / "ca.crt")
        admin = redis.Redis(
            host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=ca, username="admin", password=admin_password
        )
        try:
            try:
                admin.execute_command("ACL", "SETUSER", "probe", f"+{SETINFO}")
                setinfo = True
            except redis.exceptions.ResponseError:  # Redis 7.0: no such command
                setinfo = False
            admin.execute_command("ACL", "DELUSER", "probe")
            found = TlsRedis(port, directory, password, admin_password, admin, setinfo)
            found.restrict()
            yield found
        finally:
            admin.close()
            server.terminate()
            server.wait(10)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def tls(tls_server: TlsRedis) -> TlsRedis:
    """The module's server, emptied, its ACL log cleared and the user as README makes it."""
    tls_server.restrict()
    tls_server.admin.flushall()
    tls_server.admin.script_flush()  # so that the test sends SCRIPT LOAD again
    tls_server.admin.acl_log_reset()
    return tls_server


def _later(client: shmstore.Client, id: str, status: Status) -> threading.Thread:
    """A write from another thread a moment from now (its failure is the caller's to see)."""

    def write() -> None:
        time.sleep(0.1)
        with contextlib.suppress(shmstore.ShmstoreError):
            client.transition(id, status)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def round_trip(url: str, timeout: float = 5.0) -> None:
    """Every operation of the store, each path that sends a command of its own included:
    limits written first, exactly-once writes, closing past max_closed (ZRANGE in Lua), a
    closed session's usage keeping its place (HEXISTS), a wait for the next change (XREAD
    BLOCK), a Watch, removals of a live and a closed session (HINCRBY), prune, and reaper
    passes: elected (SET NX PX, PEXPIRE), then still the reaper (GET), with a session of
    another host whose lease (EXISTS) is gone."""
    RedisStore(parse_redis(url), timeout, shmstore.Limits(max_closed=2)).close()
    with shmstore.connect(url, timeout=timeout) as client:
        assert client.info()["backend"] == "redis"
        assert client.report("a", Status.WORKING, "/w", pid=42, session_id="resume-a").status is Status.WORKING
        assert client.transition("a", Status.ATTENTION).status is Status.ATTENTION
        assert client.add_usage("a", 5, 7).api_usage == shmstore.ApiUsage(5, 7)
        assert [s.id for s in client.list_all()] == ["a"]
        assert [s.id for s in client.list_all()] == ["a"]  # unchanged: the short answer
        assert client.set(make_session("s"), expected_revision=0).revision > 0
        assert client.set(make_session("far", host="far-host")).host == "far-host"
        for id in ["c0", "c1", "c2"]:
            client.report(id, Status.WORKING, "/w")
            client.report(id, Status.CLOSED, "/w")
        client.add_usage("c1", 1, 1)
        assert [s.id for s in client.recently_closed()] == ["c2", "c1"]
        assert client.get("a") is not None
        revision = client.snapshot().revision
        writer = _later(client, "a", Status.WORKING)
        try:
            events = client.changes(revision, timeout=5).events
        finally:
            writer.join(10)
        assert [(e.kind, e.id) for e in events] == [("transition", "a")]
        with client.watch(poll=0.1) as watch:
            client.transition("a", Status.QUESTION)
            for _ in watch:
                if watch.sessions["a"].status is Status.QUESTION:
                    break
        removed = client.remove("a")
        assert removed is not None
        assert removed.status is Status.QUESTION
        assert client.remove("c2") is not None
        assert client.remove("nothing") is None
        assert client.prune(0) == 1  # c1
        assert client.reap() == 1  # elected; far-host has no lease: its session is stale
        assert client.reap() == 0  # still the reaper, with nothing more to do
        assert sorted(s.id for s in client.list_all()) == ["far", "s"]


# -- what the user may do ----------------------------------------------------------------------


def test_the_whole_round_trip_works_over_tls_as_the_restricted_user(tls: TlsRedis) -> None:
    round_trip(tls.url())
    # Nothing refused on the way: a command refused inside a Lua script (after the script's
    # first write) would leave half a write that the client's retry then hides.
    assert tls.refusals() == []


def test_the_user_needs_every_command_it_is_given(tls: TlsRedis) -> None:
    """Without any one of them, the round trip fails, or Redis logs the refusal (a command in
    a script refused after the script's first write, which the retry sees as done)."""
    unneeded = []
    for command in COMMANDS:
        tls.restrict([name for name in COMMANDS if name != command])
        tls.admin.flushall()
        tls.admin.script_flush()
        tls.admin.acl_log_reset()
        try:
            # A write whose script was refused half way may retry until its deadline: a short one.
            round_trip(tls.url(), timeout=1.0)
        except (shmstore.ShmstoreError, redis.exceptions.RedisError, AssertionError):
            continue
        if not tls.refusals():
            unneeded.append(command)
    assert unneeded == []


def test_a_tls_address_works_by_host_name_and_with_the_password_from_the_environment(
    tls: TlsRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHMSTORE_REDIS_PASSWORD", tls.password)
    url = f"rediss://shmstore@localhost:{tls.port}?namespace={NAMESPACE}&ssl_ca_certs={tls.ca}"
    with shmstore.connect(url) as client:
        assert client.report("h", Status.WORKING, "/w").id == "h"


# -- what is refused ---------------------------------------------------------------------------


def _refused(url: str) -> StoreUnavailableError:
    with pytest.raises(StoreUnavailableError) as refused:
        shmstore.connect(url, timeout=5)
    return refused.value


@pytest.mark.parametrize("password", ["not-the-password", ""])
def test_a_wrong_or_missing_password_is_refused_with_our_error(tls: TlsRedis, password: str) -> None:
    error = _refused(tls.url(password=password))
    assert "Redis refused the credentials" in str(error)
    assert error.address is not None
    assert "not-the-password" not in str(error) + error.address


def test_a_disabled_default_user_lets_no_one_in_without_a_name(tls: TlsRedis) -> None:
    error = _refused(f"rediss://127.0.0.1:{tls.port}?namespace={NAMESPACE}&ssl_ca_certs={tls.ca}")
    assert "refused the credentials" in str(error)


def test_plain_redis_to_the_tls_port_is_refused_with_a_hint(tls: TlsRedis) -> None:
    error = _refused(tls.url(scheme="redis"))
    assert "use rediss://" in str(error)
    assert tls.hidden(str(error))


def test_tls_without_the_servers_ca_is_refused_the_certificate_being_checked(tls: TlsRedis) -> None:
    error = _refused(tls.url().replace(f"&ssl_ca_certs={tls.ca}", ""))
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert "ssl_ca_certs" in str(error)  # the hint


def test_a_missing_ca_file_is_refused_with_our_error(tls: TlsRedis) -> None:
    error = _refused(tls.url().replace(tls.ca, tls.ca + ".missing"))
    assert "a TLS file the URL names is missing" in str(error)
    assert tls.ca + ".missing" in str(error)  # the address shown names it


def test_a_namespace_outside_the_users_keys_is_refused_with_our_error(tls: TlsRedis) -> None:
    error = _refused(tls.url(namespace="other"))
    assert "NOPERM" in str(error)
    assert tls.hidden(str(error))
    assert tls.admin.dbsize() == 0  # nothing written anywhere


@pytest.mark.parametrize(
    "command",
    [
        ("SET", "other:x", "1"),
        ("HSET", "{other}:live", "x", "1"),  # a command it has, on a key it has not
        ("DEL", "{team}:live"),  # its own keys, but not a command the backend sends
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("DEBUG", "SLEEP", "0"),
        ("SHUTDOWN", "NOSAVE"),
        ("SCRIPT", "FLUSH"),
        ("EVAL", "return 1", "0"),
        ("ACL", "SETUSER", "shmstore", "+@all"),
        ("SELECT", "1"),
    ],
)
def test_the_user_can_touch_nothing_else(tls: TlsRedis, command: tuple[str, ...]) -> None:
    with tls.raw(password=tls.password) as raw, pytest.raises(redis.exceptions.NoPermissionError):
        raw.execute_command(*command)
    assert tls.admin.ping()  # still up
    assert tls.admin.dbsize() == 0


def test_a_script_cannot_reach_keys_outside_the_namespace(tls: TlsRedis) -> None:
    """SCRIPT LOAD and EVALSHA are granted, but what a script calls is checked as well."""
    with tls.raw(password=tls.password) as raw:
        sha = raw.script_load("return redis.call('HSET', '{other}:live', 'x', '1')")
        with pytest.raises(redis.exceptions.ResponseError, match=r"can't access|no permissions"):
            raw.evalsha(sha, 0)
    assert tls.admin.exists("{other}:live") == 0


# -- the password is never shown ---------------------------------------------------------------


def test_the_password_is_not_in_the_address_the_client_or_its_info(tls: TlsRedis) -> None:
    address = parse_redis(tls.url())
    assert address.password == tls.password  # taken from the URL, unquoted
    assert tls.hidden(str(address), repr(address))
    assert f"ssl_ca_certs={tls.ca}" in str(address)  # the CA is shown: no secret, often wrong
    with shmstore.connect(tls.url()) as client:
        assert tls.hidden(repr(client), repr(client.info()))


@pytest.mark.parametrize("case", ["up", "outside its keys", "wrong password"])
def test_the_password_is_not_in_the_output_of_shmstore_status(tls: TlsRedis, case: str) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    url = {
        "up": tls.url(),
        "outside its keys": tls.url(namespace="other"),
        "wrong password": tls.url(password=wrong),
    }[case]
    result = run("status", "--timeout", "5", address=url)
    assert result.returncode == (0 if case == "up" else 3), result.stderr
    output = result.stdout + result.stderr
    assert tls.hidden(output)
    assert wrong not in output
    where = f"rediss://shmstore:***@127.0.0.1:{tls.port}/0?namespace="
    if case == "up":
        assert f"store:    Redis at {where}{NAMESPACE}&ssl_ca_certs={tls.ca}" in result.stdout
    else:
        assert f"store: cannot use Redis at {where}" in result.stdout
        assert ("NOPERM" if case == "outside its keys" else "refused the credentials") in result.stdout


def test_the_password_from_the_environment_is_not_in_the_output_of_shmstore_status(tls: TlsRedis) -> None:
    env = dict(os.environ, SHMSTORE_REDIS_PASSWORD=tls.password)
    url = f"rediss://shmstore@127.0.0.1:{tls.port}?namespace={NAMESPACE}&ssl_ca_certs={tls.ca}"
    result = run("status", "--timeout", "5", address=url, env=env)
    assert result.returncode == 0, result.stderr
    assert tls.hidden(result.stdout + result.stderr)
    assert "0 live" in result.stdout


# -- a client certificate ----------------------------------------------------------------------


def test_a_server_that_asks_for_a_client_certificate_gets_the_one_the_url_names(tls_server: TlsRedis) -> None:
    """A second server of the same CA, with --tls-auth-clients yes (and the same users)."""
    server, port = _start(_tool("redis-server"), tls_server.directory, clients="yes")
    try:
        where = tls_server.directory
        url = f"rediss://admin:{tls_server.admin_password}@127.0.0.1:{port}?namespace={NAMESPACE}"
        url += f"&ssl_ca_certs={tls_server.ca}"
        error = _refused(url)  # no certificate: the handshake fails
        assert "ssl_certfile" in str(error)  # the hint
        assert tls_server.admin_password not in str(error)
        with shmstore.connect(url + f"&ssl_certfile={where}/client.crt&ssl_keyfile={where}/client.key") as client:
            assert client.report("m", Status.WORKING, "/w").id == "m"
    finally:
        server.terminate()
        server.wait(10)


# -- the TLS options of an address -------------------------------------------------------------


def test_the_tls_files_of_an_address_are_taken_from_its_url() -> None:
    address = parse_redis("rediss://u:p@cache.example?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key")
    assert address.tls_options() == {"ssl_ca_certs": "/etc/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key"}
    assert parse_redis("rediss://u:p@cache.example").tls_options() == {}


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost?ssl_ca_certs=/etc/ca.pem",  # not TLS: the file would be ignored
        "redis+unix:///run/r.sock?ssl_ca_certs=/etc/ca.pem",
        "rediss://u:p@cache.example?ssl_ca_certs=ca.pem",  # relative: to whichever directory
        "rediss://u:p@cache.example?ssl_keyfile=/c.key",  # a key without its certificate
        "rediss://u:p@cache.example?ssl_cert_reqs=none",  # verification is never turned off
    ],
)
def test_bad_tls_options_are_refused_with_our_error(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_redis(url)
    assert refused.value.field == "address"
    assert "ssl_" in refused.value.problem  # refused for that option, not for something else
