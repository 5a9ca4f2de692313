"""The messages of the public contract, parsed and validated into typed objects.

Every input crosses :func:`parse_search_request`, :func:`parse_interaction` or
:func:`parse_catalog_item` before anything else sees it. Anything that does not
fit the contract raises :class:`InvalidMessage`, whose text names the field, so
that the stream layer can send it to ``dead-letters`` and carry on.

>>> request = parse_search_request(
...     b'{"request_id": "r-1", "user_id": "u-42", "candidates": [{"item_id": "i-7"}]}',
...     now=1764300000.0,
... )
>>> request.candidates[0].item_id, request.ts
('i-7', 1764300000.0)
>>> parse_search_request(b'{"request_id": "r-1", "user_id": "u-42", "candidates": []}')
Traceback (most recent call last):
...
engine.messages.InvalidMessage: candidates: must be a non-empty list

A recommendation request (an extension of the contract) has no candidates but
``"recommend": true`` and a ``k``: the ranker finds the candidates itself.

>>> request = parse_search_request(
...     b'{"request_id": "r-2", "user_id": "u-42", "recommend": true, "k": 5}', now=1.0
... )
>>> request.recommend, request.k, request.candidates
(True, 5, ())
>>> parse_search_request(b'{"request_id": "r-2", "user_id": "u-42", "recommend": true}')
Traceback (most recent call last):
...
engine.messages.InvalidMessage: k: required when recommend is true
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

InteractionType = Literal["click", "add_to_cart", "purchase"]
INTERACTION_TYPES: tuple[InteractionType, ...] = ("click", "add_to_cart", "purchase")


class InvalidMessage(ValueError):
    """A message that breaks the contract; ``str()`` reads ``"<field>: <reason>"``."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one message may carry (oversized input is rejected, not truncated)."""

    max_message_bytes: int = 1_000_000
    max_candidates: int = 1000
    max_id_length: int = 256
    max_text_length: int = 2048
    max_context_keys: int = 32


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Candidate:
    """One retrieved item: its id and the retrieval score, when the search layer has one."""

    item_id: str
    score: float | None = None


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """Candidates retrieved for a user's query, to be re-ranked."""

    request_id: str
    user_id: str
    candidates: tuple[Candidate, ...]
    query: str = ""
    k: int | None = None
    ts: float = 0.0
    context: dict[str, Any] = field(default_factory=dict)
    explain: bool = False
    # No candidates: the ranker recommends the top ``k`` items for the user.
    recommend: bool = False


@dataclass(frozen=True, slots=True)
class Interaction:
    """A shopper's click, add-to-cart or purchase, tied to a ranked result when it came from one."""

    event_id: str
    user_id: str
    item_id: str
    type: InteractionType
    ts: float
    request_id: str | None = None
    position: int | None = None
    value: float | None = None


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """Item attributes from the catalog feed."""

    item_id: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    title: str | None = None
    available: bool = True


class RankedItem(NamedTuple):
    """One item of a ranked result (a tuple: a hundred are made for every request)."""

    item_id: str
    score: float
    rank: int
    explain: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class RankedResult:
    """The answer to a :class:`SearchRequest`: every candidate once (or the top ``k``)."""

    request_id: str
    user_id: str
    items: tuple[RankedItem, ...]
    variant: str
    model_version: str
    degraded: bool
    latency_ms: float = 0.0

    def to_json(self) -> bytes:
        items = []
        for item in self.items:
            entry: dict[str, Any] = {
                "item_id": item.item_id,
                "score": item.score,
                "rank": item.rank,
            }
            if item.explain is not None:
                entry["explain"] = item.explain
            items.append(entry)
        return orjson.dumps(
            {
                "request_id": self.request_id,
                "user_id": self.user_id,
                "items": items,
                "variant": self.variant,
                "model_version": self.model_version,
                "degraded": self.degraded,
                "latency_ms": round(self.latency_ms, 3),
            }
        )


def dead_letter(topic: str, error: str, payload: bytes, *, limit: int = 4096) -> bytes:
    """The dead-letter message for a rejected input (payload kept as text, truncated)."""
    text = payload[:limit].decode("utf-8", errors="replace")
    return orjson.dumps({"topic": topic, "error": error, "payload": text, "ts": time.time()})


# --- parsing ---------------------------------------------------------------------------------


def parse_search_request(
    raw: bytes, limits: Limits = DEFAULT_LIMITS, now: float | None = None
) -> SearchRequest:
    """Parse a search request; raise :class:`InvalidMessage` naming the offending field."""
    body = _load_object(raw, limits)
    recommend = body.get("recommend", False)
    if not isinstance(recommend, bool):
        raise InvalidMessage("recommend", "must be true or false")
    raw_candidates = body.get("candidates")
    if recommend:
        if raw_candidates not in (None, []):
            raise InvalidMessage("candidates", "must be empty or absent when recommend is true")
        if body.get("k") is None:
            raise InvalidMessage("k", "required when recommend is true")
        raw_candidates = []
    elif not isinstance(raw_candidates, list) or not raw_candidates:
        raise InvalidMessage("candidates", "must be a non-empty list")
    if len(raw_candidates) > limits.max_candidates:
        raise InvalidMessage(
            "candidates", f"{len(raw_candidates)} candidates, more than {limits.max_candidates}"
        )
    candidates = []
    seen: set[str] = set()
    max_id_length = limits.max_id_length
    for i, raw_candidate in enumerate(raw_candidates):
        # The common case checked in one line; anything else takes the checks below, which
        # name what is wrong.
        if type(raw_candidate) is dict:
            item_id, score = raw_candidate.get("item_id"), raw_candidate.get("score")
            if (
                type(item_id) is str
                and 0 < len(item_id) <= max_id_length
                and item_id not in seen
                and (score is None or (type(score) in (float, int) and math.isfinite(score)))
            ):
                seen.add(item_id)
                candidates.append(Candidate(item_id, None if score is None else float(score)))
                continue
        where = f"candidates[{i}]"
        if not isinstance(raw_candidate, dict):
            raise InvalidMessage(where, "must be an object")
        item_id = _id(raw_candidate, "item_id", limits, where + ".")
        if item_id in seen:
            raise InvalidMessage(where + ".item_id", f"duplicate item id {item_id!r}")
        seen.add(item_id)
        score = _number(raw_candidate, "score", where + ".", required=False)
        candidates.append(Candidate(item_id, score))
    k = body.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise InvalidMessage("k", "must be a positive integer")
    if recommend and k > limits.max_candidates:
        raise InvalidMessage("k", f"at most {limits.max_candidates} when recommend is true")
    context = body.get("context", {})
    if context is None:
        context = {}
    if not isinstance(context, dict) or len(context) > limits.max_context_keys:
        raise InvalidMessage(
            "context", f"must be an object of at most {limits.max_context_keys} keys"
        )
    explain = body.get("explain", False)
    if not isinstance(explain, bool):
        raise InvalidMessage("explain", "must be true or false")
    return SearchRequest(
        request_id=_id(body, "request_id", limits),
        user_id=_id(body, "user_id", limits),
        candidates=tuple(candidates),
        query=_text(body, "query", limits) or "",
        k=k,
        ts=_timestamp(body, now),
        context=context,
        explain=explain,
        recommend=recommend,
    )


def parse_interaction(
    raw: bytes, limits: Limits = DEFAULT_LIMITS, now: float | None = None
) -> Interaction:
    """Parse a click, add-to-cart or purchase."""
    body = _load_object(raw, limits)
    kind = body.get("type")
    if kind not in INTERACTION_TYPES:
        raise InvalidMessage("type", f"must be one of {', '.join(INTERACTION_TYPES)}")
    position = body.get("position")
    if position is not None and (
        not isinstance(position, int) or isinstance(position, bool) or position < 1
    ):
        raise InvalidMessage("position", "must be a positive integer (1 = top)")
    value = _number(body, "value", required=False)
    if value is not None and value < 0:
        raise InvalidMessage("value", "must not be negative")
    request_id = body.get("request_id")
    return Interaction(
        event_id=_id(body, "event_id", limits),
        user_id=_id(body, "user_id", limits),
        item_id=_id(body, "item_id", limits),
        type=kind,
        ts=_timestamp(body, now),
        request_id=None if request_id is None else _id(body, "request_id", limits),
        position=position,
        value=value,
    )


def parse_catalog_item(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> CatalogItem:
    """Parse a catalog update."""
    body = _load_object(raw, limits)
    price = _number(body, "price", required=False)
    if price is not None and price < 0:
        raise InvalidMessage("price", "must not be negative")
    available = body.get("available", True)
    if not isinstance(available, bool):
        raise InvalidMessage("available", "must be true or false")
    return CatalogItem(
        item_id=_id(body, "item_id", limits),
        category=_text(body, "category", limits),
        brand=_text(body, "brand", limits),
        price=price,
        title=_text(body, "title", limits),
        available=available,
    )


def _load_object(raw: bytes, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_message_bytes:
        raise InvalidMessage("payload", f"{len(raw)} bytes, more than {limits.max_message_bytes}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidMessage("payload", f"not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise InvalidMessage("payload", "must be a JSON object")
    return body


def _id(body: dict[str, Any], name: str, limits: Limits, where: str = "") -> str:
    value = body.get(name)
    if value is None:
        raise InvalidMessage(where + name, "is required")
    if not isinstance(value, str) or not value:
        raise InvalidMessage(where + name, "must be a non-empty string")
    if len(value) > limits.max_id_length:
        raise InvalidMessage(where + name, f"longer than {limits.max_id_length} characters")
    return value


def _text(body: dict[str, Any], name: str, limits: Limits) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessage(name, "must be a string")
    if len(value) > limits.max_text_length:
        raise InvalidMessage(name, f"longer than {limits.max_text_length} characters")
    return value


def _number(body: dict[str, Any], name: str, where: str = "", *, required: bool) -> float | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidMessage(where + name, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(where + name, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidMessage(where + name, "must be a finite number")
    return value


def _timestamp(body: dict[str, Any], now: float | None) -> float:
    ts = _number(body, "ts", required=False)
    if ts is None:
        return time.time() if now is None else now
    if ts < 0:
        raise InvalidMessage("ts", "must be epoch seconds, not negative")
    return ts
