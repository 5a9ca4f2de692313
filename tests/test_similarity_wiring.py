"""Co-engagement wired in: feedback learns pairs once, features read them, the ranker
diversifies and recommends (engine.feedback, engine.features, engine.ranking)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.features import (
    FEATURE_NAMES,
    FeatureConfig,
    catalog_writes,
    compute_features,
    read_request_state,
)
from engine.feedback import Feedback
from engine.item_similarity import POPULAR_KEY, neighbour_key
from engine.messages import (
    Candidate,
    CatalogItem,
    Interaction,
    InvalidMessage,
    SearchRequest,
    parse_search_request,
)
from engine.ranking import Ranker, RankingConfig
from engine.store import HashRead, MemoryStore
from models.online_ctr import LinearCTR
from models.profile import RankingProfile

SESSION = FEATURE_NAMES.index("session_similarity")
HISTORY = FEATURE_NAMES.index("history_similarity")


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.round_trips = 0

    def read(self, reads):
        self.round_trips += 1
        return super().read(reads)


def engage(feedback: Feedback, user: str, item: str, ts: float, kind: str = "click") -> bool:
    event = Interaction(f"e-{user}-{item}-{ts}", user, item, kind, ts=ts)
    return feedback.commit(feedback.prepare(event))


def pair_weight(store: MemoryStore, a: str, b: str) -> float:
    (neighbours,) = store.read([HashRead(neighbour_key(a))])
    return float(neighbours.get(b, 0.0))


# --- feedback ----------------------------------------------------------------------------------


def test_feedback_learns_each_pair_once_under_redelivery() -> None:
    store = MemoryStore()
    feedback = Feedback(store)
    phone = Interaction("e-1", "u-1", "phone", "click", ts=100.0)
    case = Interaction("e-2", "u-1", "case", "click", ts=160.0)
    assert feedback.commit(feedback.prepare(phone))
    assert feedback.commit(feedback.prepare(case))
    # Redelivered, both prepared again (the second now finds itself in the recent list).
    assert not feedback.commit(feedback.prepare(case))
    assert not feedback.commit(feedback.prepare(phone))
    assert pair_weight(store, "phone", "case") == pytest.approx(1.0)
    assert pair_weight(store, "case", "phone") == pytest.approx(1.0)
    (item,) = store.read([HashRead("i:case")])
    assert float(item["s|n"]) == pytest.approx(1.0)
    (popular,) = store.read([HashRead(POPULAR_KEY)])
    assert float(popular["case"]) == pytest.approx(1.0, rel=1e-3)  # as of the first engagement


def test_engagements_of_one_user_in_one_batch_pair_with_each_other() -> None:
    store = MemoryStore()
    feedback = Feedback(store)
    events = [
        Interaction("e-1", "u-1", "phone", "click", ts=100.0),
        Interaction("e-2", "u-2", "shoe", "click", ts=101.0),
        Interaction("e-3", "u-1", "case", "add_to_cart", ts=160.0),
        Interaction("e-4", "u-1", "charger", "click", ts=170.0),
    ]
    plans = feedback.prepare_many(events)
    assert feedback.commit_many(plans) == [True] * 4
    assert pair_weight(store, "phone", "case") == pytest.approx(3.0)  # a cart weighs 3
    assert pair_weight(store, "charger", "case") == pytest.approx(1.0)
    assert pair_weight(store, "charger", "phone") == pytest.approx(1.0)
    assert pair_weight(store, "shoe", "phone") == 0.0  # another shopper
    # The whole batch redelivered: nothing counted twice.
    assert feedback.commit_many(feedback.prepare_many(events)) == [False] * 4
    assert pair_weight(store, "phone", "case") == pytest.approx(3.0)


def test_similarity_off_learns_no_pairs() -> None:
    store = MemoryStore()
    feedback = Feedback(store, FeatureConfig(similarity=False))
    engage(feedback, "u-1", "phone", 100.0)
    engage(feedback, "u-1", "case", 160.0)
    assert store.read([HashRead(neighbour_key("phone"))]) == [{}]


# --- features ----------------------------------------------------------------------------------


def planted_shop(config: FeatureConfig | None = None) -> tuple[CountingStore, Feedback]:
    """Phone and case are co-engaged by ten shoppers; charger by nobody with them."""
    store = CountingStore()
    feedback = Feedback(store, config)
    for n in range(10):
        engage(feedback, f"u-{n}", "phone", 1000.0 + n)
        engage(feedback, f"u-{n}", "case", 1060.0 + n)
        engage(feedback, f"v-{n}", "charger", 1000.0 + n)
        engage(feedback, f"v-{n}", f"other-{n}", 1060.0 + n)
    return store, feedback


def similarity_columns(store, request, config=None) -> np.ndarray:
    config = config or FeatureConfig()
    state = read_request_state(store, request, config)
    return compute_features(request, state, config)[:, [SESSION, HISTORY]]


def test_a_session_that_engaged_an_item_raises_its_planted_neighbour() -> None:
    store, feedback = planted_shop()
    engage(feedback, "new", "phone", 5000.0)
    request = SearchRequest("r-1", "new", (Candidate("charger"), Candidate("case")), ts=5100.0)
    x = similarity_columns(store, request)
    assert x[0].tolist() == [0.0, 0.0]
    assert x[1, 0] > 0.5 and x[1, 1] == pytest.approx(x[1, 0])
    # A day later the session is over; the history still knows.
    later = SearchRequest("r-2", "new", request.candidates, ts=5000.0 + 86400)
    x = similarity_columns(store, later)
    assert x[1, 0] == 0.0 and x[1, 1] > 0.5


def test_similarity_off_reads_nothing_more_and_scores_zero() -> None:
    store, feedback = planted_shop()
    engage(feedback, "new", "phone", 5000.0)
    request = SearchRequest("r-1", "new", (Candidate("charger"), Candidate("case")), ts=5100.0)
    before = store.round_trips
    x = similarity_columns(store, request, FeatureConfig(similarity=False))
    assert store.round_trips - before == 1
    assert not x.any()
    before = store.round_trips
    similarity_columns(store, request)
    assert store.round_trips - before == 1  # the anchors' neighbours come in the same trip


def test_explain_shows_the_similarity_terms() -> None:
    store, feedback = planted_shop()
    engage(feedback, "new", "phone", 5000.0)
    model = LinearCTR.prior()
    weights = model.weights.copy()
    weights[SESSION] = 1.0
    ranker = Ranker(store, LinearCTR(1, weights, model.intercept))
    request = SearchRequest(
        "r-1", "new", (Candidate("charger"), Candidate("case")), ts=5100.0, explain=True
    )
    items = ranker.rank(request).result.items
    assert items[0].item_id == "case"
    assert items[0].explain["session_similarity"] > 0.5
    assert items[1].explain["history_similarity"] == 0.0


# --- diversity -----------------------------------------------------------------------------------


def near_duplicates() -> tuple[MemoryStore, SearchRequest]:
    store = MemoryStore()
    for item_id, category, brand in [
        ("case-1", "cases", "acme"),
        ("case-2", "cases", "acme"),
        ("case-3", "cases", "acme"),
        ("phone-1", "phones", "zeta"),
    ]:
        store.apply(catalog_writes(CatalogItem(item_id, category, brand), FeatureConfig()))
    candidates = tuple(
        Candidate(i, s)
        for i, s in zip(("case-1", "case-2", "case-3", "phone-1"), (9, 8, 7, 1), strict=True)
    )
    return store, SearchRequest("r-1", "u-1", candidates, ts=10.0)


def test_the_diversity_step_changes_the_top_of_near_duplicates() -> None:
    store, request = near_duplicates()
    plain = Ranker(store, LinearCTR.prior()).rank(request).result.items
    assert [i.item_id for i in plain] == ["case-1", "case-2", "case-3", "phone-1"]
    ranker = Ranker(store, LinearCTR.prior(), RankingConfig(diversity=0.5))
    diverse = ranker.rank(request).result.items
    assert [i.item_id for i in diverse][:2] == ["case-1", "phone-1"]
    assert [i.rank for i in diverse] == [1, 2, 3, 4]
    # Control keeps the retrieval order, diversity or not.
    control = ranker.rank(request, variant="control").result.items
    assert [i.item_id for i in control] == ["case-1", "case-2", "case-3", "phone-1"]


def test_diversity_in_the_profile_is_validated() -> None:
    assert RankingProfile.from_dict({"diversity": 0.7}).diversity == 0.7
    assert RankingProfile().diversity is None
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match="diversity"):
            RankingProfile.from_dict({"diversity": bad})


def test_the_diversity_setting_comes_from_the_environment(monkeypatch) -> None:
    from streams.settings import Settings

    monkeypatch.setenv("STREAMRANK_DIVERSITY", "0.6")
    assert Settings.from_env().profile.diversity == 0.6


# --- recommendations ---------------------------------------------------------------------------


def test_recommend_requests_parse_and_invalid_ones_name_the_field() -> None:
    request = parse_search_request(
        b'{"request_id": "r", "user_id": "u", "recommend": true, "k": 3}', now=1.0
    )
    assert request.recommend and request.k == 3 and request.candidates == ()
    cases = {
        b'{"request_id": "r", "user_id": "u", "recommend": true}': "k: required",
        b'{"request_id": "r", "user_id": "u", "recommend": "yes", "k": 3}': "recommend: must be",
        b'{"request_id": "r", "user_id": "u", "recommend": true, "k": 0}': "k: must be",
        b'{"request_id": "r", "user_id": "u", "recommend": true, "k": 5000}': "k: at most",
        b'{"request_id": "r", "user_id": "u", "recommend": true, "k": 2, '
        b'"candidates": [{"item_id": "a"}]}': "candidates: must be empty",
        b'{"request_id": "r", "user_id": "u", "recommend": false, "k": 2}': "candidates: must",
    }
    for raw, reason in cases.items():
        with pytest.raises(InvalidMessage, match=reason):
            parse_search_request(raw)


def test_recommendations_come_from_co_engagement_then_popularity() -> None:
    store, feedback = planted_shop()
    engage(feedback, "new", "phone", 5000.0)
    ranker = Ranker(store, LinearCTR.prior())
    request = SearchRequest("r-1", "new", (), k=3, ts=5100.0, recommend=True)
    ranking = ranker.rank(request)
    ids = [item.item_id for item in ranking.result.items]
    assert len(ids) == 3 and "case" in ids
    assert not ranking.result.degraded and ranking.impression is not None
    # A stranger gets the popular items.
    stranger = SearchRequest("r-2", "stranger", (), k=2, ts=5100.0, recommend=True)
    ids = [item.item_id for item in ranker.rank(stranger).result.items]
    assert set(ids) <= {"phone", "case", "charger"}


def test_an_empty_shop_recommends_nothing() -> None:
    ranker = Ranker(MemoryStore(), LinearCTR.prior())
    request = SearchRequest("r-1", "u-1", (), k=5, ts=10.0, recommend=True)
    ranking = ranker.rank(request)
    assert ranking.result.items == () and not ranking.result.degraded
    assert ranker.remember(ranking) is False


# --- upgrading: models and examples from before the two features ------------------------------


def test_examples_ranked_before_the_new_features_are_learned_with_zeros() -> None:
    from engine.impressions import LabelledExample
    from models.online_learner import OnlineLearner

    learner = OnlineLearner(MemoryStore(), publish_every_s=0.0, warmup_examples=1)
    old = LabelledExample("r-1", "i-1", 1, True, (0.5,) * (len(FEATURE_NAMES) - 2), 0.0)
    new = LabelledExample("r-2", "i-2", 1, False, (0.5,) * len(FEATURE_NAMES), 0.0)
    learned = learner.learn_many([("e-1", [old]), ("e-2", [new])])
    assert [len(e.features) for e in learned] == [len(FEATURE_NAMES)] * 2
    assert learned[0].features[-2:] == (0.0, 0.0)


def test_a_deep_model_trained_before_the_new_features_still_scores() -> None:
    from models.deep_ctr import DeepConfig, DeepCTR

    older = DeepCTR(DeepConfig(dense_features=FEATURE_NAMES[:-2], hidden=(8,)))
    x = np.arange(2 * len(FEATURE_NAMES), dtype=np.float64).reshape(2, -1)
    rows = older.encode_request("u", "", ["a", "b"], ["", ""], ["", ""], x)
    assert rows.dense.shape == (2, len(FEATURE_NAMES) - 2)
    assert rows.dense[1, 0] == x[1, 0]
    assert np.isfinite(older.predict_proba_many(rows)).all()
    assert older.encode_request("u", "", [], [], [], np.zeros((0, 23))).dense.shape == (0, 21)
