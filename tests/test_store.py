"""The Store contract: MemoryStore on its own, then the same answers from RedisStore."""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Iterator

import pytest

from engine.redis_store import RedisStore
from engine.store import (
    Batch,
    BlobRead,
    DecayedIncrement,
    ExistsRead,
    FieldsRead,
    HashRead,
    Increment,
    ListRead,
    MemoryStore,
    PushRecent,
    PutBlob,
    RecentItemsRead,
    RecordsRead,
    Schedule,
    SetFields,
    StoreUnavailable,
    decay_factor,
    format_number,
    merged,
)
from streamrank.localstack import RedisServer, free_port

HALF_LIFE = 100.0


class Clock:
    """A settable clock for MemoryStore expiry."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def numeric(fields: dict[str, str]) -> dict[str, float]:
    """Hash values as numbers: the two stores may spell the same float differently."""
    return {name: float(value) for name, value in fields.items()}


# --- helpers of the module -------------------------------------------------------------------


def test_decay_factor() -> None:
    assert decay_factor(0.0, 10.0) == 1.0
    assert decay_factor(10.0, 10.0) == 0.5
    assert decay_factor(30.0, 10.0) == 0.125
    assert decay_factor(-5.0, 10.0) == 1.0


def test_format_number() -> None:
    assert format_number(1.0) == "1"
    assert format_number(-3.0) == "-3"
    assert format_number(0.0) == "0"
    assert format_number(2.5) == "2.5"
    assert format_number(1e15) == "1000000000000000.0"  # as Python writes it, past 1e15
    assert format_number(0.1 + 0.2) == "0.30000000000000004"


# --- MemoryStore -----------------------------------------------------------------------------


def test_memory_reads_of_absent_keys() -> None:
    store = MemoryStore()
    assert store.read(
        [HashRead("h"), FieldsRead("h", ("a", "b")), ListRead("l", 3), BlobRead("b")]
    ) == [{}, [None, None], [], None]
    assert store.read([]) == []


def test_memory_increment_and_fields_read() -> None:
    store = MemoryStore()
    assert store.apply([Increment("h", {"a": 1, "b": 2.5}), Increment("h", {"a": 2})])
    assert store.read([HashRead("h")]) == [{"a": "3", "b": "2.5"}]
    assert store.read([FieldsRead("h", ("b", "zz", "a"))]) == [["2.5", None, "3"]]
    store.apply([Increment("h", {"b": -2.5})])
    assert store.read([HashRead("h")]) == [{"a": "3", "b": "0"}]


def test_memory_decayed_count_halves_after_a_half_life() -> None:
    store = MemoryStore()
    store.apply([DecayedIncrement("d", {"x": 8.0, "y": 1.0}, ts=0.0, half_life_s=10.0)])
    store.apply([DecayedIncrement("d", {"y": 1.0}, ts=10.0, half_life_s=10.0)])
    (fields,) = store.read([HashRead("d")])
    assert numeric(fields) == {"x": 4.0, "y": 1.5, "_t": 10.0}


def test_memory_decayed_older_event_is_decayed_to_the_reference() -> None:
    store = MemoryStore()
    store.apply([DecayedIncrement("d", {"x": 1.0}, ts=20.0, half_life_s=10.0)])
    store.apply([DecayedIncrement("d", {"x": 4.0, "z": 2.0}, ts=0.0, half_life_s=10.0)])
    (fields,) = store.read([HashRead("d")])
    assert numeric(fields) == {"x": 2.0, "z": 0.5, "_t": 20.0}


def test_memory_decayed_order_does_not_matter() -> None:
    events = [(0.0, {"a": 1.0}), (37.0, {"a": 2.0, "b": 1.0}), (90.0, {"b": 3.0}), (5.0, {"c": 1})]
    expected = {
        "a": 1.0 * 2 ** (-90 / HALF_LIFE) + 2.0 * 2 ** (-53 / HALF_LIFE),
        "b": 1.0 * 2 ** (-53 / HALF_LIFE) + 3.0,
        "c": 2 ** (-85 / HALF_LIFE),
        "_t": 90.0,
    }
    for order in (events, events[::-1], [events[2], events[0], events[3], events[1]]):
        store = MemoryStore()
        for ts, amounts in order:
            store.apply([DecayedIncrement("d", amounts, ts, HALF_LIFE, floor=0.0)])
        (fields,) = store.read([HashRead("d")])
        assert numeric(fields) == pytest.approx(expected, rel=1e-12)


def test_memory_decayed_counts_below_floor_are_dropped() -> None:
    store = MemoryStore()
    store.apply([DecayedIncrement("d", {"small": 0.1, "big": 10.0}, 0.0, 10.0, floor=0.05)])
    # after 10 s: small 0.05 (kept: not below the floor), big 5
    store.apply([DecayedIncrement("d", {"other": 1.0}, 10.0, 10.0, floor=0.05)])
    assert numeric(store.read([HashRead("d")])[0]) == {
        "small": 0.05,
        "big": 5.0,
        "other": 1.0,
        "_t": 10.0,
    }
    # after 20 s more: small 0.0125 < 0.05 goes, big 1.25, other 0.25
    store.apply([DecayedIncrement("d", {}, 30.0, 10.0, floor=0.05)])
    assert numeric(store.read([HashRead("d")])[0]) == {"big": 1.25, "other": 0.25, "_t": 30.0}


def test_memory_prefixed_decayed_counts_leave_the_other_fields_alone() -> None:
    store = MemoryStore()
    store.apply([Increment("i", {"imp": 3}), SetFields("i", {"cat": "news"})])
    store.apply([DecayedIncrement("i", {"t|i": 8.0}, 0.0, 10.0, prefix="t|")])
    store.apply([DecayedIncrement("i", {"t|c": 1.0}, 20.0, 10.0, prefix="t|")])
    (fields,) = store.read([HashRead("i")])
    assert fields["imp"] == "3" and fields["cat"] == "news"
    assert numeric({k: v for k, v in fields.items() if k.startswith("t|")}) == {
        "t|i": 2.0,
        "t|c": 1.0,
        "t|_t": 20.0,
    }


def test_memory_set_fields_overwrites_and_keeps_others() -> None:
    store = MemoryStore()
    store.apply([SetFields("h", {"cat": "shoes", "brand": "acme"}), Increment("h", {"n": 1})])
    store.apply([SetFields("h", {"cat": "bags"})])
    assert store.read([HashRead("h")]) == [{"cat": "bags", "brand": "acme", "n": "1"}]


def test_memory_push_recent_trims_and_reads_newest_first() -> None:
    store = MemoryStore()
    store.apply([PushRecent("l", str(n), max_length=3) for n in range(5)])
    assert store.read([ListRead("l", 10), ListRead("l", 2), ListRead("l", 1)]) == [
        ["4", "3", "2"],
        ["4", "3"],
        ["4"],
    ]


def test_memory_blob() -> None:
    store = MemoryStore()
    store.apply([PutBlob("b", b"\x00\xffdata")])
    assert store.read([BlobRead("b")]) == [b"\x00\xffdata"]
    store.apply([PutBlob("b", b"new")])
    assert store.read([BlobRead("b")]) == [b"new"]


def test_memory_pop_due_order_limit_and_only_due() -> None:
    store = MemoryStore()
    store.apply(
        [
            Schedule("q", "late", 50.0),
            Schedule("q", "b", 10.0),
            Schedule("q", "a", 10.0),
            Schedule("q", "first", 5.0),
            Schedule("q", "mid", 20.0),
        ]
    )
    assert store.pop_due("q", now=4.9, limit=10) == []
    assert store.pop_due("q", now=10.0, limit=2) == ["first", "a"]
    assert store.pop_due("q", now=10.0, limit=10) == ["b"]
    assert store.pop_due("q", now=30.0, limit=0) == []
    assert store.pop_due("q", now=30.0, limit=10) == ["mid"]
    assert store.pop_due("q", now=1e12, limit=10) == ["late"]
    assert store.pop_due("q", now=1e12, limit=10) == []
    assert store.pop_due("absent", now=1e12, limit=10) == []


def test_memory_once_claims_atomically() -> None:
    store = MemoryStore()
    assert store.apply([Increment("h", {"n": 1})], once="ev:1") is True
    assert store.apply([Increment("h", {"n": 1})], once="ev:1") is False
    assert store.apply([Increment("h", {"n": 1})], once="ev:2") is True
    assert store.apply([], once="ev:3") is True
    assert store.apply([], once="ev:3") is False
    assert store.apply([Increment("h", {"n": 1})]) is True  # no claim: always applied
    assert store.read([HashRead("h")]) == [{"n": "3"}]


def test_memory_once_claim_expires() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    assert store.apply([Increment("h", {"n": 1})], once="ev:1", once_ttl=60)
    clock.now += 59.9
    assert not store.apply([Increment("h", {"n": 1})], once="ev:1", once_ttl=60)
    clock.now += 0.1
    assert store.apply([Increment("h", {"n": 1})], once="ev:1", once_ttl=60)
    assert store.read([HashRead("h")]) == [{"n": "2"}]


def test_memory_ttl_expiry_with_an_injected_clock() -> None:
    clock = Clock(1000.0)
    store = MemoryStore(clock=clock)
    store.apply(
        [
            Increment("h", {"n": 1}, ttl=10),
            SetFields("s", {"a": "x"}, ttl=20),
            PushRecent("l", "v", 5, ttl=10),
            PutBlob("b", b"blob", ttl=10),
            PutBlob("forever", b"x"),
            Increment("kept", {"n": 1}),
        ]
    )
    assert len(store) == 6
    clock.now = 1009.99
    assert store.read([HashRead("h"), ListRead("l", 5), BlobRead("b")]) == [
        {"n": "1"},
        ["v"],
        b"blob",
    ]
    clock.now = 1010.0
    assert store.read([HashRead("h"), ListRead("l", 5), BlobRead("b"), HashRead("s")]) == [
        {},
        [],
        None,
        {"a": "x"},
    ]
    clock.now = 1e9
    assert store.read([HashRead("s"), BlobRead("forever"), HashRead("kept")]) == [
        {},
        b"x",
        {"n": "1"},
    ]


def test_memory_write_with_ttl_refreshes_it_and_without_keeps_it() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock=clock)
    store.apply([Increment("h", {"n": 1}, ttl=10)])
    clock.now = 8.0
    store.apply([Increment("h", {"n": 1}, ttl=10)])  # now expires at 18
    clock.now = 12.0
    store.apply([Increment("h", {"n": 1})])  # no ttl: the expiry stays at 18
    assert store.read([HashRead("h")]) == [{"n": "3"}]
    clock.now = 18.0
    assert store.read([HashRead("h")]) == [{}]
    # an expired hash starts again from nothing
    store.apply([Increment("h", {"n": 1})])
    assert store.read([HashRead("h")]) == [{"n": "1"}]


def test_memory_put_blob_without_ttl_clears_the_old_one() -> None:
    clock = Clock(0.0)
    store = MemoryStore(clock=clock)
    store.apply([PutBlob("b", b"1", ttl=5)])
    store.apply([PutBlob("b", b"2")])
    clock.now = 100.0
    assert store.read([BlobRead("b")]) == [b"2"]


# --- the same scenario on both stores --------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "redis-resp2"])
def store(request: pytest.FixtureRequest) -> Iterator[MemoryStore | RedisStore]:
    """The in-memory store, and Redis spoken to in RESP3 (redis-py 8's default, a hash
    comes back as a map) and in RESP2 (redis-py 5-7's, a flat list)."""
    if request.param == "memory":
        yield MemoryStore()
    else:
        url = request.getfixturevalue("redis_url")
        if request.param == "redis-resp2":
            url += "?protocol=2"
        redis_store = RedisStore(url, timeout_s=2.0)
        yield redis_store
        redis_store.client.close()


@pytest.fixture
def ns() -> str:
    """A key prefix of this test: the Redis is shared with the rest of the session."""
    return f"ut:{uuid.uuid4().hex[:10]}:"


def scenario(store, ns: str) -> dict[str, object]:
    """Every kind of write and read, with the answers normalized for comparison."""
    k = ns
    answers: dict[str, object] = {}
    answers["first"] = store.apply(
        [
            Increment(k + "h", {"imp": 1, "exp": 0.05}),
            Increment(k + "h", {"imp": 1, "exp": 0.025}),
            SetFields(k + "h", {"cat": "shoes/running", "brand": "acme"}),
            DecayedIncrement(k + "d", {"x": 8.0, "y": 1.0}, 0.0, HALF_LIFE, floor=0.5),
            DecayedIncrement(k + "d", {"y": 2.0}, 100.0, HALF_LIFE, floor=0.5),
            DecayedIncrement(k + "d", {"x": 2.0, "z": 0.2}, 0.0, HALF_LIFE, floor=0.5),
            DecayedIncrement(k + "h", {"t|i": 4.0}, 0.0, HALF_LIFE, floor=0.5, prefix="t|"),
            DecayedIncrement(k + "h", {"t|c": 1.0}, 100.0, HALF_LIFE, floor=0.5, prefix="t|"),
            *[PushRecent(k + "l", f"i-{n}\t{n}.5", 3) for n in range(5)],
            PutBlob(k + "b", bytes(range(256))),
            Schedule(k + "q", "r-3", 30.0),
            Schedule(k + "q", "r-1", 10.0),
            Schedule(k + "q", "r-2", 10.0),
            Schedule(k + "q", "r-4", 40.0),
        ],
        once=k + "ev:1",
    )
    answers["replayed"] = store.apply([Increment(k + "h", {"imp": 100})], once=k + "ev:1")
    answers["unclaimed"] = store.apply([Increment(k + "h", {"clk": 1})])
    h, fields, d, recent, two, blob, absent = store.read(
        [
            HashRead(k + "h"),
            FieldsRead(k + "h", ("clk", "nope", "cat")),
            HashRead(k + "d"),
            ListRead(k + "l", 10),
            ListRead(k + "l", 2),
            BlobRead(k + "b"),
            BlobRead(k + "missing"),
        ]
    )
    answers["h"] = {
        name: float(h.pop(name)) for name in ("imp", "exp", "clk", "t|i", "t|c", "t|_t")
    }
    answers["h_text"] = h
    answers["fields"] = fields
    answers["d"] = numeric(d)
    answers["recent"], answers["two"], answers["blob"], answers["absent"] = (
        recent,
        two,
        blob,
        absent,
    )
    answers["pops"] = [
        store.pop_due(k + "q", 5.0, 10),
        store.pop_due(k + "q", 10.0, 1),
        store.pop_due(k + "q", 35.0, 10),
        store.pop_due(k + "q", 35.0, 10),
        store.pop_due(k + "q", 1e10, 10),
        store.pop_due(k + "nothing", 1e10, 10),
    ]
    return answers


EXPECTED = {
    "first": True,
    "replayed": False,
    "unclaimed": True,
    # t|: decayed counts sharing the hash; the other fields are not decayed with them
    "h": {"imp": 2.0, "exp": 0.075, "clk": 1.0, "t|i": 2.0, "t|c": 1.0, "t|_t": 100.0},
    "h_text": {"cat": "shoes/running", "brand": "acme"},
    "fields": ["1", None, "shoes/running"],
    # x: 8 decays to 4 at t=100, plus 2 from t=0 decayed by half; y: 0.5 + 2; z: 0.1 is added
    # as of t=100 (an older event is not dropped by the floor, only decayed)
    "d": {"x": 5.0, "y": 2.5, "z": 0.1, "_t": 100.0},
    "recent": ["i-4\t4.5", "i-3\t3.5", "i-2\t2.5"],
    "two": ["i-4\t4.5", "i-3\t3.5"],
    "blob": bytes(range(256)),
    "absent": None,
    "pops": [[], ["r-1"], ["r-2", "r-3"], [], ["r-4"], []],
}


def test_scenario_answers(store, ns: str) -> None:
    answers = scenario(store, ns)
    assert answers.pop("h") == pytest.approx(EXPECTED["h"], rel=1e-12)
    assert answers.pop("d") == pytest.approx(EXPECTED["d"], rel=1e-12)
    assert answers == {k: v for k, v in EXPECTED.items() if k not in ("h", "d")}


def test_both_stores_answer_alike(redis_url: str, ns: str) -> None:
    memory = scenario(MemoryStore(), ns)
    redis_store = RedisStore(redis_url, timeout_s=2.0)
    try:
        on_redis = scenario(redis_store, ns)
    finally:
        redis_store.client.close()
    assert on_redis.pop("h") == pytest.approx(memory.pop("h"), rel=1e-12)
    assert on_redis.pop("d") == pytest.approx(memory.pop("d"), rel=1e-12)
    assert on_redis == memory


def test_many_reads_in_one_round_trip_keep_their_places(redis_url: str, ns: str) -> None:
    """Twenty item hashes interleaved with other reads answer like the in-memory store, also
    after Redis forgot its scripts (a restart)."""
    memory, on_redis = MemoryStore(), RedisStore(redis_url, timeout_s=2.0)
    writes = [Increment(f"{ns}i:{n}", {"imp": n, "clk": n % 3}) for n in range(0, 20, 2)]
    writes.append(PushRecent(f"{ns}l", "x", 5))
    reads = [
        ListRead(f"{ns}l", 5),
        *[HashRead(f"{ns}i:{n}") for n in range(10)],
        FieldsRead(f"{ns}i:2", ("imp", "nope")),
        *[HashRead(f"{ns}i:{n}") for n in range(10, 20)],
    ]
    try:
        for store in (memory, on_redis):
            store.apply(writes)
        expected = memory.read(reads)
        assert on_redis.read(reads) == expected
        on_redis.client.script_flush()
        assert on_redis.read(reads) == expected
        assert on_redis.read(reads[:3]) == expected[:3]
    finally:
        on_redis.client.close()


def test_records_and_recent_items_reads(store, ns: str) -> None:
    """The candidates' item fields in one read, and a shopper's recent items with the
    hashes of their newest distinct items, alike on both stores (and on a Redis that
    forgot its scripts)."""
    store.apply(
        [
            SetFields(f"{ns}i:a", {"cat": "shoes", "n": "2"}),
            SetFields(f"{ns}i:b", {"n": "5"}),
            Increment(f"{ns}i:a:n", {"b": 3, "c": 1}),
            *[PushRecent(f"{ns}r", f"{item}\t{ts}", 10) for ts, item in enumerate("cabab")],
        ]
    )
    records = RecordsRead((f"{ns}i:a", f"{ns}i:missing", f"{ns}i:b"), ("n", "cat"))
    recent = RecentItemsRead(f"{ns}r", 4, 2, f"{ns}i:", ":n", ("n", "nope"))
    expected = [
        [["2", "shoes"], [None, None], ["5", None]],
        (
            ["b\t4", "a\t3", "b\t2", "a\t1"],
            {"b": ({}, ["5", None]), "a": ({"b": "3", "c": "1"}, ["2", None])},
        ),
    ]
    assert store.read([records, recent]) == expected
    # No keys: nothing, and the reads after it keep their answers.
    assert store.read([RecordsRead((), ("n",)), records]) == [[], expected[0]]
    if isinstance(store, RedisStore):
        store.client.script_flush()
        assert store.read([records, recent]) == expected
    # Only some fields of each followed hash: those of them it has, none if none asked for.
    only_c = RecentItemsRead(f"{ns}r", 4, 2, f"{ns}i:", ":n", ("n",), ("c", "x"))
    assert store.read([only_c]) == [
        (["b\t4", "a\t3", "b\t2", "a\t1"], {"b": ({}, ["5"]), "a": ({"c": "1"}, ["2"])})
    ]
    no_fields = RecentItemsRead(f"{ns}r", 4, 2, f"{ns}i:", ":n", ("n",), ())
    assert store.read([no_fields])[0][1] == {"b": ({}, ["5"]), "a": ({}, ["2"])}
    nothing_followed = RecentItemsRead(f"{ns}r", 2, 0, f"{ns}i:", ":n", ())
    assert store.read([nothing_followed]) == [(["b\t4", "a\t3"], {})]
    assert store.read([RecentItemsRead(f"{ns}none", 2, 2, f"{ns}i:", ":n", ())]) == [([], {})]


def test_decayed_increments_agree_out_of_order(store, ns: str) -> None:
    events = [(0.0, {"a": 1.0}), (37.0, {"a": 2.0, "b": 1.0}), (90.0, {"b": 3.0}), (5.0, {"c": 1})]
    expected = {
        "a": 1.0 * 2 ** (-90 / HALF_LIFE) + 2.0 * 2 ** (-53 / HALF_LIFE),
        "b": 1.0 * 2 ** (-53 / HALF_LIFE) + 3.0,
        "c": 2 ** (-85 / HALF_LIFE),
        "_t": 90.0,
    }
    for n, order in enumerate((events, events[::-1], [events[2], events[0], events[3], events[1]])):
        key = f"{ns}d{n}"
        for ts, amounts in order:
            store.apply([DecayedIncrement(key, amounts, ts, HALF_LIFE, floor=0.0)])
        (fields,) = store.read([HashRead(key)])
        assert numeric(fields) == pytest.approx(expected, rel=1e-12)


def test_decayed_floor_on_both(store, ns: str) -> None:
    key = ns + "d"
    store.apply([DecayedIncrement(key, {"small": 0.1, "big": 10.0}, 0.0, 10.0, floor=0.05)])
    store.apply([DecayedIncrement(key, {"other": 1.0}, 30.0, 10.0, floor=0.05)])
    (fields,) = store.read([HashRead(key)])
    assert numeric(fields) == pytest.approx({"big": 1.25, "other": 1.0, "_t": 30.0}, rel=1e-12)


# --- bounded decayed counts (keep) ------------------------------------------------------------


def counts_of(fields: dict[str, str], prefix: str = "") -> dict[str, float]:
    return {k: float(v) for k, v in fields.items() if k.startswith(prefix) and k != prefix + "_t"}


def test_bounded_decayed_counts_stay_bounded_and_keep_the_largest(store, ns: str) -> None:
    key, keep = ns + "n", 10
    sizes = []
    for n in range(200):
        # value n % 37 + n / 1000: distinct, and the largest are not the newest
        value = n % 37 + n / 1000
        store.apply([DecayedIncrement(key, {f"i-{n}": value}, 0.0, HALF_LIFE, keep=keep)])
        sizes.append(len(counts_of(store.read([HashRead(key)])[0])))
    assert max(sizes) == keep + keep // 2  # trimmed to keep once it holds more than 15
    assert min(sizes[keep:]) == keep
    counts = counts_of(store.read([HashRead(key)])[0])
    values = sorted((n % 37 + n / 1000 for n in range(200)), reverse=True)
    # the 10 largest of all are there (trims never drop one of the current top 10)
    assert sorted(counts.values(), reverse=True)[:keep] == pytest.approx(values[:keep])


def test_bounded_decayed_counts_compare_decayed_values(store, ns: str) -> None:
    """An old large count that has decayed below newer ones is the one cut."""
    key = ns + "n"
    store.apply([DecayedIncrement(key, {"old": 8.0, "mid": 3.0}, 0.0, 10.0, keep=2)])
    # 40 s = 4 half-lives later: old is 0.5, mid 0.1875; new ones 2 and 1
    store.apply([DecayedIncrement(key, {"new": 2.0, "newer": 1.0}, 40.0, 10.0, keep=2)])
    (fields,) = store.read([HashRead(key)])
    assert counts_of(fields) == pytest.approx({"new": 2.0, "newer": 1.0}, rel=1e-12)
    assert float(fields["_t"]) == 40.0
    # an older event still adds decayed to the reference time, and the largest stay
    store.apply([DecayedIncrement(key, {"late": 64.0, "x": 0.1, "y": 0.2}, 20.0, 10.0, keep=2)])
    (fields,) = store.read([HashRead(key)])
    assert counts_of(fields) == pytest.approx({"late": 16.0, "new": 2.0}, rel=1e-12)


def test_bounded_decayed_counts_keep_other_fields_and_break_ties_by_name(store, ns: str) -> None:
    key = ns + "i"
    store.apply([SetFields(key, {"cat": "shoes"}), Increment(key, {"imp": 3})])
    tied = {f"n|{name}": 1.0 for name in ("d", "b", "e", "a", "c")}
    store.apply([DecayedIncrement(key, tied, 0.0, HALF_LIFE, prefix="n|", keep=2)])
    (fields,) = store.read([HashRead(key)])
    assert fields["cat"] == "shoes" and fields["imp"] == "3"
    assert counts_of(fields, "n|") == {"n|a": 1.0, "n|b": 1.0}
    assert float(fields["n|_t"]) == 0.0


def test_unbounded_decayed_counts_are_not_trimmed(store, ns: str) -> None:
    key = ns + "d"
    store.apply([DecayedIncrement(key, {f"f{n}": 1.0 + n for n in range(500)}, 0.0, HALF_LIFE)])
    assert len(counts_of(store.read([HashRead(key)])[0])) == 500


def test_both_stores_trim_alike(redis_url: str, ns: str) -> None:
    memory, on_redis = MemoryStore(), RedisStore(redis_url, timeout_s=2.0)
    writes = [
        DecayedIncrement(
            ns + "n",
            {f"i-{(7 * n + j) % 50}": 1.0 + (n * j) % 4 for j in range(3)},
            float(n * 3 % 40),
            HALF_LIFE,
            floor=0.0,
            keep=8,
        )
        for n in range(60)
    ]
    try:
        answers = []
        for s in (memory, on_redis):
            for w in writes:
                s.apply([w])
            answers.append(numeric(s.read([HashRead(ns + "n")])[0]))
        assert answers[1].keys() == answers[0].keys()
        assert answers[1] == pytest.approx(answers[0], rel=1e-12)
    finally:
        on_redis.client.close()


def test_once_on_both(store, ns: str) -> None:
    key, once = ns + "h", ns + "ev"
    results = [store.apply([Increment(key, {"n": 1})], once=once, once_ttl=60) for _ in range(3)]
    assert results == [True, False, False]
    assert store.apply([], once=ns + "empty") is True
    assert store.apply([], once=ns + "empty") is False
    assert store.read([HashRead(key)]) == [{"n": "1"}]


def test_redis_sets_the_ttls(redis_url: str, ns: str) -> None:
    store = RedisStore(redis_url, timeout_s=2.0)
    try:
        store.apply(
            [
                Increment(ns + "h", {"n": 1}, ttl=100),
                DecayedIncrement(ns + "d", {"n": 1}, 0.0, 10.0, ttl=200),
                SetFields(ns + "s", {"a": "b"}, ttl=300),
                PushRecent(ns + "l", "v", 5, ttl=400),
                PutBlob(ns + "b", b"x", ttl=500),
                Schedule(ns + "q", "m", 1.0, ttl=600),
                Increment(ns + "forever", {"n": 1}),
            ],
            once=ns + "ev",
            once_ttl=700,
        )
        client = store.client
        ttls = [client.ttl(ns + name) for name in ("h", "d", "s", "l", "b", "q", "ev", "forever")]
        expected = [100, 200, 300, 400, 500, 600, 700, -1]
        assert all(e - 2 <= t <= e for t, e in zip(ttls, expected, strict=True)), ttls
        assert ttls[-1] == -1
        # a write without ttl keeps the key's ttl; a blob without ttl loses it (SET)
        store.apply([Increment(ns + "h", {"n": 1}), PutBlob(ns + "b", b"y")])
        assert 98 <= client.ttl(ns + "h") <= 100
        assert client.ttl(ns + "b") == -1
    finally:
        store.client.close()


def test_redis_keys_expire(redis_url: str, ns: str) -> None:
    store = RedisStore(redis_url, timeout_s=2.0)
    try:
        store.apply([Increment(ns + "h", {"n": 1}, ttl=1)], once=ns + "ev", once_ttl=1)
        store.client.pexpire(ns + "h", 20)
        store.client.pexpire(ns + "ev", 20)
        time.sleep(0.05)
        assert store.read([HashRead(ns + "h")]) == [{}]
        assert store.apply([Increment(ns + "h", {"n": 1})], once=ns + "ev") is True
    finally:
        store.client.close()


# --- Redis unavailable -----------------------------------------------------------------------


def _timed(call) -> tuple[float, Exception | None]:
    started = time.perf_counter()
    try:
        call()
    except Exception as error:
        return time.perf_counter() - started, error
    return time.perf_counter() - started, None


def test_redis_down_raises_store_unavailable_fast() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", retry_after_s=30.0)
    elapsed, error = _timed(lambda: store.read([HashRead("h")]))
    assert isinstance(error, StoreUnavailable)
    assert elapsed < 0.5
    # within the retry-after window every call fails at once, without touching the network
    for call in (
        lambda: store.read([HashRead("h"), BlobRead("b")]),
        lambda: store.apply([Increment("h", {"n": 1})], once="ev"),
        lambda: store.pop_due("q", 1.0, 10),
    ):
        elapsed, error = _timed(call)
        assert isinstance(error, StoreUnavailable)
        assert "retrying shortly" in str(error)
        assert elapsed < 0.05
    assert store.ping() is False


def test_redis_store_recovers_after_the_retry_window(tmp_path) -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", retry_after_s=0.5)
    with pytest.raises(StoreUnavailable):
        store.apply([Increment("h", {"n": 1})])
    failed_at = time.monotonic()
    with RedisServer(port=port, workdir=tmp_path):
        if time.monotonic() - failed_at < 0.4:
            # still inside the window, though Redis is back: no attempt is made
            with pytest.raises(StoreUnavailable, match="retrying shortly"):
                store.read([HashRead("h")])
        deadline = time.monotonic() + 5.0
        while True:
            try:
                assert store.apply([Increment("h", {"n": 1})]) is True
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert store.read([HashRead("h")]) == [{"n": "1"}]
        assert store.ping() is True
        store.client.close()


def test_memory_and_redis_agree_on_float_sums(redis_url: str, ns: str) -> None:
    """Fractional increments may be spelled differently but are the same number."""
    memory = MemoryStore()
    redis_store = RedisStore(redis_url, timeout_s=2.0)
    try:
        amounts = [0.1, 0.2, 0.05 / math.sqrt(3), 1e-3, 7.0]
        answers = []
        for s in (memory, redis_store):
            s.apply([Increment(ns + "f", {"x": a}) for a in amounts])
            answers.append(float(s.read([HashRead(ns + "f")])[0]["x"]))
        assert answers[0] == pytest.approx(answers[1], rel=1e-14)
        assert answers[0] == pytest.approx(sum(amounts), rel=1e-14)
    finally:
        redis_store.client.close()


def test_apply_many_guards_each_batch_on_its_own(store, ns: str) -> None:
    batches = [
        Batch([Increment(f"{ns}i:a", {"clk": 1})], f"{ns}ev:1"),
        Batch([Increment(f"{ns}i:a", {"clk": 1})], f"{ns}ev:1"),  # the same event again
        Batch([Increment(f"{ns}i:b", {"clk": 1}), Increment(f"{ns}i:a", {"buy": 1})], f"{ns}ev:2"),
        Batch([Increment(f"{ns}i:b", {"clk": 1})]),  # unguarded
    ]
    assert store.apply_many(batches) == [True, False, True, True]
    a, b = store.read([HashRead(f"{ns}i:a"), HashRead(f"{ns}i:b")])
    assert float(a["clk"]) == 1.0 and float(a["buy"]) == 1.0
    assert float(b["clk"]) == 2.0
    assert store.apply_many(batches[:1]) == [False]
    assert store.apply_many([]) == []


def pair_writes(ns: str, ts: float) -> list:
    """An engagement's pairs: decayed increments that differ only in their key (one twice),
    between writes that must keep their order around them."""
    pair = {"floor": 0.01, "ttl": 600, "keep": 3}
    keys = [ns + "n:a", ns + "n:b", ns + "n:a", ns + "n:c"]
    return [
        Increment(ns + "n:a", {"x": 1}),
        *(DecayedIncrement(key, {"item": 2.0}, ts, HALF_LIFE, **pair) for key in keys),
        DecayedIncrement(ns + "n:b", {"other": 1.0}, ts, HALF_LIFE, **pair),
    ]


def test_runs_of_pair_writes_go_as_one_write_and_apply_alike(redis_url: str, ns: str) -> None:
    from engine.redis_store import _encode_write, _encode_writes

    writes = pair_writes(ns, 10.0)
    grouped, one_by_one = [], []
    _encode_writes(writes, "", grouped)
    for w in writes:
        _encode_write(w, w.key, one_by_one)
    assert grouped.count("n") == 1 and len(grouped) < len(one_by_one) - 20

    memory, on_redis = MemoryStore(), RedisStore(redis_url, timeout_s=2.0)
    try:
        answers = []
        for s in (memory, on_redis):
            # Later events rebase (ts past half_life / 8) and trim (keep=3): both must agree.
            for n, ts in enumerate((10.0, 11.0, 40.0, 200.0)):
                assert s.apply(pair_writes(ns, ts), once=f"{ns}ev{n}")
                assert not s.apply(pair_writes(ns, ts), once=f"{ns}ev{n}")  # redelivered
            answers.append([numeric(h) for h in s.read([HashRead(ns + f"n:{x}") for x in "abc"])])
        assert answers[1] == [pytest.approx(a, rel=1e-12) for a in answers[0]]
        assert on_redis.client.ttl(ns + "n:c") > 0  # each key of a run gets its TTL
    finally:
        on_redis.client.close()


def test_redis_apply_survives_a_flushed_script_cache(redis_url: str, ns: str) -> None:
    store = RedisStore(redis_url, timeout_s=2.0)
    try:
        store.client.script_flush()
        assert store.apply([Increment(ns + "h", {"n": 1})], once=ns + "ev") is True
        assert store.apply([Increment(ns + "h", {"n": 1})], once=ns + "ev") is False
        assert store.read([HashRead(ns + "h")]) == [{"n": "1"}]
    finally:
        store.client.close()


def test_a_batch_claiming_several_keys_applies_only_if_none_was_claimed(store, ns: str) -> None:
    page = [Increment(f"{ns}v", {"clicks": 1}), Increment(f"{ns}v", {"clicks": 1})]
    claims = (f"{ns}ev:1", f"{ns}ev:2")
    assert store.read([ExistsRead(claims), ExistsRead(())]) == [[False, False], []]
    assert store.apply_many([Batch(page, claims)]) == [True]
    assert store.read([ExistsRead((*claims, f"{ns}ev:3"))]) == [[True, True, False]]
    # One of the keys was claimed before: nothing of the batch applies, nothing is claimed.
    again = Batch(page, (f"{ns}ev:3", f"{ns}ev:2"))
    assert store.apply_many([again, Batch(page, (f"{ns}ev:4",))]) == [False, True]
    assert store.read([ExistsRead((f"{ns}ev:3",))]) == [[False]]
    (totals,) = store.read([HashRead(f"{ns}v")])
    assert float(totals["clicks"]) == 4.0


def test_merged_writes_change_what_the_writes_one_by_one_change(store, ns: str) -> None:
    def writes(ts: float) -> list:
        return [
            Increment(f"{ns}i:a", {"clk": 1}, ttl=600),
            DecayedIncrement(f"{ns}i:a", {"t|c": 1.0}, ts, HALF_LIFE, prefix="t|"),
            Increment(f"{ns}p", {"c1": 1}),
            Increment(f"{ns}i:a", {"clk": 1, "buy": 2}, ttl=600),
            # A write that rescales every field of its key: increments of that key after it
            # must stay after it.
            DecayedIncrement(f"{ns}u", {"e|k": 1.0}, ts, HALF_LIFE),
            Increment(f"{ns}u", {"e|k": 5}),
            Increment(f"{ns}p", {"c1": 1, "c2": 0.5}),
            SetFields(f"{ns}r", {"best": "2"}),
            Increment(f"{ns}i:a", {"clk": 1}, ttl=0),  # another TTL: not merged
        ]

    assert len(merged(writes(10.0))) == 8  # the two increments of p are one
    one_by_one, together = f"{ns}one:", f"{ns}all:"
    for ts in (10.0, 300.0):  # the second rebases the decayed counts
        for w in writes(ts):
            assert store.apply([_renamed(w, one_by_one)])
        assert store.apply(merged([_renamed(w, together) for w in writes(ts)]))
    keys = ["i:a", "p", "u", "r"]
    first = store.read([HashRead(one_by_one + ns + k) for k in keys])
    second = store.read([HashRead(together + ns + k) for k in keys])
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        assert all(float(a[f]) == pytest.approx(float(b[f]), rel=1e-12) for f in a), (a, b)


def _renamed(w, prefix: str):
    return dataclasses.replace(w, key=prefix + w.key)


def test_reads_go_through_a_busy_or_closed_connection(redis_url: str, ns: str) -> None:
    """The store's own connection is taken by another thread: a read takes one from the
    pool. Closed under it (``client.close()``): the next read connects again."""
    store = RedisStore(redis_url, timeout_s=2.0)
    try:
        store.apply([SetFields(f"{ns}h", {"a": "1"})])
        with store._own_lock:  # as another thread's round trip would hold it
            assert store.read([HashRead(f"{ns}h")]) == [{"a": "1"}]
        store.client.close()
        assert store.read([HashRead(f"{ns}h")]) == [{"a": "1"}]
    finally:
        store.client.close()


def test_read_then_answers_what_is_read_first_and_what_follows(store, ns: str) -> None:
    """The reads ``then`` returns are answered with the first ones; when it fails, its
    error comes out and the store reads on (on Redis, over a fresh connection)."""
    store.apply([SetFields(f"{ns}a", {"x": "1"}), PushRecent(f"{ns}r", "i\t1", 5)])

    def then() -> list:
        return [
            FieldsRead(f"{ns}a", ("x", "y")),
            RecentItemsRead(f"{ns}r", 5, 1, f"{ns}", ":n", ("x",)),
        ]

    expected = ([{"x": "1"}], [["1", None], (["i\t1"], {"i": ({}, [None])})])
    assert store.read_then([HashRead(f"{ns}a")], then) == expected
    assert store.read_then([HashRead(f"{ns}a")], list) == ([{"x": "1"}], [])
    if isinstance(store, RedisStore):
        store.client.script_flush()  # a restarted Redis: the script in `then` is reloaded
        assert store.read_then([HashRead(f"{ns}a")], then) == expected
    with pytest.raises(ZeroDivisionError):
        store.read_then([HashRead(f"{ns}a")], lambda: [1 / 0])
    # (A reply left unread would answer this instead.)
    assert store.read([ListRead(f"{ns}r", 5)]) == [["i\t1"]]
