"""Feature keys, position bias, the feature matrix and the writes that feed it."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from engine.features import (
    CATEGORY,
    FEATURE_NAMES,
    FEATURES,
    ITEM_FIELDS,
    NO_POSITION_COUNTS,
    POSITIONS_KEY,
    UNKNOWN_ITEM,
    FeatureConfig,
    RequestState,
    catalog_writes,
    compute_features,
    empty_state,
    global_ctr,
    impression_counter_writes,
    interaction_writes,
    item_key,
    item_state_from_hash,
    normalize_query,
    position_counts,
    position_ctr,
    position_index,
    query_key,
    read_request_state,
    user_affinity_key,
    user_recent_key,
)
from engine.item_similarity import recent_items_read
from engine.messages import Candidate, CatalogItem, Interaction, SearchRequest
from engine.near_cache import NearCache
from engine.store import (
    DecayedIncrement,
    FieldsRead,
    HashRead,
    Increment,
    MemoryStore,
    PushRecent,
    RecentItemsRead,
    RecordsRead,
    SetFields,
)

CONFIG = FeatureConfig()
WEEK = 7 * 86400.0


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def column(x: np.ndarray, name: str) -> list[float]:
    return x[:, FEATURE_NAMES.index(name)].tolist()


# --- keys ------------------------------------------------------------------------------------


def test_keys() -> None:
    assert user_affinity_key("u-1") == "u:u-1:a"
    assert user_recent_key("u-1") == "u:u-1:r"
    assert item_key("i-9") == "i:i-9"
    assert POSITIONS_KEY == "g:pos"


def test_normalize_query() -> None:
    assert normalize_query("Running  Shoes") == "running shoes"
    assert normalize_query("  running\tshoes\n") == "running shoes"
    assert normalize_query("ÉTÉ") == "été"
    assert normalize_query("   ") == ""
    assert normalize_query("") == ""


def test_query_key() -> None:
    digest = hashlib.blake2b(b"running shoes", digest_size=8).hexdigest()
    assert query_key("Running  Shoes") == "q:" + digest
    assert query_key("running shoes") == query_key(" RUNNING SHOES ")
    assert query_key("running shoe") != query_key("running shoes")
    assert query_key("") is None
    assert query_key("  ") is None
    assert len(query_key("x" * 2000)) == 2 + 16


def test_feature_names_are_unique_and_documented() -> None:
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 23
    assert tuple(f.name for f in FEATURES) == FEATURE_NAMES
    import engine.features

    for name in FEATURE_NAMES:
        assert f"``{name}``" in engine.features.__doc__


# --- position bias ---------------------------------------------------------------------------


def test_position_ctr_prior() -> None:
    curve = position_ctr(position_counts({}), CONFIG)
    assert curve.shape == (50,)
    assert curve[0] == pytest.approx(0.05)
    assert curve[3] == pytest.approx(0.025)  # position 4
    assert curve[8] == pytest.approx(0.05 / 3)  # position 9
    assert np.all(np.diff(curve) < 0)


def test_position_ctr_with_counts() -> None:
    config = FeatureConfig(max_position=3, position_prior_impressions=100.0, default_ctr=0.1)
    curve = position_ctr(position_counts({"i1": "300", "c1": "60", "i3": "100", "c3": "0"}), config)
    assert curve.tolist() == pytest.approx(
        [
            (60 + 100 * 0.1) / (300 + 100),  # 0.175
            0.1 / math.sqrt(2),  # no data: the prior
            (0 + 100 * 0.1 / math.sqrt(3)) / (100 + 100),
        ]
    )


def test_position_index() -> None:
    config = FeatureConfig(max_position=5)
    assert [position_index(p, config) for p in (1, 4, 5, 6, 100)] == [1, 4, 5, 5, 5]


def test_global_ctr() -> None:
    assert global_ctr(position_counts({}), CONFIG) == pytest.approx(0.05)
    positions = position_counts({"i1": "100", "c1": "10", "i2": "100", "c2": "5"})
    assert global_ctr(positions, CONFIG) == pytest.approx((15 + 200 * 0.05) / (200 + 200))


# --- reads -----------------------------------------------------------------------------------


class RecordingStore(MemoryStore):
    """A MemoryStore that remembers the reads it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list] = []

    def read(self, reads):
        self.asked.append(list(reads))
        return super().read(reads)


def test_read_request_state_reads_everything_in_one_round_trip() -> None:
    store = RecordingStore()
    store.apply(
        [
            Increment("u:u-1:a", {"e|k": 1}),
            PushRecent("u:u-1:r", "a\t1.0", 50),
            Increment("g:pos", {"i1": 3}),
            SetFields("i:a", {"cat": "x"}),
            Increment(query_key("shoes"), {"a|i": 1}),
        ]
    )
    request = SearchRequest("r", "u-1", (Candidate("a"), Candidate("b")), query="Shoes")
    state = read_request_state(store, request, CONFIG)
    qkey = query_key("shoes")
    # The user has a recent item: its neighbours come with the recent list, in the same trip,
    # only those among the candidates.
    recent = RecentItemsRead("u:u-1:r", 50, 10, "i:", ":n", ("s|n", "s|_t"), ("_t", "a", "b"))
    assert store.asked == [
        [
            HashRead("u:u-1:a"),
            recent,
            HashRead("g:pos"),
            RecordsRead(("i:a", "i:b"), ITEM_FIELDS),
            FieldsRead(qkey, ("a|i", "a|c", "a|e", "b|i", "b|c", "b|e")),
        ],
    ]
    assert state.user == {"e|k": "1"}
    assert state.recent == ["a\t1.0"]
    assert [(a.item_id, a.in_session) for a in state.anchors] == [("a", True)]
    assert state.anchor_replies == [{}, [None, None]]
    assert state.positions.shown.tolist() == [3.0] and state.positions.clicked.tolist() == [0.0]
    assert state.items == [item_state_from_hash({"cat": "x"}), UNKNOWN_ITEM]
    assert state.query_counts.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_shared_state_comes_from_the_near_cache_while_fresh() -> None:
    clock = [0.0]
    cache = NearCache(max_age_s=1.0, clock=lambda: clock[0])
    store = RecordingStore()
    store.apply([SetFields("i:a", {"cat": "x"})])
    request = SearchRequest("r", "u-1", (Candidate("a"), Candidate("b")), query="shoes")
    read_request_state(store, request, CONFIG, cache)
    store.apply([SetFields("i:a", {"cat": "y"}), Increment("u:u-1:a", {"e|k": 1})])
    state = read_request_state(store, request, CONFIG, cache)
    # only the user's own state and the query's counters are read again; the item is a
    # second-old aggregate
    query_fields = FieldsRead(query_key("shoes"), ("a|i", "a|c", "a|e", "b|i", "b|c", "b|e"))
    assert store.asked[-1] == [
        HashRead("u:u-1:a"),
        recent_items_read("u-1", CONFIG, ["a", "b"]),
        query_fields,
    ]
    assert state.items[0][CATEGORY] == "x" and state.user == {"e|k": "1"}
    clock[0] = 1.5
    state = read_request_state(store, request, CONFIG, cache)
    assert state.items[0][CATEGORY] == "y"
    assert len(store.asked[-1]) == 5


def test_state_without_a_query() -> None:
    store = RecordingStore()
    request = SearchRequest("r", "u-1", (Candidate("a"), Candidate("b")))
    state = read_request_state(store, request, CONFIG)
    assert len(store.asked[0]) == 4
    assert state.query_counts.tolist() == [[0.0, 0.0, 0.0]] * 2
    empty = empty_state(request)
    unknown = [UNKNOWN_ITEM, UNKNOWN_ITEM]
    assert (empty.user, empty.recent, empty.items) == ({}, [], unknown)
    assert empty.positions == NO_POSITION_COUNTS
    assert empty.query_counts.tolist() == [[0.0, 0.0, 0.0]] * 2


# --- the feature matrix ----------------------------------------------------------------------

T0 = 1_000_000.0
NOW = T0 + WEEK  # one user half-life after the user's reference time: counts fade to half


def hand_built() -> tuple[SearchRequest, RequestState]:
    request = SearchRequest(
        "r-1",
        "u-1",
        (Candidate("i-1", 3.0), Candidate("i-2", 1.0), Candidate("i-3", None)),
        query="shoes",
        ts=NOW,
    )
    state = RequestState(
        user={
            "_t": repr(T0),
            "e|k": "4",
            "e|a": "1",
            "c|shoes|k": "3",
            "c|shoes|a": "1",
            "b|acme|k": "2",
            "pw": "2",
            "ps": repr(2 * math.log(50.0)),
        },
        recent=[
            f"i-1\t{NOW - 1800.0}",
            f"i-9\t{NOW - 3600.0}",
            f"i-1\t{NOW - 7200.0}",
        ],
        items=[
            item_state_from_hash(item)
            for item in (
                {
                    "cat": "shoes",
                    "brand": "acme",
                    "price": "50.0",
                    "avail": "1",
                    "imp": "80",
                    "clk": "10",
                    "exp": "6",
                    "cart": "2",
                    "buy": "1",
                    "t|i": "8",
                    "t|c": "2",
                    "t|_t": repr(NOW - 3600.0),  # one trend half-life ago
                },
                {"cat": "bags", "price": repr(50.0 * math.exp(0.5)), "avail": "0"},
                {},
            )
        ],
        query_counts=np.array([[40.0, 4.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]]),
        positions=position_counts({"i1": "100", "c1": "10", "i2": "100", "c2": "5"}),
    )
    return request, state


def test_compute_features_by_hand() -> None:
    request, state = hand_built()
    x = compute_features(request, state, CONFIG)
    assert x.shape == (3, len(FEATURE_NAMES))
    assert x.dtype == np.float64

    prior_clicks = (15 + 200 * 0.05) / 400 * 20  # global CTR 0.0625 x 20 impressions = 1.25
    engagement = 0.5 * (4 + 3 * 1)  # faded by one half-life, add-to-cart weighs 3
    shoes = 0.5 * (3 + 3 * 1)
    expected = {
        "retrieval_reciprocal_rank": [1.0, 0.5, 1 / 3],
        "retrieval_score_z": [1.0, -1.0, 0.0],  # mean 2, population std 1; missing -> 0
        "item_ctr_logit": [
            logit((10 + prior_clicks) / (80 + 20)),
            logit(prior_clicks / 20),
            logit(prior_clicks / 20),
        ],
        "item_coec_log": [math.log((10 + 2) / (6 + 2)), 0.0, 0.0],
        "item_log_impressions": [math.log(81), 0.0, 0.0],
        "item_cart_rate": [2 / (10 + 5), 0.0, 0.0],
        "item_purchase_rate": [1 / (10 + 5), 0.0, 0.0],
        "item_available": [1.0, 0.0, 1.0],
        "item_trend_ctr_logit": [
            logit((0.5 * 2 + prior_clicks) / (0.5 * 8 + 20)),
            logit(prior_clicks / 20),
            logit(prior_clicks / 20),
        ],
        "item_trend_log_impressions": [math.log1p(0.5 * 8), 0.0, 0.0],
        "query_item_coec_log": [math.log((4 + 2) / (2 + 2)), 0.0, math.log(2 / 3)],
        "query_item_log_impressions": [math.log(41), 0.0, math.log(4)],
        "user_category_share": [shoes / engagement, 0.0, 0.0],
        "user_category_log_count": [math.log1p(shoes), 0.0, 0.0],
        "user_category_conversions": [math.log1p(0.5), 0.0, 0.0],
        "user_brand_share": [0.5 * 2 / engagement, 0.0, 0.0],
        "user_engaged_item": [1.0, 0.0, 0.0],
        "user_item_recency": [2 ** (-1800 / 3600), 0.0, 0.0],  # the newest entry counts
        "user_price_match": [1.0, math.exp(-0.5), 0.0],  # 0.5 log-units off, tolerance 0.5
        "user_log_engagement": [math.log1p(engagement)] * 3,
        "request_log_candidates": [math.log(3)] * 3,
        # No anchors in this state: see test_item_similarity and the tests below.
        "session_similarity": [0.0] * 3,
        "history_similarity": [0.0] * 3,
    }
    assert set(expected) == set(FEATURE_NAMES)
    for name, values in expected.items():
        assert column(x, name) == pytest.approx(values, rel=1e-12, abs=1e-15), name


def test_compute_features_empty_state_is_neutral() -> None:
    request = SearchRequest("r", "u", (Candidate("a"), Candidate("b"), Candidate("c")), ts=5.0)
    x = compute_features(request, empty_state(request), CONFIG)
    assert column(x, "retrieval_reciprocal_rank") == pytest.approx([1, 1 / 2, 1 / 3])
    assert column(x, "item_ctr_logit") == pytest.approx([logit(0.05)] * 3)
    assert column(x, "item_trend_ctr_logit") == pytest.approx([logit(0.05)] * 3)
    assert column(x, "item_available") == [1.0] * 3
    for name in FEATURE_NAMES:
        if name not in (
            "retrieval_reciprocal_rank",
            "item_ctr_logit",
            "item_trend_ctr_logit",
            "item_available",
            "request_log_candidates",
        ):
            assert column(x, name) == [0.0] * 3, name


def test_equal_retrieval_scores_have_zero_z() -> None:
    request = SearchRequest("r", "u", (Candidate("a", 2.0), Candidate("b", 2.0)), ts=5.0)
    x = compute_features(request, empty_state(request), CONFIG)
    assert column(x, "retrieval_score_z") == [0.0, 0.0]


def test_user_state_newer_than_the_request_is_not_faded_up() -> None:
    request = SearchRequest("r", "u", (Candidate("a"),), ts=100.0)
    state = empty_state(request)
    state.user = {"_t": "200.0", "e|k": "2"}
    x = compute_features(request, state, CONFIG)
    assert column(x, "user_log_engagement") == pytest.approx([math.log(3)])


def test_user_price_level_needs_some_weight() -> None:
    request = SearchRequest("r", "u", (Candidate("a"),), ts=0.0)
    state = empty_state(request)
    state.items = [item_state_from_hash({"price": "10"})]
    state.user = {"pw": "0.04", "ps": repr(0.04 * math.log(10))}
    assert column(compute_features(request, state, CONFIG), "user_price_match") == [0.0]
    state.user = {"pw": "0.06", "ps": repr(0.06 * math.log(10))}
    assert column(compute_features(request, state, CONFIG), "user_price_match") == [
        pytest.approx(1.0)
    ]


def test_clicks_without_impressions_do_not_break_the_ctr() -> None:
    """Clicks count without impressions (no request_id, store down): the rate may pass 1."""
    request = SearchRequest("r", "u", (Candidate("a"), Candidate("b")), ts=0.0)
    state = empty_state(request)
    state.items = [
        item_state_from_hash({"clk": "500"}),
        item_state_from_hash({"imp": "1000000000", "clk": "0"}),
    ]
    x = compute_features(request, state, CONFIG)
    assert np.isfinite(x).all()
    high, low = column(x, "item_ctr_logit")
    assert high > 15.0
    assert low < -15.0


# --- writes, read back through a store -------------------------------------------------------


def test_catalog_writes() -> None:
    full = CatalogItem("i-9", "shoes/running", "acme", 59.9, "Trail", True)
    assert catalog_writes(full, CONFIG) == [
        SetFields(
            "i:i-9",
            {"avail": "1", "cat": "shoes/running", "brand": "acme", "price": "59.9"},
            180 * 86400,
        )
    ]
    assert catalog_writes(CatalogItem("i-9", available=False), CONFIG) == [
        SetFields("i:i-9", {"avail": "0"}, 180 * 86400)
    ]
    store = MemoryStore()
    store.apply(catalog_writes(full, CONFIG))
    store.apply([Increment("i:i-9", {"clk": 2})])
    store.apply(catalog_writes(CatalogItem("i-9", price=49.0, available=False), CONFIG))
    assert store.read([HashRead("i:i-9")]) == [
        {"avail": "0", "cat": "shoes/running", "brand": "acme", "price": "49.0", "clk": "2"}
    ]


def test_impression_counter_writes_with_the_prior_curve() -> None:
    request = SearchRequest(
        "r", "u", (Candidate("a"), Candidate("b"), Candidate("c")), query="Shoes"
    )
    writes = impression_counter_writes(
        request.query, ["c", "a", "b"], NO_POSITION_COUNTS, CONFIG, ts=7.0
    )
    qkey = query_key("shoes")
    e1, e2, e3 = 0.05, 0.05 / math.sqrt(2), 0.05 / math.sqrt(3)

    def trend(item_id: str) -> DecayedIncrement:
        return DecayedIncrement(f"i:{item_id}", {"t|i": 1.0}, 7.0, 3600.0, 0.001, prefix="t|")

    assert writes == [
        Increment("i:c", {"imp": 1, "exp": pytest.approx(e1)}, 180 * 86400),
        Increment("i:a", {"imp": 1, "exp": pytest.approx(e2)}, 180 * 86400),
        Increment("i:b", {"imp": 1, "exp": pytest.approx(e3)}, 180 * 86400),
        trend("c"),
        trend("a"),
        trend("b"),
        Increment("g:pos", {"i1": 1.0, "i2": 1.0, "i3": 1.0}),
        Increment(
            qkey,
            {
                "c|i": 1,
                "c|e": pytest.approx(e1),
                "a|i": 1,
                "a|e": pytest.approx(e2),
                "b|i": 1,
                "b|e": pytest.approx(e3),
            },
            30 * 86400,
        ),
    ]


def test_impression_counters_accumulate_expected_clicks_from_the_position_curve() -> None:
    config = FeatureConfig(max_position=2, position_prior_impressions=100.0, default_ctr=0.1)
    store = MemoryStore()
    positions = position_counts({"i1": "100", "c1": "30"})
    store.apply([Increment(POSITIONS_KEY, {"i1": 100, "c1": 30})])
    request = SearchRequest("r", "u", tuple(Candidate(i) for i in "abc"))  # no query
    writes = impression_counter_writes(request.query, ["a", "b", "c"], positions, config)
    assert all(w.key != query_key("") for w in writes)
    store.apply(writes)
    store.apply(writes)  # shown twice
    p1 = (30 + 100 * 0.1) / (100 + 100)  # 0.2
    p2 = 0.1 / math.sqrt(2)  # the prior: no data at position 2
    a, b, c, pos = store.read(
        [HashRead("i:a"), HashRead("i:b"), HashRead("i:c"), HashRead("g:pos")]
    )
    assert (a["imp"], b["imp"], c["imp"]) == ("2", "2", "2")
    assert float(a["exp"]) == pytest.approx(2 * p1)
    assert float(b["exp"]) == pytest.approx(2 * p2)
    assert float(c["exp"]) == pytest.approx(2 * p2)  # position 3 falls into the last bucket
    assert pos == {"i1": "102", "c1": "30", "i2": "4"}


def test_interaction_writes_of_a_click() -> None:
    click = Interaction("e", "u-1", "i-9", "click", ts=50.0, request_id="r", position=3)
    item = {"cat": "shoes", "brand": "acme", "price": "20.0"}
    writes = interaction_writes(click, item, "Running Shoes", 3, CONFIG)
    qkey = query_key("running shoes")
    assert writes == [
        DecayedIncrement(
            "u:u-1:a",
            {
                "e|k": 1.0,
                "c|shoes|k": 1.0,
                "b|acme|k": 1.0,
                "pw": 1.0,
                "ps": pytest.approx(math.log(20.0)),
            },
            50.0,
            WEEK,
            ttl=90 * 86400,
        ),
        PushRecent("u:u-1:r", "i-9\t50.0", 50, 90 * 86400),
        Increment("i:i-9", {"clk": 1}, 180 * 86400),
        DecayedIncrement("i:i-9", {"t|c": 1.0}, 50.0, 3600.0, 0.001, prefix="t|"),
        Increment("g:pos", {"c3": 1}),
        Increment(qkey, {"i-9|c": 1}, 30 * 86400),
    ]


def test_interaction_writes_of_a_purchase_of_an_unknown_item() -> None:
    buy = Interaction("e", "u-1", "i-9", "purchase", ts=50.0, value=99.0)
    writes = interaction_writes(buy, {}, "shoes", 2, CONFIG)
    assert writes == [
        DecayedIncrement("u:u-1:a", {"e|p": 1.0}, 50.0, WEEK, ttl=90 * 86400),
        PushRecent("u:u-1:r", "i-9\t50.0", 50, 90 * 86400),
        Increment("i:i-9", {"buy": 1}, 180 * 86400),
    ]
    cart = Interaction("e", "u-1", "i-9", "add_to_cart", ts=50.0)
    writes = interaction_writes(cart, {"price": "10"}, "", None, CONFIG)
    assert writes[0].amounts == {"e|a": 1.0, "pw": 3.0, "ps": pytest.approx(3 * math.log(10))}
    assert writes[2] == Increment("i:i-9", {"cart": 1}, 180 * 86400)
    assert len(writes) == 3


def _features_for(store: MemoryStore, request: SearchRequest) -> np.ndarray:
    state = read_request_state(store, request, CONFIG)
    return compute_features(request, state, CONFIG)


def test_interactions_change_the_user_features() -> None:
    store = MemoryStore()
    catalog = [
        CatalogItem("s1", "shoes", "acme", 40.0),
        CatalogItem("s2", "shoes", "zeta", 40.0),
        CatalogItem("b1", "bags", "acme", 40.0 * math.e),
    ]
    for item in catalog:
        store.apply(catalog_writes(item, CONFIG))
    request = SearchRequest("r", "u-1", (Candidate("s2"), Candidate("b1")), ts=1000.0)
    before = _features_for(store, request)
    assert column(before, "user_category_share") == [0.0, 0.0]
    assert column(before, "user_log_engagement") == [0.0, 0.0]

    def interact(kind, item_id: str, ts: float) -> None:
        (item,) = store.read([HashRead(item_key(item_id))])
        event = Interaction(f"{kind}-{item_id}-{ts}", "u-1", item_id, kind, ts)
        store.apply(interaction_writes(event, item, "", None, CONFIG))

    interact("click", "s1", 1000.0)
    x = _features_for(store, request)
    assert column(x, "user_category_share") == [1.0, 0.0]
    assert column(x, "user_category_log_count") == pytest.approx([math.log(2), 0.0])
    assert column(x, "user_brand_share") == [0.0, 1.0]  # s1 is acme, like b1
    assert column(x, "user_log_engagement") == pytest.approx([math.log(2)] * 2)
    assert column(x, "user_price_match") == pytest.approx([1.0, math.exp(-0.5 * 4)])
    assert column(x, "user_engaged_item") == [0.0, 0.0]

    interact("add_to_cart", "b1", 1000.0)
    x = _features_for(store, request)
    # engagement 1 (click) + 3 (cart): shoes 1/4, bags 3/4
    assert column(x, "user_category_share") == pytest.approx([0.25, 0.75])
    assert column(x, "user_category_conversions") == pytest.approx([0.0, math.log(2)])
    assert column(x, "user_brand_share") == pytest.approx([0.0, 1.0])
    assert column(x, "user_engaged_item") == [0.0, 1.0]
    assert column(x, "user_item_recency") == [0.0, 1.0]
    # price level: (1 x log 40 + 3 x log 40e) / 4 = log 40 + 0.75
    assert column(x, "user_price_match") == pytest.approx(
        [math.exp(-0.5 * (0.75 / 0.5) ** 2), math.exp(-0.5 * (0.25 / 0.5) ** 2)]
    )

    # a week later everything has faded by half, shares do not change
    later = SearchRequest("r2", "u-1", request.candidates, ts=1000.0 + WEEK)
    x = _features_for(store, later)
    assert column(x, "user_category_share") == pytest.approx([0.25, 0.75])
    assert column(x, "user_log_engagement") == pytest.approx([math.log1p(2.0)] * 2)
    assert column(x, "user_category_log_count") == pytest.approx([math.log1p(0.5), math.log1p(1.5)])
    assert column(x, "user_item_recency") == pytest.approx([0.0, 2.0 ** (-WEEK / 3600)])


def test_click_counters_move_item_and_query_features() -> None:
    store = MemoryStore()
    request = SearchRequest("r", "u", (Candidate("a"), Candidate("b")), query="Shoes", ts=0.0)
    store.apply(impression_counter_writes(request.query, ["a", "b"], NO_POSITION_COUNTS, CONFIG))
    click = Interaction("e", "u", "b", "click", ts=1.0, request_id="r", position=2)
    store.apply(interaction_writes(click, {}, "shoes", 2, CONFIG))
    x = _features_for(store, request)
    e2 = 0.05 / math.sqrt(2)
    # global: 2 impressions, 1 click -> (1 + 200 x 0.05) / 202
    prior_clicks = (1 + 10) / 202 * 20
    assert column(x, "item_ctr_logit") == pytest.approx(
        [logit(prior_clicks / 21), logit((1 + prior_clicks) / 21)]
    )
    assert column(x, "item_coec_log") == pytest.approx([math.log(2 / 2.05), math.log(3 / (2 + e2))])
    assert column(x, "query_item_coec_log") == pytest.approx(
        [math.log(2 / 2.05), math.log(3 / (2 + e2))]
    )
    assert column(x, "query_item_log_impressions") == pytest.approx([math.log(2)] * 2)
    (pos,) = store.read([HashRead(POSITIONS_KEY)])
    assert pos == {"i1": "1", "i2": "1", "c2": "1"}
