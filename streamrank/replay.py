"""Replay a native event log through the serving code, in process, test-then-train.

The same parsers, features, ranker, feedback and online learner as the worker
run here over a :class:`~engine.store.MemoryStore` whose clock is the log's
time. Each request is ranked with what was learned from the events before it;
its clicks (interactions carrying its ``request_id``) are learned afterwards and
judge the ranking (:class:`~streamrank.evaluation.Judge`, which also computes the
baselines in the same pass: the input order, online popularity and click count, item-kNN).

>>> events = [
...     {"stream": "search-requests", "request_id": "r-1", "user_id": "u-1", "ts": 1.0,
...      "candidates": [{"item_id": "a"}, {"item_id": "b"}]},
...     {"stream": "interactions", "event_id": "e-1", "user_id": "u-1", "item_id": "b",
...      "type": "click", "request_id": "r-1", "ts": 2.0},
... ]
>>> report = replay(events)
>>> report["requests"], report["requests_with_clicks"], report["metrics"]["mrr"]
(1, 1, 0.5)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from engine.features import FeatureConfig, catalog_writes
from engine.feedback import Feedback
from engine.impressions import ImpressionConfig
from engine.messages import (
    SearchRequest,
    parse_catalog_item,
    parse_interaction,
    parse_search_request,
)
from engine.ranking import Ranker, Ranking, RankingConfig
from engine.store import MemoryStore
from models.online_ctr import LinearCTR
from models.online_learner import OnlineLearner
from models.profile import RankingProfile
from streamrank.evaluation import Judge


@dataclass
class ReplayOptions:
    profile: RankingProfile = field(default_factory=RankingProfile)
    # Offline, every shown item of a log without positions is a labelled example when the
    # window closes: the shopper saw the logged list, not our order.
    close_depth: int = 1000
    window_s: int = 1800
    close_every_s: float = 60.0
    logged_order_shown: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)
    # The co-engagement features (engine.item_similarity); False for the without-comparison.
    similarity: bool = True

    def ranking_config(self) -> RankingConfig:
        return RankingConfig(
            retrieval_weight=self.profile.retrieval_weight,
            deep_weight=self.profile.deep_weight,
            diversity=self.profile.diversity,
            shared_state_max_age_s=0.0,  # the log's clock, not the wall's, says what is fresh
            features=replace(
                self.features, similarity=self.similarity and self.features.similarity
            ),
            impressions=ImpressionConfig(
                window_s=self.window_s,
                depth=self.close_depth,
                close_depth=self.close_depth,
                logged_order_shown=self.logged_order_shown,
            ),
        )


# Called with each request and its ranking, before any of its clicks is learned.
RankedHook = Callable[[SearchRequest, Ranking], None]


def replay(
    events: Iterable[dict[str, Any]],
    options: ReplayOptions | None = None,
    progress: Callable[[int], None] | None = None,
    on_ranked: RankedHook | None = None,
    judge: Judge | None = None,
) -> dict[str, Any]:
    """Run the events through the engine and return the report of DESIGN.md.

    ``on_ranked`` sees every ranking as it is made (its impression holds the features);
    pass a ``judge`` to keep the rankings and clicks for reports on parts of the log.
    """
    options = options or ReplayOptions()
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    config = options.ranking_config()
    learner = OnlineLearner(store, publish_every_s=0.0, **options.profile.learner_options())
    ranker = Ranker(store, LinearCTR.prior(), config)
    feedback = Feedback(store, config.features, config.impressions)
    judge = judge if judge is not None else Judge(options.window_s)
    learned_since_snapshot = False
    next_close = None
    started = time.perf_counter()

    for n, event in enumerate(events, start=1):
        stream = event.get("stream")
        raw = orjson.dumps({k: v for k, v in event.items() if k != "stream"})
        if stream == "search-requests":
            request = parse_search_request(raw)
            now[0] = request.ts
            if learned_since_snapshot and learner.model.ready():
                ranker.model = learner.model.snapshot(learner.version)
                learned_since_snapshot = False
            ranking = ranker.rank(request)
            ranker.remember(ranking)
            items = ranking.result.items
            judge.ranked(
                request.request_id,
                [c.item_id for c in request.candidates],
                ranked=[item.item_id for item in items],
                scores=[item.score for item in items],
                click_probabilities=ranking.click_probabilities,
                ts=request.ts,
                user_id=request.user_id,
            )
            if on_ranked is not None:
                on_ranked(request, ranking)
        elif stream == "interactions":
            interaction = parse_interaction(raw)
            now[0] = interaction.ts
            plan = feedback.prepare(interaction)
            if feedback.commit(plan):
                if learner.learn(interaction.event_id, plan.examples):
                    learned_since_snapshot = True
                if interaction.type == "click":
                    judge.clicked(
                        interaction.request_id,
                        interaction.item_id,
                        interaction.ts,
                        user_id=interaction.user_id,
                    )
        elif stream == "catalog":
            store.apply(catalog_writes(parse_catalog_item(raw), config.features))
        if next_close is None or now[0] >= next_close:
            if learner.learn_many(feedback.close_due_sources(now[0], limit=100_000)):
                learned_since_snapshot = True
            judge.settle(now[0] - options.window_s)
            next_close = now[0] + options.close_every_s
        if progress is not None and n % 1000 == 0:
            progress(n)

    return judge.report(time.perf_counter() - started)
