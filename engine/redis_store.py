"""The :class:`~engine.store.Store` contract on Redis.

Reads go out as one pipeline. Writes go out as one Lua script call, which
makes a batch atomic (a worker that dies mid-batch leaves nothing half done)
and lets an event's "only once" claim and its effects commit together: a
redelivered interaction finds its claim taken and changes nothing.

Redis is on the ranking hot path, so failures must be fast and cheap:
connection and socket timeouts are short, and after a failure the store stops
trying for ``retry_after_s`` and raises :class:`StoreUnavailable` at once. The
ranker answers in retrieval order meanwhile and recovers on the next attempt.

The batch script touches several keys that it does not declare, which Redis
Cluster forbids; streamrank targets one Redis primary (with replicas).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.store import (
    REBASE_FRACTION,
    Batch,
    BatchWriter,
    BlobRead,
    DecayedIncrement,
    ExistsRead,
    FieldsRead,
    HashRead,
    Increment,
    ListRead,
    PushRecent,
    PutBlob,
    Read,
    RecentItemsRead,
    RecordsRead,
    Schedule,
    SetFields,
    StoreUnavailable,
    Write,
    claims,
)

# ARGV: the rebase fraction of decayed counts, then batches of the form: c, c once-keys, once-ttl,
# n, then n arguments of writes of the form: code, key, ttl, count, payload... Each batch
# commits on its own if none of its once-keys exists (claiming them all); the reply says which
# were applied. Code 'n' is a run of decayed
# increments that differ only in their key (an engagement's pairs, ``_encode_writes``): key
# '', count = the number of keys, then the shared payload and the keys.
_APPLY_BATCHES = """
local rebase_fraction = tonumber(ARGV[1])
-- Byte order, as Python compares str: Lua's '<' follows the server's locale.
local function before(a, b)
  for p = 1, math.min(#a, #b) do
    local x, y = string.byte(a, p), string.byte(b, p)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function larger(a, b)
  if a[2] ~= b[2] then return a[2] > b[2] end
  return before(a[1], b[1])
end
-- Keep the largest 'keep' decayed counts once more than keep + keep // 2 are held.
local function keep_largest(key, prefix, stamp, keep)
  local limit = keep + math.floor(keep / 2)
  if redis.call('HLEN', key) <= limit then return end
  local fields = redis.call('HGETALL', key)
  local counts = {}
  for j = 1, #fields, 2 do
    if fields[j] ~= stamp and string.sub(fields[j], 1, #prefix) == prefix then
      counts[#counts + 1] = {fields[j], tonumber(fields[j + 1])}
    end
  end
  if #counts <= limit then return end
  table.sort(counts, larger)
  for j = keep + 1, #counts do redis.call('HDEL', key, counts[j][1]) end
end
-- Add the field/amount pairs at ARGV[first..] (count of them) to decayed counts of key.
local function decayed(key, ts, half_life, floor, prefix, keep, first, count)
  local stamp = prefix .. '_t'
  local stored = redis.call('HGET', key, stamp)
  local reference = tonumber(stored or ts)
  if ts - reference > half_life / rebase_fraction then
    stored = false
    local factor = 2 ^ (-(ts - reference) / half_life)
    local fields = redis.call('HGETALL', key)
    for j = 1, #fields, 2 do
      if fields[j] ~= stamp and string.sub(fields[j], 1, #prefix) == prefix then
        local kept = tonumber(fields[j + 1]) * factor
        if kept < floor then
          redis.call('HDEL', key, fields[j])
        else
          redis.call('HSET', key, fields[j], string.format('%.17g', kept))
        end
      end
    end
    reference = ts
  end
  local growth = 2 ^ ((ts - reference) / half_life)
  for j = first, first + 2 * count - 1, 2 do
    redis.call('HINCRBYFLOAT', key, ARGV[j], string.format('%.17g', tonumber(ARGV[j + 1]) * growth))
  end
  if not stored then redis.call('HSET', key, stamp, string.format('%.17g', reference)) end
  if keep > 0 then keep_largest(key, prefix, stamp, keep) end
end
local function apply(i, last)
  while i <= last do
    local code, key, ttl, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    i = i + 4
    if code == 'i' then
      for j = 0, n - 1 do redis.call('HINCRBYFLOAT', key, ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
      i = i + 2 * n
    elseif code == 'd' then
      local ts, half_life, floor = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
      decayed(key, ts, half_life, floor, ARGV[i + 3], tonumber(ARGV[i + 4]), i + 5, n)
      i = i + 5 + 2 * n
    elseif code == 'n' then
      -- One decayed increment (one field, one amount) on n keys: an engagement's pairs.
      local ts, half_life, floor = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
      local prefix, keep = ARGV[i + 3], tonumber(ARGV[i + 4])
      for j = i + 7, i + 6 + n do
        decayed(ARGV[j], ts, half_life, floor, prefix, keep, i + 5, 1)
        if ttl > 0 then redis.call('EXPIRE', ARGV[j], ttl) end
      end
      ttl = 0
      i = i + 7 + n
    elseif code == 's' then
      for j = 0, n - 1 do redis.call('HSET', key, ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
      i = i + 2 * n
    elseif code == 'l' then
      redis.call('LPUSH', key, ARGV[i])
      redis.call('LTRIM', key, 0, n - 1)
      i = i + 1
    elseif code == 'b' then
      redis.call('SET', key, ARGV[i])
      i = i + 1
    elseif code == 'z' then
      redis.call('ZADD', key, ARGV[i + 1], ARGV[i])
      i = i + 2
    end
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
local function claim(first, last, ttl)
  if first == last then return redis.call('SET', ARGV[first], '1', 'NX', 'EX', ttl) end
  for c = first, last do
    if redis.call('EXISTS', ARGV[c]) == 1 then return false end
  end
  for c = first, last do redis.call('SET', ARGV[c], '1', 'EX', ttl) end
  return true
end
local applied = {}
local i = 2
while i <= #ARGV do
  local claims = tonumber(ARGV[i])
  local once_ttl, n = ARGV[i + 1 + claims], tonumber(ARGV[i + 2 + claims])
  local first = i + 3 + claims
  if claims == 0 or claim(i + 1, i + claims, once_ttl) then
    apply(first, first + n - 1)
    applied[#applied + 1] = 1
  else
    applied[#applied + 1] = 0
  end
  i = first + n
end
return applied
"""

_POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

# RecentItemsRead. KEYS[1]: the list; ARGV: count, follow, item key prefix, hash suffix,
# the number of item fields, the item fields, then 1 and the hash fields wanted, or 0 (all).
_READ_RECENT_ITEMS = """
local entries = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local follow, prefix, suffix = tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n_fields = tonumber(ARGV[5])
local fields, wanted = {}, nil
for j = 6, 5 + n_fields do fields[#fields + 1] = ARGV[j] end
if ARGV[6 + n_fields] == '1' then
  wanted = {}
  for j = 7 + n_fields, #ARGV do wanted[ARGV[j]] = true end
end
local linked, seen = {}, {}
for _, entry in ipairs(entries) do
  if #linked >= 3 * follow then break end
  local tab = string.find(entry, '\t', 1, true)
  local id = tab and string.sub(entry, 1, tab - 1) or entry
  if not seen[id] then
    seen[id] = true
    local hash = redis.call('HGETALL', prefix .. id .. suffix)
    if wanted then
      -- Filtered here: the reply then carries a few fields, not every neighbour.
      local kept = {}
      for k = 1, #hash, 2 do
        if wanted[hash[k]] then
          kept[#kept + 1] = hash[k]
          kept[#kept + 1] = hash[k + 1]
        end
      end
      hash = kept
    end
    linked[#linked + 1] = id
    linked[#linked + 1] = hash
    linked[#linked + 1] = redis.call('HMGET', prefix .. id, unpack(fields))
  end
end
return {entries, linked}
"""


class RedisStore(BatchWriter):
    """A :class:`~engine.store.Store` on one Redis server.

    >>> store = RedisStore("redis://127.0.0.1:6379/0")  # doctest: +SKIP
    >>> store.apply([Increment("i:7", {"clk": 1})], once="ev:e-1")  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "",
        timeout_s: float = 0.25,
        retry_after_s: float = 0.5,
    ) -> None:
        self.url = url
        # Tenants (and test runs) sharing one Redis keep apart by prefix, as they do on Kafka.
        self.key_prefix = key_prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No hidden retries: a failure must reach the fallback at once.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._own: redis.Connection | None = None
        self._own_pid = 0
        self._own_lock = threading.Lock()
        self._apply_batches = self._client.register_script(_APPLY_BATCHES)
        self._pop_due = self._client.register_script(_POP_DUE)
        self._read_recent_items = self._client.register_script(_READ_RECENT_ITEMS)

    @property
    def client(self) -> redis.Redis:
        """The underlying client, for model registries and metrics that need plain commands."""
        return self._client

    def read(self, reads: Sequence[Read]) -> list:
        """Every read in one round trip of plain commands (a record read is one HMGET per
        key); only the recent items, whose second half depends on the first, need a script."""
        return self.read_then(reads, tuple)[0]

    def read_then(
        self, first: Sequence[Read], then: Callable[[], Sequence[Read]]
    ) -> tuple[list, list]:
        """``first`` is sent before ``then`` is called, so Redis works on it while the
        caller works out the rest; both are answered in one round trip (see :class:`Store`)."""
        commands = [command for r in first for command in self._commands(r)]
        later: list[Read] = []
        later_commands: list[tuple] = []  # kept for a second try

        def more() -> list[tuple]:
            later.extend(then())
            later_commands.extend(command for r in later for command in self._commands(r))
            return later_commands

        def round_trip() -> list:
            replies = self._round_trip(commands, more)
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                # A restarted Redis has forgotten the script: load it and read again.
                self._client.script_load(_READ_RECENT_ITEMS)
                replies = self._round_trip(commands + later_commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

        replies = iter(self._call(round_trip))
        return _answers(first, replies), _answers(later, replies)

    def apply_many(self, batches: Sequence[Batch]) -> list[bool]:
        """One script call for all the batches (its arguments: ``_APPLY_BATCHES``)."""
        prefix = self.key_prefix
        args: list[str | bytes | float | int] = []
        for batch in batches:
            encoded: list[str | bytes | float | int] = []
            _encode_writes(batch.writes, prefix, encoded)
            once = claims(batch.once)
            args.append(len(once))
            args += [prefix + key for key in once]
            args += [batch.once_ttl, len(encoded)]
            args += encoded
        if not args:
            return []
        args.insert(0, REBASE_FRACTION)
        return [bool(a) for a in self._call(lambda: self._run_apply_batches(args))]

    def _run_apply_batches(self, args: list) -> list:
        (reply,) = self._round_trip([("EVALSHA", self._apply_batches.sha, 0, *args)])
        if isinstance(reply, redis.exceptions.NoScriptError):
            return self._apply_batches(args=args)  # a restarted Redis: redis-py loads it again
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _round_trip(
        self, commands: Sequence[tuple], then: Callable[[], list[tuple]] | None = None
    ) -> list:
        """Send ``commands`` in one write, packed by hiredis, then the commands ``then()``
        returns, and read all their raw replies (an error reply comes back as its
        ``ResponseError``). redis-py's pipeline looks at every argument and reply in Python
        first (``bench/redis_reads.py``: a hundred hashes in 0.75 times its time), and as
        much again as the packing for the tens of thousands of arguments of a feedback
        batch."""
        packed = _packed(commands)
        # The store's own connection, kept out of the pool: checking one out and back in
        # takes a lock, a readiness poll (a system call) and usage metrics every round
        # trip. Another thread that finds it busy takes one from the pool.
        if self._own_lock.acquire(blocking=False):
            try:
                if self._own is None or self._own_pid != os.getpid():  # none yet, or forked
                    self._own = self._client.connection_pool.get_connection()
                    self._own_pid = os.getpid()
                return _exchange(self._own, packed, len(commands), then)
            finally:
                self._own_lock.release()
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            return _exchange(connection, packed, len(commands), then)
        finally:
            pool.release(connection)

    def pop_due(self, key: str, now: float, limit: int) -> list[str]:
        due = self._call(lambda: self._pop_due(keys=[self.key_prefix + key], args=[now, limit]))
        return [member.decode() for member in due]

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def _commands(self, r: Read) -> list[tuple]:
        """The commands of one read: one for each, but a record read's HMGET per key."""
        prefix = self.key_prefix
        if isinstance(r, HashRead):
            return [("HGETALL", prefix + r.key)]
        if isinstance(r, FieldsRead):
            return [("HMGET", prefix + r.key, *r.fields)]
        if isinstance(r, RecordsRead):
            # Empty: one harmless reply keeps the count of replies known.
            return [("HMGET", prefix + key, *r.fields) for key in r.keys] or [("ECHO", "")]
        if isinstance(r, ListRead):
            return [("LRANGE", prefix + r.key, 0, r.count - 1)]
        if isinstance(r, RecentItemsRead):
            wanted = (1, *r.hash_fields) if r.hash_fields is not None else (0,)
            return [
                (
                    "EVALSHA",
                    self._read_recent_items.sha,
                    1,
                    prefix + r.key,
                    r.count,
                    r.follow,
                    prefix + r.item_prefix,
                    r.hash_suffix,
                    len(r.fields),
                    *r.fields,
                    *wanted,
                )
            ]
        if isinstance(r, BlobRead):
            return [("GET", prefix + r.key)]
        if isinstance(r, ExistsRead):  # MGET: one command for every key (a claim is a string)
            return [("MGET", *[prefix + key for key in r.keys])] if r.keys else [("ECHO", "")]
        raise TypeError(f"unknown read {r!r}")  # pragma: no cover - the Read union is closed

    def _call(self, operation):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable; retrying shortly")
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self._down_until = time.monotonic() + self._retry_after_s
            raise StoreUnavailable(f"Redis at {self.url}: {error}") from error


def _answers(reads: Sequence[Read], replies: Iterator) -> list:
    """The answers to ``reads`` from their raw replies, decoded to str."""
    answers: list = []
    for r in reads:
        reply = next(replies)
        if isinstance(r, HashRead):
            if isinstance(reply, dict):  # RESP3 (redis-py 8's default): a map
                answers.append({k.decode(): v.decode() for k, v in reply.items()})
            else:  # RESP2: field, value, field, ...
                fields = [v.decode() for v in reply]
                answers.append(dict(zip(fields[::2], fields[1::2], strict=True)))
        elif isinstance(r, FieldsRead):
            answers.append([None if v is None else v.decode() for v in reply])
        elif isinstance(r, RecordsRead):
            rows = [reply, *(next(replies) for _ in range(len(r.keys) - 1))] if r.keys else []
            answers.append([[None if v is None else v.decode() for v in row] for row in rows])
        elif isinstance(r, ListRead):
            answers.append([v.decode() for v in reply])
        elif isinstance(r, RecentItemsRead):
            answers.append(_recent_items(reply))
        elif isinstance(r, ExistsRead):
            answers.append([value is not None for value in reply] if r.keys else [])
        else:
            answers.append(reply)
    return answers


def _packed(commands: Sequence[tuple]) -> bytes:
    return b"".join([hiredis.pack_command(command) for command in commands])


def _exchange(
    connection: redis.Connection,
    packed: bytes,
    replies: int,
    then: Callable[[], list[tuple]] | None = None,
) -> list:
    """Send packed commands, then those ``then()`` returns, and read all their replies (an
    error reply as its exception)."""
    try:
        connection.send_packed_command([packed], check_health=False)
        if then is not None and (more := then()):
            connection.send_packed_command([_packed(more)], check_health=False)
            replies += len(more)
        answers = []
        for _ in range(replies):
            try:
                answers.append(connection.read_response())
            except redis.ResponseError as error:  # read whole: the next reply follows
                answers.append(error)
        return answers
    except BaseException:
        connection.disconnect()  # replies may be left unread; the next send reconnects
        raise


def _encode_writes(writes: Sequence[Write], prefix: str, args: list) -> None:
    """Append ``writes`` to the script's ARGV, a run of decayed increments that differ only
    in their key (an engagement's pairs) as one 'n' write: 8 arguments less per key."""
    k, end = 0, len(writes)
    while k < end:
        w = writes[k]
        if type(w) is DecayedIncrement and len(w.amounts) == 1:
            last = k + 1
            while last < end and _same_but_key(writes[last], w):
                last += 1
            if last - k > 1:
                ((name, amount),) = w.amounts.items()
                args += ["n", "", w.ttl, last - k, repr(w.ts), repr(w.half_life_s)]
                args += [repr(w.floor), w.prefix, w.keep, name, repr(float(amount))]
                args += [prefix + writes[j].key for j in range(k, last)]
                k = last
                continue
        _encode_write(w, prefix + w.key, args)
        k += 1


def _same_but_key(w: Write, first: DecayedIncrement) -> bool:
    return (
        type(w) is DecayedIncrement
        and w.ts == first.ts
        and w.amounts == first.amounts
        and w.half_life_s == first.half_life_s
        and w.ttl == first.ttl
        and w.floor == first.floor
        and w.prefix == first.prefix
        and w.keep == first.keep
    )


def _recent_items(reply: list) -> tuple[list[str], dict]:
    entries, linked = reply
    items: dict[str, tuple[dict[str, str], list[str | None]]] = {}
    for k in range(0, len(linked), 3):
        flat = [v.decode() for v in linked[k + 1]]
        values = [None if v is None else v.decode() for v in linked[k + 2]]
        items[linked[k].decode()] = (dict(zip(flat[::2], flat[1::2], strict=True)), values)
    return [v.decode() for v in entries], items


def _encode_write(w: Write, key: str, args: list) -> None:
    """Append one write to the script's ARGV (``key`` with the store's prefix)."""
    try:
        encode = _ENCODERS[type(w)]
    except KeyError:  # pragma: no cover - the Write union is closed
        raise TypeError(f"unknown write {w!r}") from None
    encode(w, key, args)


def _amounts(amounts: dict[str, float], args: list) -> None:
    for name, amount in amounts.items():
        args += [name, repr(float(amount))]


def _increment(w: Increment, key: str, args: list) -> None:
    args += ["i", key, w.ttl, len(w.amounts)]
    _amounts(w.amounts, args)


def _decayed_increment(w: DecayedIncrement, key: str, args: list) -> None:
    args += ["d", key, w.ttl, len(w.amounts), repr(w.ts), repr(w.half_life_s), repr(w.floor)]
    args += [w.prefix, w.keep]
    _amounts(w.amounts, args)


def _set_fields(w: SetFields, key: str, args: list) -> None:
    args += ["s", key, w.ttl, len(w.values)]
    for name, value in w.values.items():
        args += [name, value]


_ENCODERS = {
    Increment: _increment,
    DecayedIncrement: _decayed_increment,
    SetFields: _set_fields,
    PushRecent: lambda w, key, args: args.extend(("l", key, w.ttl, w.max_length, w.value)),
    PutBlob: lambda w, key, args: args.extend(("b", key, w.ttl, 0, w.value)),
    Schedule: lambda w, key, args: args.extend(("z", key, w.ttl, 0, w.member, repr(w.due))),
}
