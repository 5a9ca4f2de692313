"""Parsing and validation of the contract's messages (engine.messages)."""

from __future__ import annotations

import dataclasses
import time

import orjson
import pytest

from engine.messages import (
    DEFAULT_LIMITS,
    Candidate,
    CatalogItem,
    Interaction,
    InvalidMessage,
    Limits,
    RankedItem,
    RankedResult,
    dead_letter,
    parse_catalog_item,
    parse_interaction,
    parse_search_request,
)

NOW = 1764300000.0


def _request(**fields: object) -> bytes:
    body: dict[str, object] = {
        "request_id": "r-1",
        "user_id": "u-42",
        "candidates": [{"item_id": "i-7", "score": 12.3}, {"item_id": "i-9"}],
    }
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


def _interaction(**fields: object) -> bytes:
    body: dict[str, object] = {
        "event_id": "e-1",
        "user_id": "u-42",
        "item_id": "i-9",
        "type": "click",
    }
    body.update(fields)
    return orjson.dumps({k: v for k, v in body.items() if v is not _DROP})


_DROP = object()


def _rejects(parse, raw: bytes, field: str, **kwargs: object) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        parse(raw, **kwargs)
    error = caught.value
    assert error.field == field, str(error)
    assert str(error).startswith(f"{field}: ")
    assert error.reason and str(error) == f"{field}: {error.reason}"
    return error


# --- search requests -------------------------------------------------------------------------


def test_request_full_example_from_the_contract() -> None:
    raw = (
        b'{"request_id": "r-1", "user_id": "u-42", "query": "running shoes",'
        b' "candidates": [{"item_id": "i-7", "score": 12.3}, {"item_id": "i-9"}],'
        b' "k": 10, "ts": 1764300000.0, "context": {"device": "mobile"}, "explain": false}'
    )
    request = parse_search_request(raw, now=5.0)
    assert request.request_id == "r-1"
    assert request.user_id == "u-42"
    assert request.query == "running shoes"
    assert request.candidates == (Candidate("i-7", 12.3), Candidate("i-9", None))
    assert request.k == 10
    assert request.ts == 1764300000.0
    assert request.context == {"device": "mobile"}
    assert request.explain is False


def test_request_defaults() -> None:
    request = parse_search_request(_request(), now=NOW)
    assert request.query == ""
    assert request.k is None
    assert request.ts == NOW
    assert request.context == {}
    assert request.explain is False
    # null means "absent" for the optional fields
    request = parse_search_request(_request(query=None, k=None, context=None), now=NOW)
    assert (request.query, request.k, request.context) == ("", None, {})


def test_request_ts_defaults_to_the_clock_without_now() -> None:
    before = time.time()
    request = parse_search_request(_request())
    assert before <= request.ts <= time.time()


def test_request_integer_score_and_ts_become_floats() -> None:
    request = parse_search_request(
        _request(candidates=[{"item_id": "a", "score": 3}], ts=17, explain=True), now=NOW
    )
    assert request.candidates[0].score == 3.0
    assert isinstance(request.candidates[0].score, float)
    assert request.ts == 17.0
    assert request.explain is True


def test_request_accepts_exactly_the_limits() -> None:
    limits = Limits(max_candidates=3, max_id_length=4)
    raw = _request(
        request_id="r123", candidates=[{"item_id": f"i{n}"} for n in range(3)], user_id="u"
    )
    request = parse_search_request(raw, limits, now=NOW)
    assert [c.item_id for c in request.candidates] == ["i0", "i1", "i2"]


_ONE = b'{"request_id": "r", "user_id": "u", "candidates": [{"item_id": "a", "score": %s}]}'


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"",
        b'{"request_id": "r-1",',
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b"null",
        _ONE % b"NaN",
        _ONE % b"Infinity",
        _ONE % b"-Infinity",
        _ONE % b"1e400",
        _ONE % b'1.0, "ts": -1e400',
    ],
)
def test_request_payload_errors(raw: bytes) -> None:
    _rejects(parse_search_request, raw, "payload")


def test_request_not_json_names_payload_and_says_so() -> None:
    error = _rejects(parse_search_request, b"{nope", "payload")
    assert error.reason.startswith("not valid JSON")
    error = _rejects(parse_search_request, b"[]", "payload")
    assert error.reason == "must be a JSON object"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"request_id": _DROP}, "request_id"),
        ({"request_id": None}, "request_id"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": 7}, "request_id"),
        ({"user_id": _DROP}, "user_id"),
        ({"user_id": ["u"]}, "user_id"),
        ({"candidates": _DROP}, "candidates"),
        ({"candidates": []}, "candidates"),
        ({"candidates": {"item_id": "a"}}, "candidates"),
        ({"candidates": "a,b"}, "candidates"),
        ({"candidates": [{"item_id": "a"}, "b"]}, "candidates[1]"),
        ({"candidates": [["a"]]}, "candidates[0]"),
        ({"candidates": [{"score": 1.0}]}, "candidates[0].item_id"),
        ({"candidates": [{"item_id": "a"}, {"item_id": 5}]}, "candidates[1].item_id"),
        ({"candidates": [{"item_id": "a"}, {"item_id": "a"}]}, "candidates[1].item_id"),
        ({"candidates": [{"item_id": "a", "score": "1.5"}]}, "candidates[0].score"),
        ({"candidates": [{"item_id": "a", "score": True}]}, "candidates[0].score"),
        ({"candidates": [{"item_id": "a"}, {"item_id": "b", "score": [1]}]},
         "candidates[1].score"),
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": True}, "k"),
        ({"k": 2.0}, "k"),
        ({"k": 2.5}, "k"),
        ({"k": "10"}, "k"),
        ({"explain": "true"}, "explain"),
        ({"explain": 1}, "explain"),
        ({"context": ["device"]}, "context"),
        ({"context": "mobile"}, "context"),
        ({"query": 12}, "query"),
        ({"ts": "yesterday"}, "ts"),
        ({"ts": -1.0}, "ts"),
        ({"ts": False}, "ts"),
    ],
)  # fmt: skip
def test_request_rejections_name_the_field(fields: dict, field: str) -> None:
    _rejects(parse_search_request, _request(**fields), field, now=NOW)


def test_request_duplicate_item_id_is_named() -> None:
    raw = _request(candidates=[{"item_id": "a"}, {"item_id": "b"}, {"item_id": "a"}])
    error = _rejects(parse_search_request, raw, "candidates[2].item_id")
    assert "'a'" in error.reason


def test_request_empty_candidates_message() -> None:
    error = _rejects(parse_search_request, _request(candidates=[]), "candidates")
    assert str(error) == "candidates: must be a non-empty list"


def test_request_too_many_candidates() -> None:
    n = DEFAULT_LIMITS.max_candidates
    ok = _request(candidates=[{"item_id": f"i{i}"} for i in range(n)])
    assert len(parse_search_request(ok, now=NOW).candidates) == n
    too_many = _request(candidates=[{"item_id": f"i{i}"} for i in range(n + 1)])
    error = _rejects(parse_search_request, too_many, "candidates")
    assert str(n + 1) in error.reason and str(n) in error.reason


def test_request_too_many_candidates_custom_limit() -> None:
    raw = _request(candidates=[{"item_id": "a"}, {"item_id": "b"}, {"item_id": "c"}])
    _rejects(parse_search_request, raw, "candidates", limits=Limits(max_candidates=2))


def test_oversized_payload_is_rejected_before_parsing() -> None:
    limits = Limits(max_message_bytes=100)
    raw = _request(query="x" * 40)
    assert len(raw) > 100
    error = _rejects(parse_search_request, raw, "payload", limits=limits)
    assert str(len(raw)) in error.reason
    # garbage that is too large is still a size error, not a JSON error
    _rejects(parse_search_request, b"x" * 101, "payload", limits=limits)
    assert "bytes" in _rejects(parse_search_request, b"x" * 101, "payload", limits=limits).reason
    big = b" " * (DEFAULT_LIMITS.max_message_bytes + 1)
    assert "more than" in _rejects(parse_search_request, big, "payload").reason


def test_payload_at_the_size_limit_is_accepted() -> None:
    raw = _request()
    request = parse_search_request(raw, Limits(max_message_bytes=len(raw)), now=NOW)
    assert request.request_id == "r-1"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"request_id": "r" * 257}, "request_id"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"candidates": [{"item_id": "i" * 257}]}, "candidates[0].item_id"),
        ({"query": "q" * 2049}, "query"),
        ({"context": {f"k{i}": i for i in range(33)}}, "context"),
    ],
)
def test_request_lengths(fields: dict, field: str) -> None:
    _rejects(parse_search_request, _request(**fields), field)


def test_request_lengths_at_the_limit_are_accepted() -> None:
    raw = _request(
        request_id="r" * 256,
        query="q" * 2048,
        context={f"k{i}": i for i in range(32)},
        candidates=[{"item_id": "i" * 256}],
    )
    request = parse_search_request(raw, now=NOW)
    assert len(request.request_id) == 256 and len(request.query) == 2048
    assert len(request.context) == 32


# --- interactions ----------------------------------------------------------------------------


def test_interaction_full_example() -> None:
    raw = (
        b'{"event_id": "e-1", "user_id": "u-42", "item_id": "i-9", "type": "click",'
        b' "request_id": "r-1", "position": 1, "ts": 1764300003.2, "value": 59.9}'
    )
    assert parse_interaction(raw, now=1.0) == Interaction(
        event_id="e-1",
        user_id="u-42",
        item_id="i-9",
        type="click",
        ts=1764300003.2,
        request_id="r-1",
        position=1,
        value=59.9,
    )


def test_interaction_defaults() -> None:
    interaction = parse_interaction(_interaction(), now=NOW)
    assert interaction == Interaction("e-1", "u-42", "i-9", "click", NOW)
    assert interaction.request_id is None
    assert interaction.position is None
    assert interaction.value is None


@pytest.mark.parametrize("kind", ["click", "add_to_cart", "purchase"])
def test_interaction_types(kind: str) -> None:
    assert parse_interaction(_interaction(type=kind), now=NOW).type == kind


def test_interaction_value_zero_and_int() -> None:
    assert parse_interaction(_interaction(value=0), now=NOW).value == 0.0
    assert parse_interaction(_interaction(value=12), now=NOW).value == 12.0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "view"}, "type"),
        ({"type": _DROP}, "type"),
        ({"type": "Click"}, "type"),
        ({"event_id": _DROP}, "event_id"),
        ({"event_id": ""}, "event_id"),
        ({"user_id": 42}, "user_id"),
        ({"item_id": _DROP}, "item_id"),
        ({"item_id": "i" * 257}, "item_id"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": 3}, "request_id"),
        ({"position": 0}, "position"),
        ({"position": -1}, "position"),
        ({"position": 1.0}, "position"),
        ({"position": True}, "position"),
        ({"position": "1"}, "position"),
        ({"value": -0.01}, "value"),
        ({"value": "59.9"}, "value"),
        ({"ts": -5}, "ts"),
    ],
)
def test_interaction_rejections_name_the_field(fields: dict, field: str) -> None:
    _rejects(parse_interaction, _interaction(**fields), field, now=NOW)


def test_interaction_type_reason_lists_the_allowed_types() -> None:
    error = _rejects(parse_interaction, _interaction(type="view"), "type")
    assert error.reason == "must be one of click, add_to_cart, purchase"


def test_interaction_payload_errors() -> None:
    _rejects(parse_interaction, b"[]", "payload")
    _rejects(parse_interaction, b'{"value": NaN}', "payload")
    _rejects(parse_interaction, b"x" * 30, "payload", limits=Limits(max_message_bytes=20))


# --- catalog ---------------------------------------------------------------------------------


def test_catalog_full_and_defaults() -> None:
    raw = (
        b'{"item_id": "i-9", "category": "shoes/running", "brand": "acme", "price": 59.9,'
        b' "title": "Trail runner", "available": false}'
    )
    assert parse_catalog_item(raw) == CatalogItem(
        "i-9", "shoes/running", "acme", 59.9, "Trail runner", False
    )
    assert parse_catalog_item(b'{"item_id": "i-1"}') == CatalogItem("i-1")
    assert parse_catalog_item(b'{"item_id": "i-1", "price": 0}').price == 0.0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"category": "x"}', "item_id"),
        (b'{"item_id": "i", "price": -1}', "price"),
        (b'{"item_id": "i", "price": "9.99"}', "price"),
        (b'{"item_id": "i", "available": "yes"}', "available"),
        (b'{"item_id": "i", "available": 1}', "available"),
        (b'{"item_id": "i", "category": 5}', "category"),
        (b'{"item_id": "i", "brand": ["a"]}', "brand"),
        (b'{"item_id": "i", "title": {}}', "title"),
        (b'"i"', "payload"),
    ],
)
def test_catalog_rejections(raw: bytes, field: str) -> None:
    _rejects(parse_catalog_item, raw, field)


def test_catalog_title_length() -> None:
    raw = orjson.dumps({"item_id": "i", "title": "t" * 11})
    _rejects(parse_catalog_item, raw, "title", limits=Limits(max_text_length=10))


# --- dead letters and results ----------------------------------------------------------------


def test_dead_letter_fields() -> None:
    before = time.time()
    body = orjson.loads(dead_letter("search-requests", "candidates: bad", b'{"a": 1}'))
    assert set(body) == {"topic", "error", "payload", "ts"}
    assert body["topic"] == "search-requests"
    assert body["error"] == "candidates: bad"
    assert body["payload"] == '{"a": 1}'
    assert before <= body["ts"] <= time.time()


def test_dead_letter_truncates_and_survives_bad_utf8() -> None:
    body = orjson.loads(dead_letter("interactions", "payload: x", b"a" * 5000))
    assert body["payload"] == "a" * 4096
    body = orjson.loads(dead_letter("interactions", "payload: x", b"abcdef", limit=3))
    assert body["payload"] == "abc"
    # a cut through a multi-byte character, and bytes that are not UTF-8 at all
    body = orjson.loads(dead_letter("catalog", "e", "é".encode() * 3, limit=3))
    assert body["payload"] == "é\ufffd"
    body = orjson.loads(dead_letter("catalog", "e", b"\xff\xfeok"))
    assert body["payload"] == "\ufffd\ufffdok"


def test_ranked_result_to_json_round_trip() -> None:
    result = RankedResult(
        request_id="r-1",
        user_id="u-42",
        items=(
            RankedItem("i-9", 0.031, 1, {"item_ctr_logit": -1.5, "ctr": 0.031}),
            RankedItem("i-7", 0.012, 2),
        ),
        variant="personalized",
        model_version="online:3",
        degraded=False,
        latency_ms=1.23456,
    )
    body = orjson.loads(result.to_json())
    assert body == {
        "request_id": "r-1",
        "user_id": "u-42",
        "items": [
            {
                "item_id": "i-9",
                "score": 0.031,
                "rank": 1,
                "explain": {"item_ctr_logit": -1.5, "ctr": 0.031},
            },
            {"item_id": "i-7", "score": 0.012, "rank": 2},
        ],
        "variant": "personalized",
        "model_version": "online:3",
        "degraded": False,
        "latency_ms": 1.235,
    }
    rebuilt = RankedResult(
        request_id=body["request_id"],
        user_id=body["user_id"],
        items=tuple(
            RankedItem(e["item_id"], e["score"], e["rank"], e.get("explain")) for e in body["items"]
        ),
        variant=body["variant"],
        model_version=body["model_version"],
        degraded=body["degraded"],
        latency_ms=body["latency_ms"],
    )
    assert rebuilt == RankedResult(**{**_fields(result), "latency_ms": 1.235})


def _fields(result: RankedResult) -> dict:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
