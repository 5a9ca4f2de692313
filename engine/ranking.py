"""Re-ranking a search request: read state once, score all candidates at once, blend, sort.

``score = CTR estimate + retrieval_weight * normalized retrieval score``. The
model already sees the retrieval rank and score among its features; the blend
term makes the retrieval order decide among items the model cannot tell apart
(a cold start) and lets a variant lean more or less on the search engine.
Sorting is stable, so equal scores keep the input order. With
``RankingConfig.diversity`` set, the personalized order is then re-picked by
maximal marginal relevance over category and brand (``engine.diversity``).

A recommendation request (``recommend``, no candidates) gets its candidates
from ``engine.item_similarity.recommendation_candidates`` (neighbours of the
user's recent items, then popular items) and is ranked like any other.

The CTR estimate is the online model's, or, once a deep model serves
(:attr:`Ranker.deep_model`), ``(1 - deep_weight) * online + deep_weight * deep``.
Both models can be swapped at any time by assignment; a request scores with the
pair it started with.

If the store is unreachable the request is answered at once in retrieval
order with ``degraded: true``; nothing blocks, and the next request tries again.

>>> from engine.messages import Candidate, SearchRequest
>>> from engine.store import MemoryStore
>>> from models.online_ctr import LinearCTR
>>> store = MemoryStore()
>>> ranker = Ranker(store, LinearCTR.prior())
>>> request = SearchRequest("r-1", "u-1", (Candidate("i-1", 3.0), Candidate("i-2", 1.0)))
>>> ranking = ranker.rank(request)
>>> [item.item_id for item in ranking.result.items], ranking.result.degraded
(['i-1', 'i-2'], False)
>>> ranker.remember(ranking)  # the impression, kept to join later clicks to
True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.diversity import diversify
from engine.features import (
    BRAND,
    CATEGORY,
    FEATURE_NAMES,
    NO_POSITION_COUNTS,
    FeatureConfig,
    PositionCounts,
    compute_features,
    impression_counter_writes,
    read_request_state,
    retrieval_scores,
)
from engine.impressions import Impression, ImpressionConfig, impression_writes
from engine.item_similarity import recommendation_candidates
from engine.messages import RankedItem, RankedResult, SearchRequest
from engine.near_cache import NearCache
from engine.store import Batch, Store, StoreUnavailable

CONTROL = "control"
PERSONALIZED = "personalized"


class CTRModel(Protocol):
    """What the ranker needs of a click-through-rate model."""

    version: int

    def predict_proba_many(self, features: np.ndarray) -> np.ndarray: ...

    def contributions(self, features: np.ndarray) -> np.ndarray: ...


class DeepCTRModel(Protocol):
    """What the ranker needs of the deep model: it also sees ids, catalog attributes and words."""

    version: int

    def predict_request(
        self,
        user_id: str,
        query: str,
        item_ids: Sequence[str],
        categories: Sequence[str],
        brands: Sequence[str],
        features: np.ndarray,
    ) -> np.ndarray: ...

    def user_item_affinity(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class RankingConfig:
    retrieval_weight: float = 0.01
    # Share of the deep model in the CTR estimate, when one serves.
    deep_weight: float = 0.25
    # Seconds shared state (items, positions) may be served from the process's near cache;
    # 0 reads everything every time (replay, where time is the log's). These are counts
    # over every shopper, which a few seconds change little; reading a hundred item hashes
    # would be most of a request's Redis time. A shopper's own state is always read fresh.
    shared_state_max_age_s: float = 5.0
    features: FeatureConfig = field(default_factory=FeatureConfig)
    impressions: ImpressionConfig = field(default_factory=ImpressionConfig)
    # MMR over category and brand after scoring (engine.diversity): the relevance weight
    # in [0, 1] (1 keeps the score order, lower mixes more); None: no diversity step.
    diversity: float | None = None
    # Candidates a recommendation request (``"recommend": true``) gathers at most.
    recommend_candidates: int = 200


@dataclass(frozen=True, slots=True)
class Ranking:
    """A ranked result, and what :meth:`Ranker.remember` needs to record it as an impression.

    Remembering happens after the result is on its way, so that the shopper does not
    wait for it; ``impression`` is ``None`` for a degraded answer (nothing to remember).
    """

    result: RankedResult
    impression: Impression | None = None
    click_probabilities: tuple[float, ...] = ()  # the model's CTR estimate per result item
    positions: PositionCounts = NO_POSITION_COUNTS  # the position counts it saw
    query: str = ""


@dataclass(slots=True)
class _Scored:
    """What every way of ranking one request shares: its state, features and model outputs."""

    request: SearchRequest
    positions: PositionCounts
    features: np.ndarray
    online: np.ndarray
    categories: list[str]
    brands: list[str]
    retrieval: np.ndarray
    model: CTRModel
    deep: DeepCTRModel | None
    deep_ctr: np.ndarray | None = None


def model_version(online: CTRModel, deep: DeepCTRModel | None = None) -> str:
    """The versions that scored a result: ``online:12``, or ``online:12+deep:3``."""
    if deep is None:
        return f"online:{online.version}"
    return f"online:{online.version}+deep:{deep.version}"


def retrieval_strength(request: SearchRequest) -> np.ndarray:
    """Retrieval scores min-max scaled to [0, 1]; the input order when scores are missing."""
    n = len(request.candidates)
    values = retrieval_scores(request)
    if not np.isnan(values).any():
        low, high = values.min(), values.max()
        if high > low:
            return (values - low) / (high - low)
    return 1.0 - np.arange(n, dtype=np.float64) / n


class Ranker:
    """Ranks search requests with the current model; ``model`` may be swapped at any time."""

    def __init__(
        self,
        store: Store,
        model: CTRModel,
        config: RankingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.model = model
        self.deep_model: DeepCTRModel | None = None
        self.config = config or RankingConfig()
        # Replays pass the event clock: how stale shared state may be then follows the
        # log, not how fast this machine happens to run it.
        self.cache = NearCache(self.config.shared_state_max_age_s, max_entries=100_000, clock=clock)

    def model_version(self) -> str:
        return model_version(self.model, self.deep_model)

    def rank(
        self,
        request: SearchRequest,
        variant: str = PERSONALIZED,
        started: float | None = None,
        config: RankingConfig | None = None,
    ) -> Ranking:
        """Rank a request for ``variant`` (``control`` keeps the retrieval order).

        ``config`` overrides the ranker's own for this request (an experiment's variant).
        """
        return self.rank_ways(request, [(variant, config)], started)[0]

    def rank_ways(
        self,
        request: SearchRequest,
        ways: Sequence[tuple[str, RankingConfig | None]],
        started: float | None = None,
    ) -> list[Ranking]:
        """Rank one request in several ways (``(variant, config)``: the two sides of an
        interleaving) from one read of its state, one feature matrix and one pass of each
        model. The ways may differ in what an experiment may override (blend, diversity),
        not in ``features``: the state is read with the first way's configuration.
        """
        started = time.perf_counter() if started is None else started
        first = ways[0][1] or self.config
        try:
            if request.recommend:
                request = recommendation_candidates(
                    self.store,
                    request,
                    first.features,
                    first.recommend_candidates,
                    self.cache,
                )
                if not request.candidates:  # nothing engaged in the shop yet
                    return [self._nothing_to_recommend(request, v, started) for v, _ in ways]
            state = read_request_state(self.store, request, first.features, self.cache)
        except StoreUnavailable:
            return [self._fallback(request, variant, started) for variant, _ in ways]

        model, deep = self.model, self.deep_model  # one pair for the request, even if swapped
        features = compute_features(request, state, first.features)
        scored = _Scored(
            request=request,
            positions=state.positions,
            features=features,
            online=model.predict_proba_many(features),
            categories=[item[CATEGORY] for item in state.items],
            brands=[item[BRAND] for item in state.items],
            retrieval=retrieval_strength(request),
            model=model,
            deep=deep,
        )
        if deep is not None and any(variant != CONTROL for variant, _ in ways):
            ids = [c.item_id for c in request.candidates]
            scored.deep_ctr = deep.predict_request(
                request.user_id, request.query, ids, scored.categories, scored.brands, features
            )
        return [
            self._ordered(scored, variant, config or self.config, started)
            for variant, config in ways
        ]

    def _ordered(
        self, scored: _Scored, variant: str, config: RankingConfig, started: float
    ) -> Ranking:
        """The result and impression of one way of ranking a scored request."""
        request, online, retrieval = scored.request, scored.online, scored.retrieval
        categories, brands, deep_ctr = scored.categories, scored.brands, None
        if variant == CONTROL:
            ctr, scores = online, retrieval
            order = np.arange(len(request.candidates))
        else:
            ctr, deep_ctr = online, scored.deep_ctr
            if deep_ctr is not None:
                ctr = (1.0 - config.deep_weight) * online + config.deep_weight * deep_ctr
            scores = ctr + config.retrieval_weight * retrieval
            order = np.argsort(-scores, kind="stable")
            if config.diversity is not None and len(order) > 1:
                attributes = [(categories[i] or None, brands[i] or None) for i in order]
                picked = diversify(scores[order].tolist(), attributes, config.diversity, request.k)
                order = order[picked]
        shown = order[: request.k] if request.k else order

        contributions = scored.model.contributions(scored.features) if request.explain else None
        affinity = None
        if request.explain and deep_ctr is not None:
            ids = [c.item_id for c in request.candidates]
            affinity = scored.deep.user_item_affinity(request.user_id, ids)
        shown_scores = scores[shown].round(6).tolist()
        items = []
        for rank, (i, score) in enumerate(zip(shown.tolist(), shown_scores, strict=True), 1):
            explain = None
            if contributions is not None:
                # Per-feature terms of the online model's logit, then each model's estimate
                # and the blend that ranked the item.
                explain = dict(zip(FEATURE_NAMES, contributions[i].round(6).tolist(), strict=True))
                explain["ctr_online"] = round(float(online[i]), 6)
                if deep_ctr is not None:
                    explain["ctr_deep"] = round(float(deep_ctr[i]), 6)
                    # The deep model's collaborative-filtering term (in its log-odds).
                    explain["user_item_affinity"] = round(float(affinity[i]), 6)
                    explain["deep_weight"] = config.deep_weight
                explain["ctr"] = round(float(ctr[i]), 6)
                explain["retrieval"] = round(float(config.retrieval_weight * retrieval[i]), 6)
            items.append(RankedItem(request.candidates[i].item_id, score, rank, explain))

        # What the shopper saw: our order when serving; the logged order when replaying a
        # log whose shoppers saw the list as it was logged.
        displayed = shown if not config.impressions.logged_order_shown else np.sort(shown)
        remembered = displayed[: config.impressions.depth].tolist()
        version = model_version(scored.model, scored.deep if variant != CONTROL else None)
        impression = Impression(
            request_id=request.request_id,
            user_id=request.user_id,
            query=request.query,
            ts=request.ts,
            item_ids=tuple(request.candidates[i].item_id for i in remembered),
            features=scored.features[remembered],
            variant=variant,
            model_version=version,
            categories=tuple(categories[i] for i in remembered),
            brands=tuple(brands[i] for i in remembered),
        )
        result = RankedResult(
            request_id=request.request_id,
            user_id=request.user_id,
            items=tuple(items),
            variant=variant,
            model_version=version,
            degraded=False,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
        return Ranking(result, impression, tuple(ctr[shown].tolist()), scored.positions)

    def remember(self, ranking: Ranking) -> bool:
        """Store the impression and count it, once per request id; False if the store is down,
        the answer was degraded or the request was seen before."""
        return self.remember_many([ranking])[0]

    def remember_many(self, rankings: Sequence[Ranking]) -> list[bool]:
        """:meth:`remember` for several rankings in one round trip."""
        shown = [(r.impression, r.positions) for r in rankings if r.impression is not None]
        batches = impression_batches(shown, self.config)
        try:
            applied = iter(self.store.apply_many(batches) if batches else [])
        except StoreUnavailable:
            return [False] * len(rankings)
        return [next(applied) if r.impression is not None else False for r in rankings]

    def _nothing_to_recommend(
        self, request: SearchRequest, variant: str, started: float
    ) -> Ranking:
        result = RankedResult(
            request_id=request.request_id,
            user_id=request.user_id,
            items=(),
            variant=variant,
            model_version=self.model_version(),
            degraded=False,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
        return Ranking(result)

    def _fallback(self, request: SearchRequest, variant: str, started: float) -> Ranking:
        strength = retrieval_strength(request)
        candidates = request.candidates[: request.k] if request.k else request.candidates
        items = tuple(
            RankedItem(c.item_id, round(float(strength[i]), 6), i + 1)
            for i, c in enumerate(candidates)
        )
        result = RankedResult(
            request_id=request.request_id,
            user_id=request.user_id,
            items=items,
            variant=variant,
            model_version=self.model_version(),
            degraded=True,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )
        return Ranking(result)


def impression_batches(
    shown: Sequence[tuple[Impression, PositionCounts]], config: RankingConfig
) -> list[Batch]:
    """The writes that remember impressions (each with the position curve its ranking saw):
    a batch per impression, claimed once by its request id."""
    batches = []
    for impression, positions in shown:
        writes = impression_writes(impression, config.impressions)
        writes += impression_counter_writes(
            impression.query, impression.item_ids, positions, config.features, impression.ts
        )
        batches.append(Batch(writes, f"rq:{impression.request_id}", config.impressions.window_s))
    return batches
