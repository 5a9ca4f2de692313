"""The state interface of the engine: batched reads and atomic batched writes.

The engine never talks to Redis command by command. It describes what it needs
as a list of reads (answered in one round trip) and what it changes as a list of
writes (applied atomically, in one round trip, optionally only once per event).
:class:`MemoryStore` implements that contract in process for unit tests and
replay; ``engine.redis_store.RedisStore`` implements it on Redis.

>>> store = MemoryStore()
>>> store.apply([Increment("i:7", {"clk": 1})], once="ev:e-1")
True
>>> store.apply([Increment("i:7", {"clk": 1})], once="ev:e-1")  # redelivered
False
>>> store.read([HashRead("i:7")])
[{'clk': '1'}]
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class StoreUnavailable(RuntimeError):
    """The state store cannot be reached; callers fall back instead of failing."""


# --- reads -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HashRead:
    """All fields of a hash, as ``dict[str, str]`` (empty when the key is absent)."""

    key: str


@dataclass(frozen=True, slots=True)
class FieldsRead:
    """Some fields of a hash, as ``list[str | None]`` in the order asked."""

    key: str
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RecordsRead:
    """The same fields of many hashes, as ``list[list[str | None]]``: one list per key, in
    the order asked (all ``None`` for an absent key). One command on Redis however many
    keys: the ranker reads every candidate's item hash this way."""

    keys: tuple[str, ...]
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListRead:
    """The newest ``count`` entries of a list, newest first, as ``list[str]``."""

    key: str
    count: int


@dataclass(frozen=True, slots=True)
class RecentItemsRead:
    """A list of recent items (entries ``"{item_id}\\t..."``, newest first) as :class:`ListRead`
    reads it and, for its first ``follow`` distinct items, the hash
    ``{item_prefix}{item_id}{hash_suffix}`` and the ``fields`` of ``{item_prefix}{item_id}``.

    Answered as ``(entries, {item_id: (hash as dict, [field values])})``, in one round trip
    although what is read second depends on what is read first: the ranker reads a
    shopper's recent items and, with them, the neighbour lists of the newest ones.
    With ``hash_fields``, each hash is answered with only those of its fields (the ranker
    needs an anchor's neighbours among the request's candidates, not all of them).
    """

    key: str
    count: int
    follow: int
    item_prefix: str
    hash_suffix: str
    fields: tuple[str, ...]
    hash_fields: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class BlobRead:
    """A binary value, as ``bytes`` or ``None``."""

    key: str


@dataclass(frozen=True, slots=True)
class ExistsRead:
    """Which of ``keys`` exist, as ``list[bool]`` in the order asked (one command on Redis):
    which events were claimed before."""

    keys: tuple[str, ...]


Read = HashRead | FieldsRead | RecordsRead | ListRead | RecentItemsRead | BlobRead | ExistsRead


# --- writes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Increment:
    """Add to numeric fields of a hash."""

    key: str
    amounts: dict[str, float]
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class DecayedIncrement:
    """Add to exponentially decayed counts.

    The hash keeps a reference time in field ``_t``; every count is as of that time,
    and an event at ``ts`` adds ``amount * 2 ** ((ts - _t) / half_life)``, so a
    reader decays everything by ``2 ** (-(now - _t) / half_life)``. Only when an
    event is more than ``half_life / 8`` newer than ``_t`` are all counts rebased to
    its time (dropping those below ``floor``, which bounds the hash): one write per
    event, not one per stored count. The order of events does not matter.

    With a ``prefix``, the decayed counts share a hash with other fields: only fields
    named with the prefix are decayed, and the reference time is ``{prefix}_t``.

    With ``keep`` > 0 the hash holds only the largest decayed counts (a top-K, such as an
    item's nearest neighbours). Trimming is amortized: a write that leaves more than
    ``keep + keep // 2`` counts cuts them to the ``keep`` largest (ties: the smaller
    field name stays), so a hash holds between ``keep`` and ``keep + keep // 2`` counts
    once full and sorts once per ``keep // 2`` new fields, not on every write. Counts are
    compared as stored (all as of the same reference time), which is comparing them
    decayed to any time. Readers wanting exactly ``keep`` take the largest.

    >>> store = MemoryStore()
    >>> store.apply([DecayedIncrement("n", {f"i-{n}": n for n in range(1, 5)}, 0.0, 60.0, keep=2)])
    True
    >>> sorted(store.read([HashRead("n")])[0])  # 4 counts > 2 + 1: cut to the 2 largest
    ['_t', 'i-3', 'i-4']
    """

    key: str
    amounts: dict[str, float]
    ts: float
    half_life_s: float
    floor: float = 0.01
    ttl: int = 0
    prefix: str = ""
    keep: int = 0


@dataclass(frozen=True, slots=True)
class SetFields:
    """Set string fields of a hash."""

    key: str
    values: dict[str, str]
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class PushRecent:
    """Push onto a list and keep only the newest ``max_length`` entries."""

    key: str
    value: str
    max_length: int
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class PutBlob:
    key: str
    value: bytes
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class Schedule:
    """Add ``member`` to a due-queue, to be popped by :meth:`Store.pop_due` after ``due``."""

    key: str
    member: str
    due: float
    ttl: int = 0


Write = Increment | DecayedIncrement | SetFields | PushRecent | PutBlob | Schedule


@dataclass(frozen=True, slots=True)
class Batch:
    """Writes that commit together; with ``once``, only if that key was never claimed (a
    tuple of keys: only if none of them was; all are claimed together)."""

    writes: Sequence[Write]
    once: str | tuple[str, ...] | None = None
    once_ttl: int = 86400


def claims(once: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The keys a batch's ``once`` claims."""
    if once is None:
        return ()
    return (once,) if isinstance(once, str) else once


def merged(writes: Sequence[Write]) -> list[Write]:
    """The same changes in fewer writes: an increment of a key is added to the last one of
    that key (and TTL) when no other write to the key came between them. The other writes
    keep their order.

    Increments of one field commute, so a batch of many events' writes applies as well
    merged: a page of clicks adds to its variant's counters once, not once per click.

    >>> merged([Increment("v", {"clicks": 1}), SetFields("r", {"c": "1"}),
    ...         Increment("v", {"clicks": 1, "rr": 0.5})])  # doctest: +NORMALIZE_WHITESPACE
    [Increment(key='v', amounts={'clicks': 2, 'rr': 0.5}, ttl=0),
     SetFields(key='r', values={'c': '1'}, ttl=0)]
    """
    out: list[Write] = []
    open_sums: dict[str, tuple[int, dict[str, float]]] = {}  # key -> (ttl, amounts)
    for w in writes:
        if type(w) is not Increment:
            open_sums.pop(w.key, None)  # a later increment must not move before this write
            out.append(w)
            continue
        ttl, target = open_sums.get(w.key, (None, None))
        if target is None or ttl != w.ttl:
            target = dict(w.amounts)
            open_sums[w.key] = (w.ttl, target)
            out.append(Increment(w.key, target, w.ttl))
            continue
        for name, amount in w.amounts.items():
            target[name] = target.get(name, 0) + amount
    return out


class Store(Protocol):
    def read(self, reads: Sequence[Read]) -> list:
        """Answer every read in one round trip; raise :class:`StoreUnavailable` if unreachable."""
        ...

    def read_then(
        self, first: Sequence[Read], then: Callable[[], Sequence[Read]]
    ) -> tuple[list, list]:
        """The answers to ``first`` and to the reads ``then()`` returns, in one round trip.
        ``first`` goes out before ``then`` is called: a remote store works on it while the
        caller works out what else to read."""
        ...

    def apply(
        self, writes: Sequence[Write], once: str | None = None, once_ttl: int = 86400
    ) -> bool:
        """Apply all writes atomically. With ``once``, apply only if that key was never
        claimed before (claiming it in the same step) and return whether they were applied.
        (:class:`Batch` can claim several keys at once.)"""
        ...

    def apply_many(self, batches: Sequence[Batch]) -> list[bool]:
        """Apply several batches in one round trip, each atomic and guarded on its own."""
        ...

    def pop_due(self, key: str, now: float, limit: int) -> list[str]:
        """Remove and return up to ``limit`` members of a due-queue whose time has come."""
        ...


# Decayed counts are rebased when an event is this fraction of a half-life past ``_t``.
REBASE_FRACTION = 8


def decay_factor(age_s: float, half_life_s: float) -> float:
    """How much of a count is left after ``age_s`` seconds (1.0 for negative ages)."""
    return 2.0 ** (-max(age_s, 0.0) / half_life_s)


def format_number(value: float) -> str:
    """A float as Redis writes it back, so both stores answer the same text."""
    return repr(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


def trim_limit(keep: int) -> int:
    """How many decayed counts a hash bounded to ``keep`` may hold before it is trimmed."""
    return keep + keep // 2


# --- in-memory -------------------------------------------------------------------------------


@dataclass
class _Entry:
    value: object
    expires: float = 0.0  # 0 = never


class BatchWriter:
    """:meth:`apply` for stores that implement :meth:`apply_many`."""

    def apply_many(self, batches: Sequence[Batch]) -> list[bool]:
        raise NotImplementedError

    def apply(
        self, writes: Sequence[Write], once: str | None = None, once_ttl: int = 86400
    ) -> bool:
        """One guarded batch (see :class:`Store`)."""
        return self.apply_many([Batch(writes, once, once_ttl)])[0]


@dataclass
class MemoryStore(BatchWriter):
    """The :class:`Store` contract in a dict, for unit tests and replay.

    ``clock`` decides expiry; replay passes the event time so that TTLs follow
    the log rather than the wall clock.
    """

    clock: Callable[[], float] = time.time
    _entries: dict[str, _Entry] = field(default_factory=dict)

    def read_then(
        self, first: Sequence[Read], then: Callable[[], Sequence[Read]]
    ) -> tuple[list, list]:
        first = list(first)
        answers = self.read([*first, *then()])  # nothing to overlap: one read of both
        return answers[: len(first)], answers[len(first) :]

    def read(self, reads: Sequence[Read]) -> list:
        answers: list = []
        for r in reads:
            if isinstance(r, RecordsRead):
                hashes = [self._get(key) or {} for key in r.keys]
                answers.append([[h.get(f) for f in r.fields] for h in hashes])
                continue
            if isinstance(r, RecentItemsRead):
                answers.append(self._recent_items(r))
                continue
            if isinstance(r, ExistsRead):
                answers.append([self._get(key) is not None for key in r.keys])
                continue
            value = self._get(r.key)
            if isinstance(r, HashRead):
                answers.append(dict(value) if value else {})
            elif isinstance(r, FieldsRead):
                answers.append([value.get(f) if value else None for f in r.fields])
            elif isinstance(r, ListRead):
                answers.append(list(value[: r.count]) if value else [])
            else:
                answers.append(value)
        return answers

    def _recent_items(self, r: RecentItemsRead) -> tuple[list[str], dict]:
        entries = list((self._get(r.key) or [])[: r.count])
        linked: dict[str, tuple[dict[str, str], list[str | None]]] = {}
        for entry in entries:
            if len(linked) >= r.follow:
                break
            item_id = entry.partition("\t")[0]
            if item_id not in linked:
                linked_hash = self._get(r.item_prefix + item_id + r.hash_suffix) or {}
                if r.hash_fields is not None:
                    wanted = set(r.hash_fields)
                    linked_hash = {k: v for k, v in linked_hash.items() if k in wanted}
                item = self._get(r.item_prefix + item_id)
                values = [item.get(f) if item else None for f in r.fields]
                linked[item_id] = (dict(linked_hash), values)
        return entries, linked

    def apply_many(self, batches: Sequence[Batch]) -> list[bool]:
        applied = []
        for batch in batches:
            keys = claims(batch.once)
            if any(self._get(key) is not None for key in keys):
                applied.append(False)
                continue
            for key in keys:
                self._entries[key] = _Entry(True, self.clock() + batch.once_ttl)
            for w in batch.writes:
                self._apply_one(w)
            applied.append(True)
        return applied

    def pop_due(self, key: str, now: float, limit: int) -> list[str]:
        queue: list[tuple[float, str]] | None = self._get(key)
        if not queue:
            return []
        cut = min(bisect.bisect_right(queue, (now, "\U0010ffff")), limit)
        due = [member for _, member in queue[:cut]]
        del queue[:cut]
        return due

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str):
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires and entry.expires <= self.clock():
            del self._entries[key]
            return None
        return entry.value

    def _container(self, key: str, ttl: int, factory: Callable[[], object]):
        value = self._get(key)
        if value is None:
            value = factory()
            self._entries[key] = _Entry(value)
        if ttl:
            self._entries[key].expires = self.clock() + ttl
        return value

    def _apply_one(self, w: Write) -> None:
        if isinstance(w, Increment):
            fields = self._container(w.key, w.ttl, dict)
            for name, amount in w.amounts.items():
                fields[name] = format_number(float(fields.get(name, 0)) + amount)
        elif isinstance(w, DecayedIncrement):
            fields = self._container(w.key, w.ttl, dict)
            stamp = w.prefix + "_t"
            reference = float(fields.get(stamp, w.ts))
            if w.ts - reference > w.half_life_s / REBASE_FRACTION:
                factor = decay_factor(w.ts - reference, w.half_life_s)
                decayed = [n for n in fields if n != stamp and n.startswith(w.prefix)]
                for name in decayed:
                    kept = float(fields[name]) * factor
                    if kept < w.floor:
                        del fields[name]
                    else:
                        fields[name] = repr(kept)
                reference = w.ts
            growth = 2.0 ** ((w.ts - reference) / w.half_life_s)
            for name, amount in w.amounts.items():
                fields[name] = repr(float(fields.get(name, 0)) + amount * growth)
            fields[stamp] = repr(reference)
            if w.keep > 0:
                _keep_largest(fields, w.prefix, stamp, w.keep)
        elif isinstance(w, SetFields):
            self._container(w.key, w.ttl, dict).update(w.values)
        elif isinstance(w, PushRecent):
            entries = self._container(w.key, w.ttl, list)
            entries.insert(0, w.value)
            del entries[w.max_length :]
        elif isinstance(w, PutBlob):
            self._entries[w.key] = _Entry(w.value, self.clock() + w.ttl if w.ttl else 0.0)
        elif isinstance(w, Schedule):
            queue = self._container(w.key, w.ttl, list)
            bisect.insort(queue, (w.due, w.member))
        else:  # pragma: no cover - the Write union is closed
            raise TypeError(f"unknown write {w!r}")


def _keep_largest(fields: dict[str, str], prefix: str, stamp: str, keep: int) -> None:
    """Drop all but the ``keep`` largest decayed counts once there are too many."""
    counts = [n for n in fields if n != stamp and n.startswith(prefix)]
    if len(counts) <= trim_limit(keep):
        return
    # The same order as the Lua script's: larger first, then the smaller name.
    counts.sort(key=lambda n: (-float(fields[n]), n))
    for name in counts[keep:]:
        del fields[name]
