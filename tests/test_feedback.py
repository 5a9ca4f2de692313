"""Feedback: prepare/commit under redelivery, clicks joined to impressions, closed windows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.features import (
    FEATURE_NAMES,
    FeatureConfig,
    catalog_writes,
    compute_features,
    item_key,
    read_request_state,
    user_affinity_key,
    user_recent_key,
)
from engine.feedback import Feedback, FeedbackPlan
from engine.impressions import DUE_KEY, ImpressionConfig, labels_key
from engine.messages import Candidate, CatalogItem, Interaction, SearchRequest
from engine.ranking import Ranker, RankingConfig
from engine.store import HashRead, ListRead, MemoryStore, StoreUnavailable
from models.online_ctr import LinearCTR

T = 50_000.0
WINDOW = 600
CONFIG = RankingConfig(impressions=ImpressionConfig(window_s=WINDOW, close_depth=4))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[MemoryStore, Clock, Ranker, Feedback]:
    clock = Clock(T)
    store = MemoryStore(clock=clock)
    for n, item_id in enumerate("abcdef"):
        store.apply(
            catalog_writes(CatalogItem(item_id, f"cat-{n % 2}", "acme", 10.0 + n), FeatureConfig())
        )
    ranker = Ranker(store, LinearCTR.prior(), CONFIG)
    feedback = Feedback(store, CONFIG.features, CONFIG.impressions)
    return store, clock, ranker, feedback


def search(ranker: Ranker, request_id: str = "r-1", user: str = "u-1", ts: float = T):
    """Rank a-f for ``user``, remember it, return the ranked ids and the features by id."""
    request = SearchRequest(
        request_id, user, tuple(Candidate(i) for i in "abcdef"), query="Shoes", ts=ts
    )
    state = read_request_state(ranker.store, request, CONFIG.features)
    x = compute_features(request, state, CONFIG.features)
    ranking = ranker.rank(request)
    assert ranker.remember(ranking)
    ids = [item.item_id for item in ranking.result.items]
    return ids, {item_id: x[n] for n, item_id in enumerate("abcdef")}


def f32(row: np.ndarray) -> tuple[float, ...]:
    return tuple(row.astype(np.float32).astype(np.float64).tolist())


def click(event_id: str, item_id: str, ts: float, request_id: str | None = "r-1", **kw):
    return Interaction(event_id, "u-1", item_id, "click", ts, request_id=request_id, **kw)


def snapshot(store: MemoryStore, item_ids: str = "abcdef") -> list:
    return store.read(
        [
            HashRead(user_affinity_key("u-1")),
            ListRead(user_recent_key("u-1"), 50),
            HashRead("g:pos"),
            *(HashRead(item_key(i)) for i in item_ids),
        ]
    )


def test_redelivered_event_changes_nothing() -> None:
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    event = click("e-1", ids[2], T + 5.0)
    plan = feedback.prepare(event)
    assert isinstance(plan, FeedbackPlan) and plan.event_id == "e-1"
    assert len(plan.examples) == 3
    assert feedback.commit(plan) is True
    after_first = snapshot(store)
    user, recent, positions, *items = after_first
    assert float(user["e|k"]) == pytest.approx(1.0)
    assert recent == [f"{ids[2]}\t{T + 5.0}"]
    assert positions["c3"] == "1"
    assert items["abcdef".index(ids[2])]["clk"] == "1"

    # the same event again, prepared afresh (redelivery) or committed twice
    again = feedback.prepare(event)
    assert again.applied_before and again.writes == [] and again.examples == []
    assert feedback.commit(again) is False
    assert feedback.commit(plan) is False
    assert snapshot(store) == after_first
    (labels,) = store.read([HashRead(labels_key("r-1"))])
    assert labels == {"3": "+", "1": "-", "2": "-"}


def test_a_commit_that_never_happened_leaves_the_event_free() -> None:
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    event = click("e-1", ids[0], T + 5.0)
    feedback.prepare(event)  # prepared, then the worker died before committing
    assert feedback.commit(feedback.prepare(event)) is True
    assert snapshot(store)[0]["e|k"] == "1.0"


def test_a_batch_commits_as_one_and_leaves_out_the_events_applied_before() -> None:
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    assert feedback.commit(feedback.prepare(click("e-1", ids[0], T + 1)))
    batch = [click("e-1", ids[0], T + 1), click("e-2", ids[1], T + 2), click("e-2", ids[1], T + 2)]
    plans = feedback.prepare_many(batch)
    assert [p.applied_before for p in plans] == [True, False, True]  # claimed, new, repeat
    assert [len(p.examples) for p in plans] == [0, 1, 0]
    assert feedback.commit_many(plans) == [False, True, False]
    items = snapshot(store)[3:]
    assert [items["abcdef".index(i)]["clk"] for i in ids[:2]] == ["1", "1"]


def test_a_batch_whose_event_was_claimed_meanwhile_commits_event_by_event() -> None:
    """Another worker applied one of the batch's events between prepare and commit (a
    rebalance): the others still apply, each once; that one does not apply again."""
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    batch = [click("e-1", ids[0], T + 1), click("e-2", ids[1], T + 2)]
    plans = feedback.prepare_many(batch)
    assert Feedback(store, CONFIG.features, CONFIG.impressions).commit(feedback.prepare(batch[1]))
    assert feedback.commit_many(plans) == [True, False]
    items = snapshot(store)[3:]
    assert [items["abcdef".index(i)]["clk"] for i in ids[:2]] == ["1", "1"]
    assert feedback.commit_many(plans) == [False, False]


def test_click_examples_carry_the_features_at_ranking_time() -> None:
    store, clock, ranker, feedback = setup()
    ids, x = search(ranker)
    # the world changes between the ranking and the click: a click elsewhere, a new price
    store.apply(catalog_writes(CatalogItem(ids[3], price=99.0), FeatureConfig()))
    store.apply([*Feedback(store).prepare(click("other", ids[3], T + 1.0, None)).writes])
    _, later = search(ranker, request_id="r-later", ts=T + 2.0)
    assert not np.allclose(later[ids[3]], x[ids[3]])

    clock.now = T + 10.0
    plan = feedback.prepare(click("e-1", ids[3], T + 10.0))
    assert [(e.item_id, e.position, e.clicked) for e in plan.examples] == [
        (ids[3], 4, True),
        (ids[0], 1, False),
        (ids[1], 2, False),
        (ids[2], 3, False),
    ]
    for example in plan.examples:
        assert example.request_id == "r-1"
        assert example.ts == T + 10.0
        assert len(example.features) == len(FEATURE_NAMES)
        assert example.features == pytest.approx(f32(x[example.item_id]), rel=1e-7)
    assert plan.examples[0].features != pytest.approx(f32(later[ids[3]]), rel=1e-7)


def test_reported_position_counts_but_the_impression_decides_the_label() -> None:
    store, _, ranker, feedback = setup()
    ids, x = search(ranker)
    # the search layer says position 1, the impression says the item was third
    plan = feedback.prepare(click("e-1", ids[2], T + 1.0, position=1))
    assert [(e.item_id, e.position, e.clicked) for e in plan.examples][0] == (ids[2], 3, True)
    feedback.commit(plan)
    (positions,) = store.read([HashRead("g:pos")])
    assert positions["c1"] == "1" and "c3" not in positions


def test_position_comes_from_the_impression_when_not_reported() -> None:
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    feedback.commit(feedback.prepare(click("e-1", ids[4], T + 1.0)))
    (positions,) = store.read([HashRead("g:pos")])
    assert positions["c5"] == "1"


def test_clicks_without_an_impression_update_features_but_teach_nothing() -> None:
    store, _, ranker, feedback = setup()
    for event in (
        click("e-1", "a", T, request_id=None),
        click("e-2", "a", T, request_id="never-ranked"),
    ):
        plan = feedback.prepare(event)
        assert plan.examples == []
        assert feedback.commit(plan)
    ids, _ = search(ranker)
    # an item that was not in the ranked result
    plan = feedback.prepare(Interaction("e-3", "u-1", "zz", "click", T, request_id="r-1"))
    assert plan.examples == []
    user, _, _, a, *_ = snapshot(store)
    assert a["clk"] == "2"
    assert float(user["c|cat-0|k"]) == pytest.approx(2.0)


def test_second_click_gives_only_the_new_labels() -> None:
    _, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    feedback.commit(feedback.prepare(click("e-1", ids[1], T + 1.0)))
    plan = feedback.prepare(click("e-2", ids[4], T + 2.0))
    assert [(e.position, e.clicked) for e in plan.examples] == [(5, True), (3, False), (4, False)]
    feedback.commit(plan)
    plan = feedback.prepare(click("e-3", ids[0], T + 3.0))  # came back to a skipped item
    assert [(e.position, e.clicked) for e in plan.examples] == [(1, True)]


def test_close_due_gives_negatives_for_the_unlabelled_top() -> None:
    store, clock, ranker, feedback = setup()
    ids, x = search(ranker)
    search(ranker, request_id="r-2", ts=T + 100.0)
    feedback.commit(feedback.prepare(click("e-1", ids[1], T + 5.0)))

    assert feedback.close_due(T + WINDOW - 0.001) == []
    examples = feedback.close_due(T + WINDOW)
    # labelled: 2 (+), 1 (-); close_depth 4 -> 3 and 4 become negatives
    assert [(e.request_id, e.item_id, e.position, e.clicked) for e in examples] == [
        ("r-1", ids[2], 3, False),
        ("r-1", ids[3], 4, False),
    ]
    assert all(e.ts == T for e in examples)
    assert examples[0].features == pytest.approx(f32(x[ids[2]]), rel=1e-7)
    assert feedback.close_due(T + WINDOW) == []  # popped once

    later = feedback.close_due(T + 100.0 + WINDOW + 1.0)
    assert [(e.request_id, e.position) for e in later] == [("r-2", p) for p in (1, 2, 3, 4)]
    assert store.pop_due(DUE_KEY, 1e12, 10) == []


def test_closed_windows_become_one_learner_source_per_request() -> None:
    _, _, ranker, feedback = setup()
    for n in range(2):
        search(ranker, request_id=f"r-{n}", ts=T + n)
    sources = feedback.close_due_sources(T + WINDOW + 10)
    assert [source for source, _ in sources] == ["close:r-0", "close:r-1"]
    assert [[(e.request_id, e.position) for e in group] for _, group in sources] == [
        [(f"r-{n}", p) for p in (1, 2, 3, 4)] for n in range(2)
    ]
    assert feedback.close_due_sources(T + WINDOW + 10) == []  # popped once


def test_close_due_limit_and_expired_impressions() -> None:
    _, clock, ranker, feedback = setup()
    for n in range(3):
        search(ranker, request_id=f"r-{n}", ts=T + n)
    assert {e.request_id for e in feedback.close_due(T + WINDOW + 10, limit=2)} == {"r-0", "r-1"}
    # the blob of r-2 has expired (kept window + 300 s): its close teaches nothing
    clock.now = T + WINDOW + 301.0 + 2
    assert feedback.close_due(T + 10 * WINDOW) == []


@pytest.mark.parametrize(("kind", "counter"), [("add_to_cart", "cart"), ("purchase", "buy")])
def test_carts_and_purchases_count_but_teach_no_examples(kind: str, counter: str) -> None:
    store, _, ranker, feedback = setup()
    ids, _ = search(ranker)
    event = Interaction("e-1", "u-1", ids[2], kind, T + 5.0, request_id="r-1", value=20.0)
    plan = feedback.prepare(event)
    assert plan.examples == []
    assert feedback.commit(plan) is True
    assert feedback.commit(feedback.prepare(event)) is False
    user, recent, positions, *items = snapshot(store)
    item = items["abcdef".index(ids[2])]
    assert item[counter] == "1"
    assert "clk" not in item
    code = {"add_to_cart": "a", "purchase": "p"}[kind]
    assert float(user[f"e|{code}"]) == pytest.approx(1.0)
    assert "e|k" not in user
    assert recent == [f"{ids[2]}\t{T + 5.0}"]
    assert not any(name.startswith("c") for name in positions)  # no click at any position
    (labels,) = store.read([HashRead(labels_key("r-1"))])
    assert labels == {}
    # and a later click still labels the whole page above it
    plan = feedback.prepare(click("e-2", ids[2], T + 6.0))
    assert [(e.position, e.clicked) for e in plan.examples] == [(3, True), (1, False), (2, False)]


def test_prepare_raises_when_the_store_is_down() -> None:
    class Down(MemoryStore):
        def read(self, reads):
            raise StoreUnavailable("down")

    with pytest.raises(StoreUnavailable):
        Feedback(Down()).prepare(click("e-1", "a", T))


def test_a_batch_of_clicks_on_one_result_labels_like_one_after_the_other() -> None:
    store = MemoryStore(clock=lambda: T)
    ranker = Ranker(store, LinearCTR.prior())
    request = SearchRequest(
        "r-b", "u-b", tuple(Candidate(i, 5.0 - n) for n, i in enumerate("abcde")), ts=T
    )
    assert ranker.remember(ranker.rank(request))
    feedback = Feedback(store)
    clicks = [
        Interaction("e-c", "u-b", "c", "click", ts=T + 1, request_id="r-b"),
        Interaction("e-e", "u-b", "e", "click", ts=T + 2, request_id="r-b"),
        Interaction("e-c", "u-b", "c", "click", ts=T + 1, request_id="r-b"),  # redelivered
    ]
    plans = feedback.prepare_many(clicks)
    labelled = [[(e.item_id, e.clicked) for e in plan.examples] for plan in plans]
    assert labelled[0] == [("c", True), ("a", False), ("b", False)]
    assert labelled[1] == [("e", True), ("d", False)]  # a and b were labelled by the first
    assert feedback.commit_many(plans) == [True, True, False]
    (item_c,) = store.read([HashRead("i:c")])
    assert item_c["clk"] == "1"


def test_prepare_many_with_experiments_adds_their_counts_to_each_plan() -> None:
    from engine.experiment_config import default_config
    from engine.experiment_metrics import ExperimentCounter, ServedRequest

    plans_of = []
    for with_counter in (True, False):
        store = MemoryStore(clock=lambda: T)
        counter = ExperimentCounter(store, default_config("s"))
        served = ServedRequest("r-1", "u-1", {"default": "personalized"}, ("a", "b", "c"), 1.0)
        store.apply_many(counter.request_batches([served], now=T))
        batch = [
            Interaction("e-1", "u-1", "b", "click", T + 1, "r-1", 2),
            Interaction("e-2", "u-1", "c", "click", T + 2, "r-1", 3),
            Interaction("e-3", "u-1", "c", "purchase", T + 3, None, None, 9.0),
        ]
        feedback = Feedback(store)
        if with_counter:
            plans_of.append(feedback.prepare_many(batch, counter, T + 4))
        else:
            plans = feedback.prepare_many(batch)
            for plan, writes in zip(plans, counter.interaction_writes(batch, T + 4), strict=True):
                plan.writes.extend(writes)
            plans_of.append(plans)
    assert plans_of[0] == plans_of[1]
    assert any(w.key.startswith("xp:") for w in plans_of[0][0].writes)


def test_a_batch_prepared_while_the_one_before_commits_changes_what_it_would_after() -> None:
    """The worker prepares batch 2 before batch 1's commit applies, on the state batch 1
    leaves (``Unapplied``): the store ends as if they had gone one after the other."""
    from engine.experiment_config import default_config
    from engine.experiment_metrics import ExperimentCounter, ServedRequest

    def shop() -> tuple[MemoryStore, Feedback, ExperimentCounter, list[str]]:
        store, _, ranker, _ = setup()
        feedback = Feedback(store, CONFIG.features, CONFIG.impressions)
        counter = ExperimentCounter(store, default_config("s"))
        ids, _ = search(ranker, "r-1")
        served = ServedRequest("r-1", "u-1", {"default": "personalized"}, tuple(ids), 1.0)
        assert store.apply_many(counter.request_batches([served], now=T)) == [True]
        return store, feedback, counter, ids

    def batches(ids: list[str]) -> list[list[Interaction]]:
        # The same user and page in both: recent items, labels and experiment totals carry.
        return [
            [click("e-1", ids[3], T + 1), click("e-2", ids[1], T + 2)],
            [click("e-3", ids[4], T + 3), click("e-4", ids[0], T + 4), click("e-2", ids[1], T + 2)],
        ]

    store, feedback, counter, ids = shop()
    for batch in batches(ids):
        plans = feedback.prepare_many(batch, counter, T + 5)
        feedback.commit_many(plans)
    one_after_other = store

    store, feedback, counter, ids = shop()
    first, second = batches(ids)
    plans_1, leaves = feedback.prepare_batch(first, counter, T + 5)
    plans_2, _ = feedback.prepare_batch(second, counter, T + 5, unapplied=leaves)
    assert [p.applied_before for p in plans_2] == [False, False, False]  # e-2: not yet claimed
    assert feedback.commit_many(plans_1) == [True, True]
    assert feedback.commit_many(plans_2) == [True, True, False]  # e-2 after all: one by one
    # Committed event by event, e-3 and e-4 changed what they would have after e-2.
    assert _contents(store) == _contents(one_after_other)
    without_overlay = shop()
    plans_1 = without_overlay[1].prepare_batch(first, without_overlay[2], T + 5)[0]
    plans_2 = without_overlay[1].prepare_batch(second[:2], without_overlay[2], T + 5)[0]
    without_overlay[1].commit_many(plans_1)
    without_overlay[1].commit_many(plans_2)
    assert _contents(without_overlay[0]) != _contents(one_after_other)  # the overlay matters


def _contents(store: MemoryStore) -> dict:
    return {
        key: entry.value if not isinstance(entry.value, list) else list(entry.value)
        for key, entry in store._entries.items()
        if not key.startswith(("ev:", "rq:", "xq:"))
    }
