"""Every ranking feature: what it means, where its state lives, how it is computed.

State lives in the store under these keys (all with TTLs):

========================  ======================================================================
key                       content
========================  ======================================================================
``u:{user}:a``            user's decayed engagement counts: ``c|{category}|{k,a,p}`` and
                          ``b|{brand}|{k,a,p}`` (click, add-to-cart, purchase), totals
                          ``e|{k,a,p}``, price level ``pw`` / ``ps`` (weight, weighted log price)
``u:{user}:r``            the user's last N engaged items, ``"{item_id}\\t{ts}"``, newest first
``i:{item}``              catalog attributes ``cat``, ``brand``, ``price``, ``avail`` and counters
                          ``imp``, ``clk``, ``cart``, ``buy``, ``exp`` (expected clicks)
``q:{query digest}``      per query and item: ``{item}|i`` impressions, ``{item}|c`` clicks,
                          ``{item}|e`` expected clicks
``g:pos``                 impressions ``i{p}`` and clicks ``c{p}`` at each position ``p``
========================  ======================================================================

Position bias: an item shown at position 1 is clicked more than the same item
at position 8 because it is seen more. Each impression at position ``p`` adds
the global click-through rate at ``p`` to the item's *expected clicks*; clicks
over expected clicks (COEC) is then a click-through rate freed of where the
item happened to be shown: above 1 the item beats an average item at the same
positions, below 1 it does worse. It is smoothed towards 1 by a prior worth
``coec_prior_clicks`` expected clicks.

The features, in the column order of :func:`compute_features`:
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from engine.messages import CatalogItem, Interaction, SearchRequest
from engine.store import (
    DecayedIncrement,
    FieldsRead,
    HashRead,
    Increment,
    ListRead,
    PushRecent,
    Read,
    SetFields,
    Write,
    decay_factor,
)


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    scope: str
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature("retrieval_reciprocal_rank", "request", "1 / (1 + place in the retrieval order)"),
    Feature("retrieval_score_z", "request", "retrieval score standardized within the request"),
    Feature("item_ctr_logit", "item", "logit of clicks / impressions, smoothed to the global CTR"),
    Feature("item_coec_log", "item", "log of clicks over expected clicks (position-debiased CTR)"),
    Feature("item_log_impressions", "item", "log(1 + impressions): how much the CTR is worth"),
    Feature("item_cart_rate", "item", "add-to-carts / (clicks + 5): shrunk to 0 when unproven"),
    Feature("item_purchase_rate", "item", "purchases / (clicks + 5)"),
    Feature("item_available", "item", "0 when the catalog says the item is unavailable"),
    Feature("query_item_coec_log", "query-item", "log COEC of the item for this query"),
    Feature("query_item_log_impressions", "query-item", "log(1 + impressions for this query)"),
    Feature("user_category_share", "user-item", "share of the user's engagement in this category"),
    Feature("user_category_log_count", "user-item", "log(1 + user's engagement in this category)"),
    Feature("user_category_conversions", "user-item", "log(1 + carts and purchases, category)"),
    Feature("user_brand_share", "user-item", "share of the user's engagement with this brand"),
    Feature("user_engaged_item", "user-item", "1 if the item is among the user's last N items"),
    Feature(
        "user_item_recency", "user-item", "2^(-age / recency half-life) of the last engagement"
    ),
    Feature("user_price_match", "user-item", "closeness of the price to the user's price level"),
    Feature("user_log_engagement", "user", "log(1 + the user's decayed engagement)"),
    # Long lists have lower CTR per item and smaller reciprocal ranks: without this,
    # a pointwise model reads list length as a position effect.
    Feature("request_log_candidates", "request", "log(number of candidates)"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
__doc__ += "\n".join(f"- ``{f.name}`` ({f.scope}): {f.meaning}" for f in FEATURES)

# Engagement letters in the user hash, and how much each is worth in the shares.
ENGAGEMENT_CODES = {"click": "k", "add_to_cart": "a", "purchase": "p"}
ENGAGEMENT_WEIGHTS = {"k": 1.0, "a": 3.0, "p": 5.0}


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """How features are computed and how long their state lives."""

    user_half_life_s: float = 7 * 86400.0
    recent_items: int = 50
    recency_half_life_s: float = 3600.0
    ctr_prior_impressions: float = 20.0
    coec_prior_clicks: float = 2.0
    default_ctr: float = 0.05
    max_position: int = 50
    position_prior_impressions: float = 200.0
    price_tolerance: float = 0.5  # in log-price units
    user_ttl_s: int = 90 * 86400
    item_ttl_s: int = 180 * 86400
    query_ttl_s: int = 30 * 86400


# --- keys ------------------------------------------------------------------------------------

POSITIONS_KEY = "g:pos"


def user_affinity_key(user_id: str) -> str:
    return f"u:{user_id}:a"


def user_recent_key(user_id: str) -> str:
    return f"u:{user_id}:r"


def item_key(item_id: str) -> str:
    return f"i:{item_id}"


def normalize_query(query: str) -> str:
    """Lower-case, single-spaced: "Running  Shoes" and "running shoes" are one query."""
    return " ".join(query.lower().split())


def query_key(query: str) -> str | None:
    """The key of a query's per-item counters (a digest bounds the key length)."""
    normalized = normalize_query(query)
    if not normalized:
        return None
    return "q:" + hashlib.blake2b(normalized.encode(), digest_size=8).hexdigest()


# --- position bias -----------------------------------------------------------------------------


def position_ctr(positions: dict[str, str], config: FeatureConfig) -> np.ndarray:
    """Global click-through rate at positions 1..max_position (index 0 = position 1).

    Smoothed towards a prior curve ``default_ctr / sqrt(p)`` so that positions
    with few impressions still get a sensible value.
    """
    p = np.arange(1, config.max_position + 1, dtype=np.float64)
    prior = config.default_ctr / np.sqrt(p)
    shown = np.array([float(positions.get(f"i{int(i)}", 0)) for i in p])
    clicked = np.array([float(positions.get(f"c{int(i)}", 0)) for i in p])
    m = config.position_prior_impressions
    return (clicked + m * prior) / (shown + m)


def position_index(position: int, config: FeatureConfig) -> int:
    """Positions past ``max_position`` share the last bucket."""
    return min(position, config.max_position)


# --- reading a request's state -------------------------------------------------------------


@dataclass(slots=True)
class RequestState:
    """Everything the store knows that matters for one request, read in one round trip."""

    user: dict[str, str]
    recent: list[str]
    items: list[dict[str, str]]
    query_counts: list[str | None]
    positions: dict[str, str]


def request_reads(request: SearchRequest, config: FeatureConfig) -> list[Read]:
    """The reads that :func:`state_from_replies` turns into a :class:`RequestState`."""
    reads: list[Read] = [
        HashRead(user_affinity_key(request.user_id)),
        ListRead(user_recent_key(request.user_id), config.recent_items),
        HashRead(POSITIONS_KEY),
    ]
    reads += [HashRead(item_key(c.item_id)) for c in request.candidates]
    qkey = query_key(request.query)
    if qkey is not None:
        fields = tuple(f"{c.item_id}|{s}" for c in request.candidates for s in "ice")
        reads.append(FieldsRead(qkey, fields))
    return reads


def state_from_replies(request: SearchRequest, replies: list) -> RequestState:
    n = len(request.candidates)
    query_counts = replies[3 + n] if len(replies) > 3 + n else [None] * (3 * n)
    return RequestState(
        user=replies[0],
        recent=replies[1],
        positions=replies[2],
        items=replies[3 : 3 + n],
        query_counts=query_counts,
    )


def empty_state(request: SearchRequest) -> RequestState:
    n = len(request.candidates)
    return RequestState({}, [], [{}] * n, [None] * (3 * n), {})


# --- computing features ----------------------------------------------------------------------


def _num(fields: dict[str, str], name: str) -> float:
    value = fields.get(name)
    return float(value) if value else 0.0


def _logit(p: float) -> float:
    # Clicks are counted without impressions too (clicks from outside a ranked result, or
    # while the store was down), so a smoothed rate can reach 1 or more: clamp it rather
    # than raise a math domain error that would stop the rank agent.
    p = min(max(p, 1e-9), 1.0 - 1e-9)
    return math.log(p / (1.0 - p))


def global_ctr(positions: dict[str, str], config: FeatureConfig) -> float:
    """Clicks over impressions over all positions, smoothed to ``default_ctr``."""
    shown = sum(float(v) for k, v in positions.items() if k.startswith("i"))
    clicked = sum(float(v) for k, v in positions.items() if k.startswith("c"))
    m = config.position_prior_impressions
    return (clicked + m * config.default_ctr) / (shown + m)


def compute_features(
    request: SearchRequest, state: RequestState, config: FeatureConfig
) -> np.ndarray:
    """The feature matrix of a request: one row per candidate, one column per feature.

    >>> from engine.messages import Candidate, SearchRequest
    >>> request = SearchRequest("r-1", "u-1", (Candidate("i-1", 2.0), Candidate("i-2", 1.0)))
    >>> x = compute_features(request, empty_state(request), FeatureConfig())
    >>> x.shape, x[:, FEATURE_NAMES.index("retrieval_reciprocal_rank")].tolist()
    ((2, 19), [1.0, 0.5])
    """
    n = len(request.candidates)
    now = request.ts
    user = state.user
    fade = decay_factor(now - float(user.get("_t", now)), config.user_half_life_s)
    engagement_total = fade * sum(
        weight * _num(user, f"e|{code}") for code, weight in ENGAGEMENT_WEIGHTS.items()
    )
    price_weight = _num(user, "pw")
    user_log_price = _num(user, "ps") / price_weight if price_weight > 0.05 else None
    last_engaged: dict[str, float] = {}
    for entry in state.recent:
        item_id, _, ts = entry.partition("\t")
        last_engaged.setdefault(item_id, float(ts or 0.0))

    prior_ctr = global_ctr(state.positions, config)
    ctr_prior_clicks = prior_ctr * config.ctr_prior_impressions
    coec_m = config.coec_prior_clicks
    rows = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float64)
    scores = [c.score for c in request.candidates]
    known = [s for s in scores if s is not None]
    mean = sum(known) / len(known) if known else 0.0
    spread = math.sqrt(sum((s - mean) ** 2 for s in known) / len(known)) if known else 0.0

    log_candidates = math.log(n)
    for i, candidate in enumerate(request.candidates):
        item = state.items[i]
        impressions, clicks = _num(item, "imp"), _num(item, "clk")
        category, brand = item.get("cat"), item.get("brand")
        category_counts = _engagement(user, f"c|{category}|", fade) if category else (0.0, 0.0)
        brand_counts = _engagement(user, f"b|{brand}|", fade) if brand else (0.0, 0.0)
        q_shown, q_clicked, q_expected = (
            float(v) if v else 0.0 for v in state.query_counts[3 * i : 3 * i + 3]
        )
        price = _num(item, "price")
        last = last_engaged.get(candidate.item_id)
        score = scores[i]
        rows[i] = (
            1.0 / (1.0 + i),
            (score - mean) / spread if score is not None and spread > 0 else 0.0,
            _logit((clicks + ctr_prior_clicks) / (impressions + config.ctr_prior_impressions)),
            math.log((clicks + coec_m) / (_num(item, "exp") + coec_m)),
            math.log1p(impressions),
            _num(item, "cart") / (clicks + 5.0),
            _num(item, "buy") / (clicks + 5.0),
            0.0 if item.get("avail") == "0" else 1.0,
            math.log((q_clicked + coec_m) / (q_expected + coec_m)),
            math.log1p(q_shown),
            category_counts[0] / engagement_total if engagement_total > 0 else 0.0,
            math.log1p(category_counts[0]),
            math.log1p(category_counts[1]),
            brand_counts[0] / engagement_total if engagement_total > 0 else 0.0,
            1.0 if last is not None else 0.0,
            decay_factor(now - last, config.recency_half_life_s) if last is not None else 0.0,
            _price_match(price, user_log_price, config.price_tolerance),
            math.log1p(engagement_total),
            log_candidates,
        )
    return rows


def _engagement(user: dict[str, str], prefix: str, fade: float) -> tuple[float, float]:
    """(weighted engagement, carts + purchases) of one category or brand, decayed to now."""
    clicks = _num(user, prefix + "k")
    carts = _num(user, prefix + "a")
    purchases = _num(user, prefix + "p")
    weighted = clicks + ENGAGEMENT_WEIGHTS["a"] * carts + ENGAGEMENT_WEIGHTS["p"] * purchases
    return fade * weighted, fade * (carts + purchases)


def _price_match(price: float, user_log_price: float | None, tolerance: float) -> float:
    if price <= 0 or user_log_price is None:
        return 0.0
    distance = math.log(price) - user_log_price
    return math.exp(-0.5 * (distance / tolerance) ** 2)


# --- updating feature state ------------------------------------------------------------------


def catalog_writes(item: CatalogItem, config: FeatureConfig) -> list[Write]:
    """Catalog attributes of an item (absent fields keep their stored value)."""
    values = {"avail": "1" if item.available else "0"}
    if item.category is not None:
        values["cat"] = item.category
    if item.brand is not None:
        values["brand"] = item.brand
    if item.price is not None:
        values["price"] = repr(item.price)
    return [SetFields(item_key(item.item_id), values, config.item_ttl_s)]


def impression_counter_writes(
    request: SearchRequest,
    shown_item_ids: list[str],
    positions: dict[str, str],
    config: FeatureConfig,
) -> list[Write]:
    """Count one impression for each shown item at its position, with its expected clicks."""
    expected = position_ctr(positions, config)
    qkey = query_key(request.query)
    writes: list[Write] = []
    per_position: dict[str, float] = {}
    per_query: dict[str, float] = {}
    for rank, item_id in enumerate(shown_item_ids, start=1):
        bucket = position_index(rank, config)
        e = float(expected[bucket - 1])
        writes.append(Increment(item_key(item_id), {"imp": 1, "exp": e}, config.item_ttl_s))
        per_position[f"i{bucket}"] = per_position.get(f"i{bucket}", 0.0) + 1
        if qkey is not None:
            per_query[f"{item_id}|i"] = 1
            per_query[f"{item_id}|e"] = e
    writes.append(Increment(POSITIONS_KEY, per_position))
    if per_query:
        writes.append(Increment(qkey, per_query, config.query_ttl_s))
    return writes


def interaction_writes(
    interaction: Interaction,
    item: dict[str, str],
    query: str,
    position: int | None,
    config: FeatureConfig,
) -> list[Write]:
    """What an interaction changes: the user's tastes, the item's and the query's counters.

    ``item`` is the item's stored attributes, ``query`` and ``position`` come from
    the ranked result the interaction refers to (empty and ``None`` if none).
    """
    code = ENGAGEMENT_CODES[interaction.type]
    tastes = {f"e|{code}": 1.0}
    category, brand, price = item.get("cat"), item.get("brand"), _num(item, "price")
    if category:
        tastes[f"c|{category}|{code}"] = 1.0
    if brand:
        tastes[f"b|{brand}|{code}"] = 1.0
    if price > 0:
        weight = ENGAGEMENT_WEIGHTS[code]
        tastes["pw"] = weight
        tastes["ps"] = weight * math.log(price)
    writes: list[Write] = [
        DecayedIncrement(
            user_affinity_key(interaction.user_id),
            tastes,
            interaction.ts,
            config.user_half_life_s,
            ttl=config.user_ttl_s,
        ),
        PushRecent(
            user_recent_key(interaction.user_id),
            f"{interaction.item_id}\t{interaction.ts}",
            config.recent_items,
            config.user_ttl_s,
        ),
    ]
    counter = {"click": "clk", "add_to_cart": "cart", "purchase": "buy"}[interaction.type]
    writes.append(Increment(item_key(interaction.item_id), {counter: 1}, config.item_ttl_s))
    if interaction.type == "click":
        if position is not None:
            writes.append(Increment(POSITIONS_KEY, {f"c{position_index(position, config)}": 1}))
        qkey = query_key(query)
        if qkey is not None:
            writes.append(Increment(qkey, {f"{interaction.item_id}|c": 1}, config.query_ttl_s))
    return writes
