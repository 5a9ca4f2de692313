"""Impressions, their compact encoding, and the labels clicks and closed windows give."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from engine.impressions import (
    DUE_KEY,
    Impression,
    ImpressionConfig,
    LabelledExample,
    click_labels,
    close_labels,
    impression_key,
    impression_writes,
    label_writes,
    labels_key,
)
from engine.store import PutBlob, Schedule, SetFields


def shown(n: int = 5, ts: float = 100.0) -> Impression:
    """n items "a", "b", ... whose feature rows are [p, 10 p, 0.1] for position p."""
    features = np.array([[p, 10.0 * p, 0.1] for p in range(1, n + 1)])
    ids = tuple(chr(ord("a") + i) for i in range(n))
    return Impression("r-1", "u-1", "shoes", ts, ids, features, "personalized", "online:3")


def summary(examples: list[LabelledExample]) -> list[tuple[str, int, bool]]:
    return [(e.item_id, e.position, e.clicked) for e in examples]


def test_keys() -> None:
    assert impression_key("r-1") == "imp:r-1"
    assert labels_key("r-1") == "lab:r-1"
    assert DUE_KEY == "imp:due"


def test_round_trip_keeps_everything_at_float32_precision() -> None:
    rng = np.random.default_rng(7)
    features = rng.normal(size=(4, 18)) * 1000
    impression = Impression("r-9", "u-é", "Running shoes", 1764300000.25, tuple("wxyz"), features)
    back = Impression.from_bytes(impression.to_bytes())
    assert back.request_id == "r-9"
    assert back.user_id == "u-é"
    assert back.query == "Running shoes"
    assert back.ts == 1764300000.25
    assert back.item_ids == ("w", "x", "y", "z")
    assert back.variant == "" and back.model_version == ""
    assert back.features.dtype == np.float64
    assert back.features.shape == (4, 18)
    np.testing.assert_array_equal(back.features, features.astype(np.float32).astype(np.float64))
    assert np.abs(back.features - features).max() <= 1e-6 * np.abs(features).max()
    assert not np.array_equal(back.features, features)  # it really is float32


def test_round_trip_variant_model_and_size() -> None:
    impression = shown()
    blob = impression.to_bytes()
    back = Impression.from_bytes(blob)
    assert (back.variant, back.model_version) == ("personalized", "online:3")
    np.testing.assert_array_equal(back.features, impression.features.astype(np.float32))
    header_size = int.from_bytes(blob[:4], "little")
    assert orjson.loads(blob[4 : 4 + header_size])["shape"] == [5, 3]
    assert len(blob) == 4 + header_size + 5 * 3 * 4


def test_round_trip_of_an_empty_matrix() -> None:
    impression = Impression("r", "u", "", 0.0, (), np.zeros((0, 18)))
    back = Impression.from_bytes(impression.to_bytes())
    assert back.item_ids == ()
    assert back.features.shape == (0, 18)


def test_position_of() -> None:
    impression = shown(3)
    assert [impression.position_of(i) for i in ("a", "b", "c", "zz")] == [1, 2, 3, None]


def test_click_applies_skip_above() -> None:
    impression = shown()
    examples, labels = click_labels(impression, {}, position=3, event_ts=150.0)
    assert summary(examples) == [("c", 3, True), ("a", 1, False), ("b", 2, False)]
    assert labels == {"3": "+", "1": "-", "2": "-"}
    assert examples[0].features == (3.0, 30.0, pytest.approx(0.1))
    assert examples[1].features == (1.0, 10.0, pytest.approx(0.1))
    assert all(e.ts == 150.0 and e.request_id == "r-1" for e in examples)


def test_click_at_the_top_has_no_negatives() -> None:
    examples, labels = click_labels(shown(), {}, position=1, event_ts=1.0)
    assert summary(examples) == [("a", 1, True)]
    assert labels == {"1": "+"}


def test_second_click_above_the_first() -> None:
    impression = shown()
    labels: dict[str, str] = {}
    _, new = click_labels(impression, labels, position=4, event_ts=1.0)
    labels.update(new)
    assert labels == {"4": "+", "1": "-", "2": "-", "3": "-"}
    # the shopper comes back to position 2: it was a negative, it is learned as a positive,
    # and nothing above it is labelled again
    examples, new = click_labels(impression, labels, position=2, event_ts=2.0)
    assert summary(examples) == [("b", 2, True)]
    assert new == {"2": "+"}
    labels.update(new)
    # a click below the first labels only the unlabelled rows above it
    examples, new = click_labels(impression, labels, position=5, event_ts=3.0)
    assert summary(examples) == [("e", 5, True)]
    assert new == {"5": "+"}


def test_second_click_below_labels_the_gap() -> None:
    labels = {"2": "+", "1": "-"}
    examples, new = click_labels(shown(), labels, position=4, event_ts=3.0)
    assert summary(examples) == [("d", 4, True), ("c", 3, False)]
    assert new == {"4": "+", "3": "-"}


def test_reclick_of_a_positive_yields_nothing() -> None:
    examples, new = click_labels(shown(), {"3": "+", "1": "-", "2": "-"}, 3, 9.0)
    assert (examples, new) == ([], {})


@pytest.mark.parametrize("position", [0, -1, 6, 100])
def test_click_outside_the_impression_yields_nothing(position: int) -> None:
    assert click_labels(shown(5), {}, position, 1.0) == ([], {})


def test_close_labels_depth() -> None:
    impression = shown(5)
    assert summary(close_labels(impression, {}, close_depth=3)) == [
        ("a", 1, False),
        ("b", 2, False),
        ("c", 3, False),
    ]
    labels = {"2": "+", "1": "-"}
    assert summary(close_labels(impression, labels, close_depth=4)) == [
        ("c", 3, False),
        ("d", 4, False),
    ]
    assert summary(close_labels(impression, labels, close_depth=50)) == [
        ("c", 3, False),
        ("d", 4, False),
        ("e", 5, False),
    ]
    assert close_labels(impression, {}, close_depth=0) == []
    examples = close_labels(impression, {}, close_depth=1)
    assert examples[0].ts == 100.0  # negatives at close carry the impression's time
    assert examples[0].features == (1.0, 10.0, pytest.approx(0.1))


def test_labelled_example_dict_round_trip() -> None:
    example = LabelledExample(
        "r-1", "i-9", 3, True, (0.5, -1.25, 3.0), 1764300003.2, "u-1", "red shoes", "shoes", "acme"
    )
    body = example.to_dict()
    assert body == {
        "request_id": "r-1",
        "item_id": "i-9",
        "position": 3,
        "clicked": True,
        "features": (0.5, -1.25, 3.0),
        "ts": 1764300003.2,
        "user_id": "u-1",
        "query": "red shoes",
        "category": "shoes",
        "brand": "acme",
    }
    assert LabelledExample.from_dict(body) == example
    assert LabelledExample.from_dict(orjson.loads(orjson.dumps(body))) == example


def test_labelled_example_from_loose_json() -> None:
    body = {
        "request_id": 7,
        "item_id": "i",
        "position": "2",
        "clicked": 0,
        "features": [1, "2.5"],
        "ts": 3,
    }
    example = LabelledExample.from_dict(body)  # ids for the deep model missing: empty
    assert example == LabelledExample("7", "i", 2, False, (1.0, 2.5), 3.0)
    assert isinstance(example.features[0], float)


def test_impression_and_label_writes() -> None:
    impression = shown(2, ts=1000.0)
    config = ImpressionConfig(window_s=600)
    put, schedule = impression_writes(impression, config)
    assert put == PutBlob("imp:r-1", impression.to_bytes(), 900)
    assert schedule == Schedule("imp:due", "r-1", 1600.0)
    assert label_writes("r-1", {"1": "-", "2": "+"}, config) == SetFields(
        "lab:r-1", {"1": "-", "2": "+"}, 900
    )


def test_default_impression_config() -> None:
    config = ImpressionConfig()
    assert (config.window_s, config.depth, config.close_depth) == (1800, 20, 10)
