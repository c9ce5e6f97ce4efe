"""The Lua scripts of the Redis backend: one compare-and-set commit per write, and one
removal, each checking everything before its first change (see :mod:`shmstore.redis.store`
for how a write is atomic without decoding JSON in Lua). Every command they send is in the
least-privilege ACL line (tests/test_redis_security.py)."""

from __future__ import annotations

from typing import Any

from ..errors import ShmstoreError
from .address import RedisAddress

#: How long Redis keeps a client's newest write for a retry (the manager keeps the newest
#: 4,096 clients'; a key per client with a lifetime bounds them here). A client retries
#: within twice its timeout; every hook run is a client, so this also bounds the keys that
#: hooks leave (one record each).
DONE_SECONDS = 300


def _allowed(checks: str) -> str:
    """Lua that refuses the write before its first change, {"noperm", COMMAND}, when the
    ACL user may not run one of the write commands ``checks`` lists (each with its key):
    a script is not undone when a command in it fails, so a refused XADD left the session
    changed, two revisions on after the client's retry, with no event in the feed.
    ``redis.acl_check_cmd`` is Redis 7's (Valkey's too); older servers skip the check."""
    return f"""
if redis.acl_check_cmd then
  for _, check in ipairs({{{checks}}}) do
    if not redis.acl_check_cmd(unpack(check)) then
      return {{'noperm', check[1]}}
    end
  end
end
"""


def _preamble(number: int, epoch: int) -> str:
    """The checks both scripts make, in Lua, before any change: the store's epoch (made on
    first use, from ARGV[epoch]); a client's retry (ARGV[number]: its request number, or
    "") answered from what the first try stored, or refused as older than its newest; the
    session still at the revision the caller read (ARGV[2], "" for any); and the feed not
    past the store's revision (a damaged namespace, whose feed the write would fork)."""
    return """
local id = ARGV[1]
redis.call('HSETNX', meta, 'epoch', ARGV[EPOCH])
if ARGV[NUMBER] ~= '' then
  local number = redis.call('HGET', done, 'number')
  if number then
    if tonumber(number) == tonumber(ARGV[NUMBER]) then
      return {'done', redis.call('HGET', done, 'revision'), redis.call('HGET', done, 'data')}
    elseif tonumber(number) > tonumber(ARGV[NUMBER]) then
      return {'old'}
    end
  end
end
local have = tonumber(redis.call('HGET', revs, id) or '0')
if ARGV[2] ~= '' and have ~= tonumber(ARGV[2]) then
  if have == 0 and (redis.call('HEXISTS', live, id) == 1 or redis.call('HEXISTS', closed, id) == 1) then
    return {'damaged', 'revs'}
  end
  return {'conflict', string.format('%d', have)}
end
local revision = string.format('%d', tonumber(redis.call('HGET', meta, 'revision') or '0') + 1)
local top = redis.call('XREVRANGE', feed, '+', '-', 'COUNT', 1)[1]
if top and tonumber((string.gsub(top[1], '-.*', ''))) >= tonumber(revision) then
  return {'damaged', top[1]}
end
""".replace("EPOCH", str(epoch)).replace("NUMBER", str(number))


# KEYS: meta, live, closed, closed_order, revs, feed, done (a key no one uses when the
# write is not a client's once()), and the writer's host lease (renewed by a report: the
# host is alive; a key no one uses otherwise).
# ARGV: id, expected revision ("" = any; "0" = none), record before the revision, record
# after it, closing (1/0), kind, max_sessions, max_store_bytes, max_closed, log_size,
# request number ("" = not once), keep its place among the closed (1/0), a new epoch, the
# lease's lifetime in ms ("" = no lease), the event's mark (its feed id's
# second part: see :mod:`shmstore.redis.store`).
# Returns {"ok", revision, record, kind}, {"done", revision, record} (the client's retry of
# a write already made), {"old"} (older than its newest), {"conflict", revision},
# {"sessions", count} or {"bytes", total}: past a limit, nothing changed.
COMMIT = (
    """
local meta, live, closed, order, revs, feed, done, lease = unpack(KEYS)
ALLOWED
PREAMBLE
local data = ARGV[3] .. revision .. ARGV[4]
local bytes = tonumber(redis.call('HGET', meta, 'bytes') or '0')
local current = redis.call('HGET', live, id)
local kind = ARGV[6]
if ARGV[5] == '1' then
  if current then
    redis.call('HDEL', live, id)
    bytes = bytes - #current
  end
  if ARGV[12] == '1' and redis.call('HEXISTS', closed, id) == 1 then
    redis.call('HSET', closed, id, data)
  else
    redis.call('HSET', closed, id, data)
    redis.call('ZADD', order, revision, id)
    while redis.call('ZCARD', order) > tonumber(ARGV[9]) do
      local oldest = redis.call('ZRANGE', order, 0, 0)[1]
      redis.call('ZREM', order, oldest)
      redis.call('HDEL', closed, oldest)
      redis.call('HDEL', revs, oldest)
    end
    kind = 'close'
  end
else
  if not current then
    local count = redis.call('HLEN', live)
    if count >= tonumber(ARGV[7]) then
      return {'sessions', count}
    end
  end
  local total = bytes + #data - (current and #current or 0)
  if total > tonumber(ARGV[8]) then
    return {'bytes', total}
  end
  bytes = total
  redis.call('HDEL', closed, id)
  redis.call('ZREM', order, id)
  redis.call('HSET', live, id, data)
end
redis.call('HSET', revs, id, revision)
redis.call('HSET', meta, 'revision', revision, 'bytes', bytes)
redis.call('XADD', feed, 'MAXLEN', ARGV[10], revision .. '-' .. ARGV[15], 'kind', kind, 'id', id, 'data', data)
if ARGV[11] ~= '' then
  redis.call('HSET', done, 'number', ARGV[11], 'revision', revision, 'data', data)
  redis.call('EXPIRE', done, DONE_SECONDS)
end
if ARGV[14] ~= '' then
  redis.call('SET', lease, '1', 'PX', ARGV[14])
end
return {'ok', revision, data, kind}
""".replace("DONE_SECONDS", str(DONE_SECONDS))
    .replace("PREAMBLE", _preamble(11, 13))
    .replace(
        "ALLOWED",
        _allowed(
            "{'hsetnx', meta}, {'hset', meta}, {'hset', live}, {'hdel', live}, {'hset', closed}, {'hdel', closed}, "
            "{'zadd', order}, {'zrem', order}, {'hset', revs}, {'hdel', revs}, {'xadd', feed}, {'hset', done}, "
            "{'expire', done}, {'set', lease}"
        ),
    )
)

# KEYS as for COMMIT. ARGV: id, expected revision ("" = any), request number ("" = not
# once), log_size, a new epoch, the event's mark. Returns {"ok", revision, record}, {"none"} (no such
# session), {"done", revision, record} or {"old"} (as COMMIT), {"conflict", revision}.
REMOVE = (
    """
local meta, live, closed, order, revs, feed, done = unpack(KEYS)
ALLOWED
PREAMBLE
local data = redis.call('HGET', live, id)
if data then
  redis.call('HDEL', live, id)
  redis.call('HINCRBY', meta, 'bytes', -#data)
else
  data = redis.call('HGET', closed, id)
  if data then
    redis.call('HDEL', closed, id)
    redis.call('ZREM', order, id)
  end
end
if not data then
  if ARGV[3] ~= '' then
    redis.call('HSET', done, 'number', ARGV[3], 'revision', '0', 'data', '')
    redis.call('EXPIRE', done, DONE_SECONDS)
  end
  return {'none'}
end
redis.call('HDEL', revs, id)
redis.call('HSET', meta, 'revision', revision)
redis.call('XADD', feed, 'MAXLEN', ARGV[4], revision .. '-' .. ARGV[6], 'kind', 'remove', 'id', id)
if ARGV[3] ~= '' then
  redis.call('HSET', done, 'number', ARGV[3], 'revision', revision, 'data', data)
  redis.call('EXPIRE', done, DONE_SECONDS)
end
return {'ok', revision, data}
""".replace("DONE_SECONDS", str(DONE_SECONDS))
    .replace("PREAMBLE", _preamble(3, 5))
    .replace(
        "ALLOWED",
        _allowed(
            "{'hsetnx', meta}, {'hset', meta}, {'hincrby', meta}, {'hdel', live}, {'hdel', closed}, {'zrem', order}, "
            "{'hdel', revs}, {'xadd', feed}, {'hset', done}, {'expire', done}"
        ),
    )
)


def refused(address: RedisAddress, command: bytes) -> PermissionError:
    """A write the ACL user may not make (its script said so before changing anything)."""
    return PermissionError(
        f"Redis refused it (NOPERM): the user of {address} may not run {command.decode().upper()}, which a "
        "write needs; nothing was changed (see README for the least-privilege ACL line)"
    )


# -- what the scripts answer --------------------------------------------------------------

#: What a commit returns for a client's request older than its newest (nothing was run).
OLD = ("old",)


_LOST = {
    b"revs": "the key of its sessions' revisions",
    b"feed": "its feed",
    b"live": "the key of its live sessions",
}


def damaged(address: RedisAddress, top: bytes) -> ShmstoreError:
    """A namespace whose keys do not agree: its feed ahead of its revision (its meta key
    was deleted or replaced by hand), or a key the others need deleted or evicted whole
    (``top`` names it: ``revs``, ``feed`` or ``live``): no write could be made consistent,
    and no read trusted, so none is."""
    if top in _LOST:
        what = f"{_LOST[top]} is gone (deleted, or evicted under a maxmemory-policy other than noeviction)"
    else:
        what = f"its feed reaches {top.decode()}, past its revision"
    return ShmstoreError(
        f"the namespace {address.namespace!r} at {address} is damaged: {what}; delete the namespace's keys "
        "(a new store) or restore them together"
    )


def answer(result: Any) -> bytes:
    """A committed write's answer: its record, or None for a request older than the
    client's newest (Store.once answers one so)."""
    answer: bytes = None if result is OLD else result[1]  # type: ignore[assignment]
    return answer


def earlier_answer(once: tuple[bytes, int] | None, stored: list[bytes | None] | None = None) -> Any:
    """What Redis kept of a client's newest write (``[number, data]``) says of request
    ``once``: None (not run yet), its result's data, or OLD (older than the newest)."""
    if once is None or not stored or stored[0] is None:
        return None
    number = int(stored[0])
    if number < once[1]:
        return None
    return stored[1] if number == once[1] else OLD
