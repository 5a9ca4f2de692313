"""Replay a native event log through the serving code, in process, test-then-train.

The same parsers, features, ranker, feedback and online learner as the worker
run here over a :class:`~engine.store.MemoryStore` whose clock is the log's
time. Each request is ranked with what was learned from the events before it;
its clicks (interactions carrying its ``request_id``) are learned afterwards and
judge the ranking. Baselines are computed in the same pass: the input order,
and an online popularity ranking (smoothed CTR ``(clicks + 0.1) / (shown + 2)``).

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
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.features import FeatureConfig, catalog_writes
from engine.feedback import Feedback
from engine.impressions import ImpressionConfig
from engine.messages import parse_catalog_item, parse_interaction, parse_search_request
from engine.ranking import Ranker, Ranking, RankingConfig
from engine.store import MemoryStore
from models.metrics import RankingMetrics
from models.online_ctr import LinearCTR
from models.online_learner import OnlineLearner

POPULARITY_PRIOR = (0.1, 2.0)


@dataclass
class _Shown:
    """A ranked request waiting for its clicks: each ranking's order and scores."""

    orders: dict[str, list[str]]
    scores: dict[str, dict[str, float]]
    probabilities: dict[str, float]


@dataclass
class ReplayOptions:
    learning_rate: float = 0.05
    l2: float = 1e-4
    optimizer: str = "ftrl"
    standardize: bool = True
    retrieval_weight: float = 0.01
    # Offline, every shown item of a log without positions is a labelled example when the
    # window closes: the shopper saw the logged list, not our order.
    close_depth: int = 1000
    window_s: int = 1800
    close_every_s: float = 60.0
    logged_order_shown: bool = True
    features: FeatureConfig = field(default_factory=FeatureConfig)


def replay(
    events: Iterable[dict[str, Any]],
    options: ReplayOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the events through the engine and return the report of DESIGN.md."""
    options = options or ReplayOptions()
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    config = RankingConfig(
        retrieval_weight=options.retrieval_weight,
        shared_state_max_age_s=0.0,  # the log's clock, not the wall's, says what is fresh
        features=options.features,
        impressions=ImpressionConfig(
            window_s=options.window_s,
            depth=options.close_depth,
            close_depth=options.close_depth,
            logged_order_shown=options.logged_order_shown,
        ),
    )
    learner = OnlineLearner(
        store,
        publish_every_s=0.0,
        learning_rate=options.learning_rate,
        l2=options.l2,
        optimizer=options.optimizer,
        standardize=options.standardize,
    )
    ranker = Ranker(store, LinearCTR.prior(), config)
    feedback = Feedback(store, config.features, config.impressions)
    shown_counts: dict[str, float] = {}
    click_counts: dict[str, float] = {}
    waiting: dict[str, _Shown] = {}
    clicked: dict[str, set[str]] = {}
    requests = 0
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
            requests += 1
            ids = [c.item_id for c in request.candidates]
            model_scores = {item.item_id: item.score for item in ranking.result.items}
            popularity = {
                i: (click_counts.get(i, 0.0) + POPULARITY_PRIOR[0])
                / (shown_counts.get(i, 0.0) + POPULARITY_PRIOR[1])
                for i in ids
            }
            probabilities = _probabilities(ranking)
            waiting[request.request_id] = _Shown(
                orders={
                    "streamrank": [item.item_id for item in ranking.result.items],
                    "input_order": ids,
                    "popularity": sorted(ids, key=lambda i: -popularity[i]),
                },
                scores={
                    "streamrank": model_scores,
                    "input_order": {i: -float(k) for k, i in enumerate(ids)},
                    "popularity": popularity,
                },
                probabilities=probabilities,
            )
            for i in ids:
                shown_counts[i] = shown_counts.get(i, 0.0) + 1.0
        elif stream == "interactions":
            interaction = parse_interaction(raw)
            now[0] = interaction.ts
            plan = feedback.prepare(interaction)
            if feedback.commit(plan):
                if learner.learn(interaction.event_id, plan.examples):
                    learned_since_snapshot = True
                if interaction.type == "click":
                    click_counts[interaction.item_id] = (
                        click_counts.get(interaction.item_id, 0.0) + 1.0
                    )
                    shown = waiting.get(interaction.request_id)
                    if shown is not None and interaction.item_id in shown.scores["input_order"]:
                        clicked.setdefault(interaction.request_id, set()).add(interaction.item_id)
        elif stream == "catalog":
            store.apply(catalog_writes(parse_catalog_item(raw), config.features))
        if next_close is None or now[0] >= next_close:
            for example in feedback.close_due(now[0], limit=100_000):
                learner.learn(f"close:{example.request_id}:{example.position}", [example])
                learned_since_snapshot = True
            next_close = now[0] + options.close_every_s
        if progress is not None and n % 1000 == 0:
            progress(n)

    return _report(waiting, clicked, requests, time.perf_counter() - started)


def _probabilities(ranking: Ranking) -> dict[str, float]:
    """The model's CTR estimate per item (the ranking score holds the blend)."""
    return dict(
        zip(
            (item.item_id for item in ranking.result.items),
            ranking.click_probabilities,
            strict=True,
        )
    )


def _report(
    waiting: dict[str, _Shown], clicked: dict[str, set[str]], requests: int, elapsed: float
) -> dict[str, Any]:
    metrics = {name: RankingMetrics() for name in ("streamrank", "input_order", "popularity")}
    for request_id, shown in waiting.items():
        clicks = clicked.get(request_id)
        if not clicks:
            continue
        for name, order in shown.orders.items():
            labels = [i in clicks for i in order]
            scores = [shown.scores[name][i] for i in order]
            probabilities = (
                [shown.probabilities[i] for i in order]
                if name == "streamrank"
                else scores
                if name == "popularity"
                else None
            )
            metrics[name].add(labels, scores, probabilities)
    return {
        "requests": requests,
        "requests_with_clicks": sum(1 for r in waiting if clicked.get(r)),
        "metrics": metrics["streamrank"].summary(),
        "baselines": {
            "input_order": metrics["input_order"].summary(),
            "popularity": metrics["popularity"].summary(),
        },
        "elapsed_s": round(elapsed, 3),
    }
