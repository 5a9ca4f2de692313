"""Impressions awaiting clicks, and the labelled examples they turn into.

Every ranked result is remembered for ``window_s`` as an :class:`Impression`:
the items in the order shown and the features each had when it was ranked.
A click that names the ``request_id`` is joined to it, so the model learns from
what it saw when it decided, not from what the features became afterwards.

Labels follow the skip-above rule: a clicked item is a positive; items shown
above it and not clicked were seen and passed over, so they are negatives.
When the window closes, the unlabelled items in the top ``close_depth`` become
negatives too (an unclicked result page is a signal, but only near the top,
where the shopper looked).

>>> import numpy as np
>>> shown = Impression("r-1", "u-1", "", 0.0, ("a", "b", "c"), np.eye(3, 2))
>>> examples, labels = click_labels(shown, {}, position=2, event_ts=5.0)
>>> [(e.item_id, e.clicked) for e in examples]
[('b', True), ('a', False)]
>>> [(e.item_id, e.clicked) for e in close_labels(shown, labels, close_depth=3)]
[('c', False)]
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from engine.store import PutBlob, Schedule, SetFields, Write

DUE_KEY = "imp:due"


@dataclass(frozen=True, slots=True)
class ImpressionConfig:
    window_s: int = 1800
    # Positions a shopper plausibly sees: counted as impressions (with expected clicks) and
    # remembered with their features for labels. Lower items were most likely never seen;
    # counting them would dilute their CTR and cost Redis work on every request.
    depth: int = 20
    close_depth: int = 10
    # Offline replay of a log: the shopper saw the logged order, not ours, so impressions
    # (positions, expected clicks, skip-above labels) follow the input order.
    logged_order_shown: bool = False


def impression_key(request_id: str) -> str:
    return f"imp:{request_id}"


def labels_key(request_id: str) -> str:
    return f"lab:{request_id}"


@dataclass(frozen=True, slots=True)
class Impression:
    """A ranked result as shown: items top first and their feature rows at ranking time."""

    request_id: str
    user_id: str
    query: str
    ts: float
    item_ids: tuple[str, ...]
    features: np.ndarray
    variant: str = ""
    model_version: str = ""
    # Per item, for the deep model's embeddings: empty when the catalog did not say.
    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        """A JSON header and the float32 feature matrix: compact, and no pickle."""
        header = orjson.dumps(
            {
                "request_id": self.request_id,
                "user_id": self.user_id,
                "query": self.query,
                "ts": self.ts,
                "item_ids": self.item_ids,
                "shape": self.features.shape,
                "variant": self.variant,
                "model_version": self.model_version,
                "categories": self.categories,
                "brands": self.brands,
            }
        )
        matrix = np.ascontiguousarray(self.features, dtype="<f4").tobytes()
        return struct.pack("<I", len(header)) + header + matrix

    @classmethod
    def from_bytes(cls, blob: bytes) -> Impression:
        (size,) = struct.unpack_from("<I", blob)
        header = orjson.loads(blob[4 : 4 + size])
        rows, columns = header["shape"]
        features = np.frombuffer(blob, dtype="<f4", offset=4 + size, count=rows * columns)
        return cls(
            request_id=header["request_id"],
            user_id=header["user_id"],
            query=header["query"],
            ts=header["ts"],
            item_ids=tuple(header["item_ids"]),
            features=features.reshape(rows, columns).astype(np.float64),
            variant=header["variant"],
            model_version=header["model_version"],
            categories=tuple(header.get("categories", ())),
            brands=tuple(header.get("brands", ())),
        )

    def category_of(self, position: int) -> str:
        return self.categories[position - 1] if position <= len(self.categories) else ""

    def brand_of(self, position: int) -> str:
        return self.brands[position - 1] if position <= len(self.brands) else ""

    def position_of(self, item_id: str) -> int | None:
        """1-based position of an item in the remembered part of the result."""
        try:
            return self.item_ids.index(item_id) + 1
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class LabelledExample:
    """One training example for the CTR models: features at ranking time and the outcome.

    The online model learns from ``features`` alone; the deep model also embeds who
    (``user_id``), what (``item_id``, ``category``, ``brand``) and for which words
    (``query``).
    """

    request_id: str
    item_id: str
    position: int
    clicked: bool
    features: tuple[float, ...]
    ts: float
    user_id: str = ""
    query: str = ""
    category: str = ""
    brand: str = ""

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "item_id": self.item_id,
            "position": self.position,
            "clicked": self.clicked,
            "features": self.features,
            "ts": self.ts,
            "user_id": self.user_id,
            "query": self.query,
            "category": self.category,
            "brand": self.brand,
        }

    @classmethod
    def from_dict(cls, body: dict) -> LabelledExample:
        return cls(
            request_id=str(body["request_id"]),
            item_id=str(body["item_id"]),
            position=int(body["position"]),
            clicked=bool(body["clicked"]),
            features=tuple(map(float, body["features"])),
            ts=float(body["ts"]),
            user_id=str(body.get("user_id", "")),
            query=str(body.get("query", "")),
            category=str(body.get("category", "")),
            brand=str(body.get("brand", "")),
        )


def examples_message(sources: Sequence[tuple[str, Sequence[LabelledExample]]]) -> bytes:
    """One message to the learner for a batch of source events (each claimed once there).

    >>> example = LabelledExample("r-1", "i-1", 1, True, (0.5,), 9.0)
    >>> read_examples_message(examples_message([("e-1", [example])])) == [("e-1", [example])]
    True
    """
    body = {
        "sources": [
            {"source": source_id, "examples": [e.to_dict() for e in examples]}
            for source_id, examples in sources
        ]
    }
    return orjson.dumps(body)


# Examples go to the learner a few hundred to a message: decoding one holds its loop.
EXAMPLES_PER_MESSAGE = 500


def examples_messages(
    sources: Sequence[tuple[str, Sequence[LabelledExample]]],
    per_message: int = EXAMPLES_PER_MESSAGE,
) -> list[bytes]:
    """The learner's messages for ``sources``: consecutive runs of source events holding about
    ``per_message`` examples each (a source is never split: it is claimed whole).

    >>> example = LabelledExample("r-1", "i-1", 1, False, (0.5,), 9.0)
    >>> sources = [("a", [example] * 3), ("b", [example]), ("c", [example] * 2)]
    >>> messages = examples_messages(sources, per_message=3)
    >>> [[source for source, _ in read_examples_message(m)] for m in messages]
    [['a'], ['b', 'c']]
    """
    messages: list[bytes] = []
    chunk: list[tuple[str, Sequence[LabelledExample]]] = []
    count = 0
    for source in sources:
        chunk.append(source)
        count += len(source[1])
        if count >= per_message:
            messages.append(examples_message(chunk))
            chunk, count = [], 0
    if chunk:
        messages.append(examples_message(chunk))
    return messages


def read_examples_message(raw: bytes) -> list[tuple[str, list[LabelledExample]]]:
    """The sources of an :func:`examples_message`, in order."""
    return [
        (entry["source"], [LabelledExample.from_dict(e) for e in entry["examples"]])
        for entry in orjson.loads(raw)["sources"]
    ]


def impression_writes(impression: Impression, config: ImpressionConfig) -> list[Write]:
    """Remember the impression and schedule the close of its window."""
    # Kept a little past the window so that the window's close can still read it.
    ttl = config.window_s + 300
    return [
        PutBlob(impression_key(impression.request_id), impression.to_bytes(), ttl),
        Schedule(DUE_KEY, impression.request_id, impression.ts + config.window_s),
    ]


def _example(impression: Impression, position: int, clicked: bool, ts: float) -> LabelledExample:
    return LabelledExample(
        request_id=impression.request_id,
        item_id=impression.item_ids[position - 1],
        position=position,
        clicked=clicked,
        features=tuple(impression.features[position - 1].tolist()),
        ts=ts,
        user_id=impression.user_id,
        query=impression.query,
        category=impression.category_of(position),
        brand=impression.brand_of(position),
    )


def click_labels(
    impression: Impression, labels: dict[str, str], position: int, event_ts: float
) -> tuple[list[LabelledExample], dict[str, str]]:
    """Examples from a click at ``position``: the click, then unlabelled items above it.

    ``labels`` maps positions already labelled to ``"+"`` or ``"-"``; the second
    value returned is what to add to it. A click on an item labelled negative
    earlier (the shopper came back to it) is still learned as a positive.
    """
    if not 1 <= position <= len(impression.item_ids) or labels.get(str(position)) == "+":
        return [], {}
    examples = [_example(impression, position, True, event_ts)]
    new_labels = {str(position): "+"}
    for above in range(1, position):
        if str(above) not in labels:
            examples.append(_example(impression, above, False, event_ts))
            new_labels[str(above)] = "-"
    return examples, new_labels


def close_labels(
    impression: Impression, labels: dict[str, str], close_depth: int
) -> list[LabelledExample]:
    """Negatives for the unlabelled items in the top ``close_depth`` when the window closes."""
    depth = min(close_depth, len(impression.item_ids))
    return [
        _example(impression, p, False, impression.ts)
        for p in range(1, depth + 1)
        if str(p) not in labels
    ]


def label_writes(request_id: str, new_labels: dict[str, str], config: ImpressionConfig) -> Write:
    return SetFields(labels_key(request_id), new_labels, config.window_s + 300)
