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

import time
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine.store import (
    REBASE_FRACTION,
    Batch,
    BatchWriter,
    BlobRead,
    DecayedIncrement,
    FieldsRead,
    HashRead,
    Increment,
    ListRead,
    PushRecent,
    PutBlob,
    Read,
    Schedule,
    SetFields,
    StoreUnavailable,
    Write,
)

# ARGV: the rebase fraction of decayed counts, then batches of the form: once-key ('' for none),
# once-ttl, n, then n arguments of writes of the form: code, key, ttl, count, payload... Each
# batch commits on its own; the reply says which were applied.
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
local function apply(i, last)
  while i <= last do
    local code, key, ttl, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    i = i + 4
    if code == 'i' then
      for j = 0, n - 1 do redis.call('HINCRBYFLOAT', key, ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
      i = i + 2 * n
    elseif code == 'd' then
      local ts, half_life, floor = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
      local prefix, keep = ARGV[i + 3], tonumber(ARGV[i + 4])
      local stamp = prefix .. '_t'
      i = i + 5
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
      for j = 0, n - 1 do
        redis.call('HINCRBYFLOAT', key, ARGV[i + 2 * j],
                   string.format('%.17g', tonumber(ARGV[i + 2 * j + 1]) * growth))
      end
      if not stored then redis.call('HSET', key, stamp, string.format('%.17g', reference)) end
      if keep > 0 then keep_largest(key, prefix, stamp, keep) end
      i = i + 2 * n
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
local applied = {}
local i = 2
while i <= #ARGV do
  local once, once_ttl, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  if once == '' or redis.call('SET', once, '1', 'NX', 'EX', once_ttl) then
    apply(i, i + n - 1)
    applied[#applied + 1] = 1
  else
    applied[#applied + 1] = 0
  end
  i = i + n
end
return applied
"""

_POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

# Many hashes in one command: redis-py's per-command work (packing, reply callbacks) costs
# more than Redis does (bench/redis_reads.py: a hundred hashes in 0.79x the pipeline's time).
_READ_HASHES = """
local replies = {}
for i, key in ipairs(KEYS) do replies[i] = redis.call('HGETALL', key) end
return replies
"""
# Below this many hash reads a plain pipeline is as cheap.
_MANY_HASHES = 8


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
        self._apply_batches = self._client.register_script(_APPLY_BATCHES)
        self._pop_due = self._client.register_script(_POP_DUE)
        self._read_hashes = self._client.register_script(_READ_HASHES)

    @property
    def client(self) -> redis.Redis:
        """The underlying client, for model registries and metrics that need plain commands."""
        return self._client

    def read(self, reads: Sequence[Read]) -> list:
        replies = self._call(lambda: self._pipeline_reads(reads))
        answers: list = []
        for r, reply in zip(reads, replies, strict=True):
            if isinstance(r, HashRead):
                if isinstance(reply, list):  # from _READ_HASHES: field, value, field, ...
                    fields = [v.decode() for v in reply]
                    answers.append(dict(zip(fields[::2], fields[1::2], strict=True)))
                else:
                    answers.append({k.decode(): v.decode() for k, v in reply.items()})
            elif isinstance(r, FieldsRead):
                answers.append([None if v is None else v.decode() for v in reply])
            elif isinstance(r, ListRead):
                answers.append([v.decode() for v in reply])
            else:
                answers.append(reply)
        return answers

    def apply_many(self, batches: Sequence[Batch]) -> list[bool]:
        prefix = self.key_prefix
        args: list[str | bytes | float | int] = []
        for batch in batches:
            encoded: list[str | bytes | float | int] = []
            for w in batch.writes:
                _encode_write(w, prefix + w.key, encoded)
            args += [prefix + batch.once if batch.once else "", batch.once_ttl, len(encoded)]
            args += encoded
        if not args:
            return []
        args.insert(0, REBASE_FRACTION)
        return [bool(a) for a in self._call(lambda: self._apply_batches(args=args))]

    def pop_due(self, key: str, now: float, limit: int) -> list[str]:
        due = self._call(lambda: self._pop_due(keys=[self.key_prefix + key], args=[now, limit]))
        return [member.decode() for member in due]

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def _pipeline_reads(self, reads: Sequence[Read]) -> list:
        pipe = self._client.pipeline(transaction=False)
        prefix = self.key_prefix
        hashes = [prefix + r.key for r in reads if isinstance(r, HashRead)]
        together = len(hashes) >= _MANY_HASHES
        if together:
            # EVALSHA itself, not redis-py's pipelined Script, which asks SCRIPT EXISTS first
            # (a second round trip on every read); a restarted Redis answers NOSCRIPT once.
            pipe.evalsha(self._read_hashes.sha, len(hashes), *hashes)
        for r in reads:
            if isinstance(r, HashRead):
                if not together:
                    pipe.hgetall(prefix + r.key)
            elif isinstance(r, FieldsRead):
                pipe.hmget(prefix + r.key, r.fields)
            elif isinstance(r, ListRead):
                pipe.lrange(prefix + r.key, 0, r.count - 1)
            elif isinstance(r, BlobRead):
                pipe.get(prefix + r.key)
        replies = pipe.execute(raise_on_error=False)
        if together and isinstance(replies[0], redis.exceptions.NoScriptError):
            self._client.script_load(_READ_HASHES)
            return self._pipeline_reads(reads)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if not together:
            return replies
        # Put each hash's reply back in the place of its read.
        many, rest = iter(replies[0]), iter(replies[1:])
        return [next(many) if isinstance(r, HashRead) else next(rest) for r in reads]

    def _call(self, operation):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"Redis at {self.url} is unreachable; retrying shortly")
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self._down_until = time.monotonic() + self._retry_after_s
            raise StoreUnavailable(f"Redis at {self.url}: {error}") from error


def _encode_write(w: Write, key: str, args: list) -> None:
    if isinstance(w, Increment):
        args += ["i", key, w.ttl, len(w.amounts)]
        for name, amount in w.amounts.items():
            args += [name, repr(float(amount))]
    elif isinstance(w, DecayedIncrement):
        args += ["d", key, w.ttl, len(w.amounts), repr(w.ts), repr(w.half_life_s), repr(w.floor)]
        args += [w.prefix, w.keep]
        for name, amount in w.amounts.items():
            args += [name, repr(float(amount))]
    elif isinstance(w, SetFields):
        args += ["s", key, w.ttl, len(w.values)]
        for name, value in w.values.items():
            args += [name, value]
    elif isinstance(w, PushRecent):
        args += ["l", key, w.ttl, w.max_length, w.value]
    elif isinstance(w, PutBlob):
        args += ["b", key, w.ttl, 0, w.value]
    elif isinstance(w, Schedule):
        args += ["z", key, w.ttl, 0, w.member, repr(w.due)]
    else:  # pragma: no cover - the Write union is closed
        raise TypeError(f"unknown write {w!r}")
