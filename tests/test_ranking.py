"""The Ranker on a MemoryStore: ordering, cuts, explanations, fallbacks, personalization."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from engine.experiments import assign_variant, user_bucket
from engine.features import (
    FEATURE_NAMES,
    POSITIONS_KEY,
    FeatureConfig,
    catalog_writes,
    compute_features,
    item_key,
    read_request_state,
)
from engine.feedback import Feedback
from engine.impressions import (
    DUE_KEY,
    Impression,
    ImpressionConfig,
    LabelledExample,
    click_labels,
    impression_key,
)
from engine.messages import Candidate, CatalogItem, Interaction, SearchRequest
from engine.ranking import (
    CONTROL,
    PERSONALIZED,
    Ranker,
    RankingConfig,
    retrieval_strength,
)
from engine.store import (
    BlobRead,
    HashRead,
    Increment,
    MemoryStore,
    PushRecent,
    StoreUnavailable,
)
from models.deep_ctr import DeepConfig, DeepCTR
from models.online_ctr import LinearCTR

N = len(FEATURE_NAMES)


def zero_model(version: int = 0) -> LinearCTR:
    return LinearCTR(version=version, weights=np.zeros(N), intercept=0.0)


def weights(**by_name: float) -> np.ndarray:
    return np.array([by_name.get(name, 0.0) for name in FEATURE_NAMES])


def request_of(ids: Sequence[str], scores: Sequence[float | None] | None = None, **kw):
    scores = scores if scores is not None else [None] * len(ids)
    candidates = tuple(Candidate(i, s) for i, s in zip(ids, scores, strict=True))
    kw.setdefault("ts", 1000.0)
    return SearchRequest(kw.pop("request_id", "r-1"), kw.pop("user_id", "u-1"), candidates, **kw)


def ids_of(ranking) -> list[str]:
    return [item.item_id for item in ranking.result.items]


class DownStore:
    """A store whose Redis is gone."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, reads):
        self.calls += 1
        raise StoreUnavailable("down")

    def read_then(self, first, then):
        return self.read(first), self.read(then())

    def apply(self, writes, once=None, once_ttl=86400):
        self.calls += 1
        raise StoreUnavailable("down")

    def apply_many(self, batches):
        self.calls += 1
        raise StoreUnavailable("down")

    def pop_due(self, key, now, limit):
        raise StoreUnavailable("down")


class WriteDownStore(MemoryStore):
    """Reads work, writes fail (Redis went away between the two)."""

    def apply_many(self, batches):
        raise StoreUnavailable("down")


# --- retrieval strength ----------------------------------------------------------------------


def test_retrieval_strength() -> None:
    assert retrieval_strength(request_of("abc", [5.0, 1.0, 3.0])).tolist() == [1.0, 0.0, 0.5]
    # missing scores or all equal: the input order, 1 - i / n
    assert retrieval_strength(request_of("abcd", [5.0, None, 3.0, 1.0])).tolist() == [
        1.0,
        0.75,
        0.5,
        0.25,
    ]
    assert retrieval_strength(request_of("ab", [2.0, 2.0])).tolist() == [1.0, 0.5]
    assert retrieval_strength(request_of("a")).tolist() == [1.0]


# --- ranking ---------------------------------------------------------------------------------


def test_result_holds_every_candidate_once_in_score_order() -> None:
    model = LinearCTR(1, weights(item_ctr_logit=1.0, retrieval_score_z=0.7), intercept=-1.0)
    store = MemoryStore()
    rng = np.random.default_rng(3)
    ids = [f"i-{n}" for n in range(40)]
    store.apply(
        [Increment(item_key(i), {"imp": 100, "clk": int(rng.integers(0, 30))}) for i in ids]
    )
    request = request_of(ids, rng.normal(size=40).tolist())
    ranking = Ranker(store, model).rank(request)
    result = ranking.result
    assert sorted(ids_of(ranking)) == sorted(ids)
    assert len(ids_of(ranking)) == len(set(ids_of(ranking))) == 40
    assert [item.rank for item in result.items] == list(range(1, 41))
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    assert ids_of(ranking) != ids  # the model did reorder
    assert result.request_id == "r-1" and result.user_id == "u-1"
    assert (result.variant, result.model_version, result.degraded) == (
        PERSONALIZED,
        "online:1",
        False,
    )
    assert result.latency_ms >= 0.0
    assert all(item.explain is None for item in result.items)


def test_scores_are_ctr_plus_weighted_retrieval() -> None:
    model = LinearCTR(0, weights(retrieval_reciprocal_rank=1.0), intercept=-2.0)
    config = RankingConfig(retrieval_weight=0.1)
    request = request_of("abc", [1.0, 3.0, 2.0])
    ranking = Ranker(MemoryStore(), model, config).rank(request)

    def sigmoid(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    by_id = {item.item_id: item.score for item in ranking.result.items}
    assert by_id == {
        "a": pytest.approx(sigmoid(1.0 - 2.0) + 0.1 * 0.0, abs=1e-6),
        "b": pytest.approx(sigmoid(0.5 - 2.0) + 0.1 * 1.0, abs=1e-6),
        "c": pytest.approx(sigmoid(1 / 3 - 2.0) + 0.1 * 0.5, abs=1e-6),
    }
    # a: 0.2689 + 0, b: 0.1824 + 0.1, c: 0.1589 + 0.05
    assert ids_of(ranking) == ["b", "a", "c"]


def test_k_cuts_the_result() -> None:
    model = LinearCTR(0, weights(retrieval_score_z=1.0), intercept=0.0)
    request = request_of("abcde", [1.0, 5.0, 2.0, 4.0, 3.0])
    full = Ranker(MemoryStore(), model).rank(request)
    assert ids_of(full) == ["b", "d", "e", "c", "a"]
    cut = Ranker(MemoryStore(), model).rank(request_of("abcde", [1.0, 5.0, 2.0, 4.0, 3.0], k=2))
    assert ids_of(cut) == ["b", "d"]
    assert [item.rank for item in cut.result.items] == [1, 2]
    more = Ranker(MemoryStore(), model).rank(request_of("abc", [1.0, 2.0, 3.0], k=10))
    assert ids_of(more) == ["c", "b", "a"]


@pytest.mark.parametrize("ids", ["abcdef", "fedcba", "cafbed"])
def test_ties_keep_the_input_order(ids: str) -> None:
    config = RankingConfig(retrieval_weight=0.0)
    ranking = Ranker(MemoryStore(), zero_model(), config).rank(request_of(ids, [2.0] * 6))
    assert ids_of(ranking) == list(ids)
    assert {item.score for item in ranking.result.items} == {0.5}


def test_ties_keep_the_input_order_in_long_lists() -> None:
    """Long enough that an unstable sort (numpy's default introsort) would mix them up."""
    rng = np.random.default_rng(5)
    ids = [f"i-{n}" for n in rng.permutation(300)]
    # two groups of equal scores: the items a user engaged with, and the others
    engaged = set(ids[::3])
    store = MemoryStore()
    store.apply([PushRecent("u:u-1:r", f"{i}\t999.0", 300) for i in engaged])
    model = LinearCTR(0, weights(user_engaged_item=1.0), 0.0)
    config = RankingConfig(retrieval_weight=0.0, features=FeatureConfig(recent_items=300))
    ranking = Ranker(store, model, config).rank(request_of(ids))
    assert ids_of(ranking) == [i for i in ids if i in engaged] + [
        i for i in ids if i not in engaged
    ]


def test_zero_model_with_equal_scores_keeps_the_input_order() -> None:
    ranking = Ranker(MemoryStore(), zero_model()).rank(request_of("dbca", [1.0] * 4))
    assert ids_of(ranking) == list("dbca")


def test_explain_contributions_add_up_to_the_log_odds() -> None:
    rng = np.random.default_rng(11)
    model = LinearCTR(4, rng.normal(size=N) * 0.5, intercept=-1.7)
    store = MemoryStore()
    store.apply(
        [Increment(item_key(i), {"imp": 50, "clk": n, "exp": 2.0}) for n, i in enumerate("abcd")]
    )
    store.apply(catalog_writes(CatalogItem("a", "shoes", "acme", 30.0), FeatureConfig()))
    request = request_of("abcd", [4.0, 1.0, None, 2.0], explain=True, query="shoes")
    ranking = Ranker(store, model, RankingConfig(retrieval_weight=0.05)).rank(request)
    strength = dict(zip("abcd", retrieval_strength(request).tolist(), strict=True))
    for item in ranking.result.items:
        explain = item.explain
        assert explain is not None
        assert set(explain) == {*FEATURE_NAMES, "ctr_online", "ctr", "retrieval"}
        assert explain["ctr"] == explain["ctr_online"]  # no deep model serves
        log_odds = sum(explain[name] for name in FEATURE_NAMES) + model.intercept
        # Both sides are rounded to 6 decimals: compare as probabilities.
        assert 1.0 / (1.0 + math.exp(-log_odds)) == pytest.approx(explain["ctr"], abs=2e-6)
        assert explain["retrieval"] == pytest.approx(0.05 * strength[item.item_id], abs=1e-6)
        assert item.score == pytest.approx(explain["ctr"] + explain["retrieval"], abs=2e-6)
    # the contributions are the features times the weights, at ranking time
    state = read_request_state(store, request, FeatureConfig())
    x = compute_features(request, state, FeatureConfig())
    first = ranking.result.items[0]
    row = x["abcd".index(first.item_id)] * model.weights
    assert [first.explain[n] for n in FEATURE_NAMES] == pytest.approx(row.tolist(), abs=1e-6)


def test_explain_survives_the_json_encoding() -> None:
    import orjson

    request = request_of("ab", explain=True)
    body = orjson.loads(Ranker(MemoryStore(), LinearCTR.prior()).rank(request).result.to_json())
    assert set(body["items"][0]["explain"]) == {*FEATURE_NAMES, "ctr_online", "ctr", "retrieval"}


def test_control_keeps_the_input_order() -> None:
    # a model that would reverse the order
    model = LinearCTR(0, weights(retrieval_reciprocal_rank=-10.0), intercept=0.0)
    request = request_of("abcd", [1.0, 4.0, 2.0, 3.0])
    personalized = Ranker(MemoryStore(), model).rank(request)
    assert ids_of(personalized) == ["d", "c", "b", "a"]
    control = Ranker(MemoryStore(), model).rank(request, variant=CONTROL)
    assert ids_of(control) == ["a", "b", "c", "d"]
    assert control.result.variant == CONTROL
    assert [item.score for item in control.result.items] == pytest.approx([0.0, 1.0, 1 / 3, 2 / 3])
    cut = Ranker(MemoryStore(), model).rank(request_of("abcd", k=3), variant=CONTROL)
    assert ids_of(cut) == ["a", "b", "c"]
    assert control.impression is not None  # control impressions are remembered too


def test_degraded_fallback_when_the_store_is_down() -> None:
    store = DownStore()
    ranker = Ranker(store, LinearCTR.prior())
    ranking = ranker.rank(request_of("abcd", [1.0, 4.0, 2.0, 3.0], k=3), variant=CONTROL)
    result = ranking.result
    assert result.degraded is True
    assert ids_of(ranking) == ["a", "b", "c"]
    assert [item.rank for item in result.items] == [1, 2, 3]
    assert [item.score for item in result.items] == pytest.approx([0.0, 1.0, 1 / 3])
    assert result.variant == CONTROL
    assert result.model_version == "online:0"
    assert ranking.impression is None
    assert ranker.remember(ranking) is False
    assert store.calls == 1  # nothing to remember: no write was even tried
    full = ranker.rank(request_of("xyz", explain=True))
    assert ids_of(full) == ["x", "y", "z"]
    assert full.result.degraded is True
    assert all(item.explain is None for item in full.result.items)


def test_remember_is_false_when_the_write_fails() -> None:
    ranker = Ranker(WriteDownStore(), LinearCTR.prior())
    ranking = ranker.rank(request_of("ab"))
    assert ranking.result.degraded is False
    assert ranker.remember(ranking) is False


def test_remember_applies_once_per_request_id() -> None:
    store = MemoryStore(clock=lambda: 1000.0)
    ranker = Ranker(store, LinearCTR.prior())
    request = request_of("abc", [3.0, 2.0, 1.0], query="Shoes")
    first = ranker.rank(request)
    again = ranker.rank(request)  # a redelivered request
    assert ranker.remember(first) is True
    assert ranker.remember(again) is False
    a, pos, blob = store.read(
        [HashRead(item_key("a")), HashRead(POSITIONS_KEY), BlobRead(impression_key("r-1"))]
    )
    assert a["imp"] == "1"
    assert pos == {"i1": "1", "i2": "1", "i3": "1"}
    impression = Impression.from_bytes(blob)
    assert impression.item_ids == tuple(ids_of(first))
    assert impression.query == "Shoes" and impression.ts == 1000.0
    assert impression.variant == PERSONALIZED and impression.model_version == "online:0"
    assert store.pop_due(DUE_KEY, 1000.0 + 1800.0, 10) == ["r-1"]
    other = ranker.rank(request_of("abc", request_id="r-2"))
    assert ranker.remember(other) is True
    assert store.read([HashRead(item_key("a"))])[0]["imp"] == "2"


def test_impression_keeps_the_ranking_time_features_of_the_top_depth() -> None:
    config = RankingConfig(impressions=ImpressionConfig(depth=2))
    store = MemoryStore()
    ranker = Ranker(store, LinearCTR(0, weights(retrieval_score_z=1.0), 0.0), config)
    request = request_of("abcd", [1.0, 4.0, 2.0, 3.0], k=3)
    state = read_request_state(store, request, config.features)
    x = compute_features(request, state, config.features)
    ranking = ranker.rank(request)
    assert ids_of(ranking) == ["b", "d", "c"]
    assert ranker.remember(ranking)
    (blob, b, c, a) = store.read(
        [BlobRead(impression_key("r-1")), HashRead("i:b"), HashRead("i:c"), HashRead("i:a")]
    )
    impression = Impression.from_bytes(blob)
    assert impression.item_ids == ("b", "d")
    np.testing.assert_allclose(impression.features, x[[1, 3]], rtol=1e-6)
    # impressions are counted for the seen depth only: c (shown third) and a (cut by k) not
    assert b["imp"] == "1"
    assert c == a == {}


def test_model_swap_takes_effect_on_the_next_request() -> None:
    ranker = Ranker(MemoryStore(), LinearCTR(0, weights(retrieval_score_z=1.0), 0.0))
    request = request_of("abc", [1.0, 2.0, 3.0])
    assert ids_of(ranker.rank(request)) == ["c", "b", "a"]
    ranker.model = LinearCTR(7, weights(retrieval_score_z=-1.0), 0.0)
    ranking = ranker.rank(request)
    assert ids_of(ranking) == ["a", "b", "c"]
    assert ranking.result.model_version == "online:7"


# --- personalization -------------------------------------------------------------------------

X_ITEMS = [f"x{n}" for n in range(6)]
Y_ITEMS = [f"y{n}" for n in range(6)]


def shop() -> tuple[MemoryStore, Ranker, Feedback]:
    clock = [10_000.0]
    store = MemoryStore(clock=lambda: clock[0])
    config = FeatureConfig()
    for item_id in X_ITEMS:
        store.apply(catalog_writes(CatalogItem(item_id, "cat-x", "brand-x", 30.0), config))
    for item_id in Y_ITEMS:
        store.apply(catalog_writes(CatalogItem(item_id, "cat-y", "brand-y", 30.0), config))
    return store, Ranker(store, LinearCTR.prior()), Feedback(store)


def click_through(ranker: Ranker, feedback: Feedback, user: str, items: list[str], ts: float):
    """The user searches, is shown ``items`` and clicks each of them in turn."""
    for n, item_id in enumerate(items):
        request = request_of(items, request_id=f"{user}-r{n}", user_id=user, ts=ts + n)
        ranker.remember(ranker.rank(request))
        click = Interaction(
            f"{user}-e{n}", user, item_id, "click", ts + n + 1, request_id=request.request_id
        )
        assert feedback.commit(feedback.prepare(click))


def test_personalization_follows_what_each_user_clicked() -> None:
    store, ranker, feedback = shop()
    # A clicks x0..x2, B clicks y0..y2; the other items of both categories stay unclicked
    click_through(ranker, feedback, "A", X_ITEMS[:3], 20_000.0)
    click_through(ranker, feedback, "B", Y_ITEMS[:3], 20_000.0)
    fresh = ["y3", "x3", "y4", "x4", "y5", "x5"]
    # the fresh items are equally popular: never shown, never clicked
    counters = store.read([HashRead(item_key(i)) for i in fresh])
    assert {(c.get("imp"), c.get("clk")) for c in counters} == {(None, None)}
    (a_tastes,) = store.read([HashRead("u:A:a")])
    assert float(a_tastes["c|cat-x|k"]) == pytest.approx(3.0, rel=1e-5)  # faded by seconds
    assert "c|cat-y|k" not in a_tastes

    a = ranker.rank(request_of(fresh, request_id="A-next", user_id="A", ts=20_100.0))
    assert ids_of(a) == ["x3", "x4", "x5", "y3", "y4", "y5"]
    b = ranker.rank(request_of(fresh, request_id="B-next", user_id="B", ts=20_100.0))
    assert ids_of(b) == ["y3", "y4", "y5", "x3", "x4", "x5"]
    # a shopper nobody knows gets the retrieval order
    c = ranker.rank(request_of(fresh, request_id="C-next", user_id="C", ts=20_100.0))
    assert ids_of(c) == fresh


# --- experiments -----------------------------------------------------------------------------


def test_variant_assignment_is_stable_and_salted() -> None:
    users = [f"u-{n}" for n in range(2000)]
    buckets = [user_bucket(u, "s1") for u in users]
    assert all(0.0 <= b < 1.0 for b in buckets)
    assert buckets == [user_bucket(u, "s1") for u in users]
    assert buckets != [user_bucket(u, "s2") for u in users]
    share = sum(assign_variant(u, "s1", 0.2) == CONTROL for u in users) / len(users)
    assert 0.16 < share < 0.24
    assert {assign_variant(u, "s1", 0.0) for u in users} == {PERSONALIZED}
    assert {assign_variant(u, "s1", 1.0) for u in users} == {CONTROL}
    for u, bucket in zip(users, buckets, strict=True):
        assert assign_variant(u, "s1", 0.3) == (CONTROL if bucket < 0.3 else PERSONALIZED)


# --- the deep model beside the online one ----------------------------------------------------


def tiny_deep_model(version: int) -> DeepCTR:
    torch.manual_seed(version)
    model = DeepCTR(
        DeepConfig(
            user_buckets=16, item_buckets=64, category_buckets=8, brand_buckets=8, query_buckets=16
        ),
        version=version,
    )
    with torch.no_grad():  # a visible opinion per item, not the near-constant of a fresh init
        model.network.item.weight.normal_(0.0, 1.0)
    return model


def deep_shop() -> tuple[MemoryStore, SearchRequest]:
    store = MemoryStore()
    for n, item in enumerate("abcd"):
        store.apply(
            catalog_writes(CatalogItem(item, f"cat-{n % 2}", f"brand-{n}", 10.0), FeatureConfig())
        )
    return store, request_of("abcd", [4.0, 3.0, 2.0, 1.0], explain=True, query="red shoes")


def test_a_serving_deep_model_is_blended_with_the_online_one() -> None:
    store, request = deep_shop()
    online = LinearCTR(4, np.random.default_rng(3).normal(size=N) * 0.3, intercept=-2.0)
    ranker = Ranker(store, online, RankingConfig(retrieval_weight=0.05, deep_weight=0.25))
    ranker.deep_model = tiny_deep_model(version=7)
    ranking = ranker.rank(request)

    assert ranking.result.model_version == "online:4+deep:7"
    state = read_request_state(store, request, FeatureConfig())
    x = compute_features(request, state, FeatureConfig())
    deep = ranker.deep_model.predict_request(
        "u-1",
        "red shoes",
        list("abcd"),
        ["cat-0", "cat-1"] * 2,
        [f"brand-{n}" for n in range(4)],
        x,
    )
    strength = retrieval_strength(request)
    for item in ranking.result.items:
        i = "abcd".index(item.item_id)
        explain = item.explain
        assert explain["ctr_online"] == pytest.approx(online.predict_proba_many(x)[i], abs=1e-6)
        assert explain["ctr_deep"] == pytest.approx(deep[i], abs=1e-6)
        assert explain["deep_weight"] == 0.25
        affinity = ranker.deep_model.user_item_affinity("u-1", list("abcd"))[i]
        assert explain["user_item_affinity"] == pytest.approx(affinity, abs=1e-6)
        blend = 0.75 * explain["ctr_online"] + 0.25 * explain["ctr_deep"]
        assert explain["ctr"] == pytest.approx(blend, abs=2e-6)
        assert item.score == pytest.approx(blend + 0.05 * strength[i], abs=4e-6)
    assert [i.score for i in ranking.result.items] == sorted(
        (i.score for i in ranking.result.items), reverse=True
    )


def test_the_deep_model_changes_the_order_it_is_given_weight_in() -> None:
    store, request = deep_shop()
    ranker = Ranker(store, zero_model(), RankingConfig(retrieval_weight=0.0, deep_weight=1.0))
    deep = tiny_deep_model(version=1)
    ranker.deep_model = deep
    ranking = ranker.rank(request)
    x = compute_features(
        request, read_request_state(store, request, FeatureConfig()), FeatureConfig()
    )
    p = deep.predict_request(
        "u-1",
        "red shoes",
        list("abcd"),
        ["cat-0", "cat-1"] * 2,
        [f"brand-{n}" for n in range(4)],
        x,
    )
    assert ids_of(ranking) == ["abcd"[i] for i in np.argsort(-p, kind="stable")]


def test_control_ignores_the_deep_model_and_examples_carry_ids_for_it() -> None:
    store, request = deep_shop()
    ranker = Ranker(store, zero_model(), RankingConfig(deep_weight=1.0))
    ranker.deep_model = tiny_deep_model(version=2)
    control = ranker.rank(request, CONTROL)
    assert ids_of(control) == list("abcd") and control.result.model_version == "online:0"

    ranking = ranker.rank(request)
    shown = ranking.impression
    assert shown.categories == tuple(f"cat-{'abcd'.index(i) % 2}" for i in shown.item_ids)
    assert Impression.from_bytes(shown.to_bytes()).brands == shown.brands
    examples, _ = click_labels(shown, {}, position=2, event_ts=5.0)
    clicked = examples[0]
    assert (clicked.user_id, clicked.query, clicked.item_id) == (
        "u-1",
        "red shoes",
        shown.item_ids[1],
    )
    assert (clicked.category, clicked.brand) == (shown.categories[1], shown.brands[1])
    assert LabelledExample.from_dict(clicked.to_dict()) == clicked
