"""Item-to-item similarity learned from the stream of engagements (collaborative filtering).

Shoppers who click, cart or buy one item often engage another soon after: a
phone and its case, two shirts of one brand. When a user engages an item, it is
paired with the items the user engaged shortly before (from the user's recent
items list ``u:{user}:r`` that the features already keep), and each pair adds
to a time-decayed co-engagement count on both sides. At ranking time a
candidate is scored by its similarity to the user's last few engaged items:

- ``session_similarity``: to the items of the current session (engagements
  with no gap longer than ``session_gap_s`` between them, the last one within
  ``session_gap_s`` of the request);
- ``history_similarity``: to the user's recent history (the current session
  included), up to ``anchors`` distinct items.

Each is the sum over those items of the cosine-normalized co-engagement
``co(i, j) / sqrt(n_i * n_j)``, where ``n_i`` is the item's decayed engagement
weight (the item-kNN score of session-based recommenders; an item is not
similar to itself). A new user, or an item nobody co-engaged, scores 0.

State (all counts decayed with half-life ``half_life_s``):

=================  =============================================================================
key                content
=================  =============================================================================
``i:{item}:n``     neighbours: ``{other item id}`` -> decayed co-engagement weight, reference
                   time ``_t``; only the largest ``neighbours`` (K) are kept (up to K + K // 2
                   between trims), so memory per item is bounded whatever the catalog size
``i:{item}``       the item hash of ``engine.features`` gains ``s|n``, the item's decayed
                   engagement weight, as of ``s|_t``: candidates' item hashes are read for
                   every request anyway, so the normalization costs no read
``g:pop``          the shop's most engaged items: ``{item id}`` -> decayed engagement weight
                   (half-life ``popular_half_life_s``), the largest ``popular`` kept; the
                   fallback candidates of recommendations (``engine.ranking``)
=================  =============================================================================

Reads per request: none of their own. The script that reads the user's recent list
for the features also reads each anchor's neighbour hash and engagement weight
(:func:`recent_items_read`), at most ``2 * anchors`` more reads inside Redis,
however many candidates.

>>> from engine.messages import Interaction
>>> from engine.store import MemoryStore
>>> store, config = MemoryStore(), SimilarityConfig()
>>> def engage(user, item, ts):
...     (recent,) = store.read(engagement_reads(user, config))
...     event = Interaction(f"e-{ts}", user, item, "click", ts=ts)
...     store.apply([*engagement_writes(event, recent, config), *recent_write(event)])
>>> for user in ("u-1", "u-2", "u-3"):
...     engage(user, "phone", 100.0)
...     engage(user, "case", 160.0)
>>> engage("u-4", "phone", 200.0)
>>> from engine.features import read_items
>>> (reply,) = store.read([recent_items_read("u-4", FeatureConfig())])
>>> _, anchors, replies = recent_with_anchors(reply, now=260.0, config=config)
>>> candidates = ["charger", "case"]
>>> items = read_items(store, candidates)
>>> x = similarity_features(candidates, items, anchors, replies, now=260.0, config=config)
>>> x.round(2).tolist()  # case: 3 of phone's 4 shoppers: 3 / sqrt(4 * 3); in the session too
[[0.0, 0.0], [0.87, 0.87]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.features import (
    ENGAGEMENT_STAMP,
    ENGAGEMENT_TOTAL,
    FeatureConfig,
    ItemState,
    item_key,
    item_number,
    recent_read,
    user_recent_key,
)
from engine.messages import Candidate, Interaction, SearchRequest
from engine.near_cache import NearCache
from engine.store import (
    DecayedIncrement,
    HashRead,
    ListRead,
    PushRecent,
    Read,
    RecentItemsRead,
    Store,
    Write,
    decay_factor,
)

SIMILARITY_FEATURES = ("session_similarity", "history_similarity")
# The item's decayed engagement weight in its item hash: the cosine's denominator.
TOTAL_PREFIX = "s|"
TOTAL_FIELD = ENGAGEMENT_TOTAL
TOTAL_STAMP = ENGAGEMENT_STAMP


def _default_weights() -> dict[str, float]:
    # As the user tastes of engine.features weigh them: a purchase says more than a click.
    return {"click": 1.0, "add_to_cart": 3.0, "purchase": 5.0}


@dataclass(frozen=True, slots=True)
class SimilarityConfig:
    """How co-engagement is learned and read.

    Parameters
    ----------
    half_life_s
        Half-life of co-engagement counts and engagement weights: tastes in pairs drift
        with seasons and catalog changes.
    neighbours
        K, the neighbours kept per item (the largest decayed counts).
    pair_window_s, max_pairs
        An engagement is paired with the user's distinct items engaged at most this long
        before it, the newest ``max_pairs`` of them.
    anchors
        M, the distinct recent items a request is compared with (two reads each).
    session_gap_s
        A pause longer than this ends a session.
    weights
        The weight of each engagement type.
    """

    half_life_s: float = 7 * 86400.0
    neighbours: int = 50
    pair_window_s: float = 3600.0
    max_pairs: int = 10
    anchors: int = 10
    session_gap_s: float = 1800.0
    weights: Mapping[str, float] = field(default_factory=_default_weights)
    # Entries of the recent items list read when pairing (as FeatureConfig.recent_items).
    recent_items: int = 50
    floor: float = 0.01
    neighbour_ttl_s: int = 30 * 86400
    # The item hash is shared with engine.features: the same TTL as FeatureConfig.item_ttl_s.
    item_ttl_s: int = 180 * 86400
    # The popular items kept for recommendations, and how fast their weight fades.
    popular: int = 500
    popular_half_life_s: float = 86400.0


POPULAR_KEY = "g:pop"


def neighbour_key(item_id: str) -> str:
    return f"i:{item_id}:n"


def _parse(entry: str) -> tuple[str, float]:
    item_id, _, ts = entry.partition("\t")
    return item_id, float(ts or 0.0)


# --- learning ----------------------------------------------------------------------------------


def engagement_reads(user_id: str, config: SimilarityConfig) -> list[Read]:
    """What :func:`engagement_writes` needs: the user's recent items, before this engagement."""
    return [ListRead(user_recent_key(user_id), config.recent_items)]


def engagement_writes(
    interaction: Interaction, recent: Sequence[str], config: SimilarityConfig
) -> list[Write]:
    """The writes one engagement makes: its item's engagement weight and its pairs.

    ``recent`` is the user's recent items list (``"{item_id}\\t{ts}"``, newest first) as it
    was before this engagement; the caller pushes the engagement onto it (the features'
    ``interaction_writes`` does). The engaged item is paired with the newest
    ``max_pairs`` distinct items engaged within ``pair_window_s`` before it, each pair
    weighted by this engagement's weight. An item engaged again within the window pairs
    with nothing: its pairs with the items around it were counted when they were engaged,
    so clicking back and forth between two items is one co-engagement, not one per click.

    >>> event = Interaction("e-2", "u-1", "b", "add_to_cart", ts=100.0)
    >>> writes = engagement_writes(event, ["a\\t90.0", "c\\t70.0"], SimilarityConfig())
    >>> for w in writes:
    ...     print(w.key, w.amounts)
    i:b {'s|n': 3.0}
    i:b:n {'a': 3.0, 'c': 3.0}
    i:a:n {'b': 3.0}
    i:c:n {'b': 3.0}
    >>> len(engagement_writes(event, ["a\\t90.0", "b\\t80.0"], SimilarityConfig()))  # b again
    1
    """
    item_id, ts = interaction.item_id, interaction.ts
    weight = config.weights.get(interaction.type, 1.0)
    writes: list[Write] = [
        DecayedIncrement(
            item_key(item_id),
            {TOTAL_FIELD: weight},
            ts,
            config.half_life_s,
            floor=config.floor,
            ttl=config.item_ttl_s,
            prefix=TOTAL_PREFIX,
        )
    ]
    partners: list[str] = []
    for entry in recent:
        other, engaged = _parse(entry)
        if ts - engaged > config.pair_window_s:
            break
        if other == item_id:
            return writes  # paired already, with all of them
        if other not in partners and len(partners) < config.max_pairs:
            partners.append(other)
    if not partners:
        return writes
    pair = {"floor": config.floor, "ttl": config.neighbour_ttl_s, "keep": config.neighbours}
    writes.append(
        DecayedIncrement(
            neighbour_key(item_id), dict.fromkeys(partners, weight), ts, config.half_life_s, **pair
        )
    )
    writes += [
        DecayedIncrement(neighbour_key(other), {item_id: weight}, ts, config.half_life_s, **pair)
        for other in partners
    ]
    return writes


def popularity_write(interaction: Interaction, config: SimilarityConfig) -> Write:
    """The engagement's weight added to the shop's bounded popular items (``g:pop``).

    >>> write = popularity_write(Interaction("e-1", "u-1", "b", "purchase", ts=5.0),
    ...                          SimilarityConfig())
    >>> write.key, write.amounts, write.keep
    ('g:pop', {'b': 5.0}, 500)
    """
    weight = config.weights.get(interaction.type, 1.0)
    return DecayedIncrement(
        POPULAR_KEY,
        {interaction.item_id: weight},
        interaction.ts,
        config.popular_half_life_s,
        floor=config.floor,
        keep=config.popular,
    )


def recent_write(interaction: Interaction, features: FeatureConfig | None = None) -> list[Write]:
    """The push onto the user's recent items list, as ``engine.features`` makes it (for
    callers that do not write the features, such as tests and examples)."""
    features = features or FeatureConfig()
    entry = f"{interaction.item_id}\t{interaction.ts}"
    key = user_recent_key(interaction.user_id)
    return [PushRecent(key, entry, features.recent_items, features.user_ttl_s)]


# --- ranking -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Anchor:
    """A recently engaged item that candidates are compared with."""

    item_id: str
    ts: float
    in_session: bool


def recent_anchors(recent: Sequence[str], now: float, config: SimilarityConfig) -> list[Anchor]:
    """The user's last ``anchors`` distinct engaged items, newest first, each marked as in
    the current session or not (from the recent items list, newest first).

    >>> recent = ["b\\t1000.0", "a\\t900.0", "b\\t800.0", "c\\t-5000.0"]
    >>> [(a.item_id, a.in_session) for a in recent_anchors(recent, 1500.0, SimilarityConfig())]
    [('b', True), ('a', True), ('c', False)]
    """
    anchors: list[Anchor] = []
    seen: set[str] = set()
    in_session, last = True, now
    for entry in recent:
        item_id, ts = _parse(entry)
        # Walking back in time, the first pause longer than the gap ends the session.
        in_session = in_session and last - ts <= config.session_gap_s
        last = ts
        if item_id in seen:
            continue
        seen.add(item_id)
        anchors.append(Anchor(item_id, ts, in_session))
        if len(anchors) == config.anchors:
            break
    return anchors


def recent_items_read(
    user_id: str, features: FeatureConfig, candidate_ids: Sequence[str] | None = None
) -> RecentItemsRead:
    """The user's recent items and, in the same round trip, each anchor's neighbour hash and
    engagement weight (:func:`recent_with_anchors` takes the reply apart).

    With ``candidate_ids``, the neighbour hashes hold only those candidates (and the
    reference time): all that :func:`similarity_features` looks up, in a fraction of the
    reply (an anchor keeps up to 75 neighbours; few are among a request's candidates).
    """
    return RecentItemsRead(
        user_recent_key(user_id),
        features.recent_items,
        features.co_engagement.anchors,
        item_key(""),
        neighbour_key("")[len(item_key("")) :],
        (TOTAL_FIELD, TOTAL_STAMP),
        None if candidate_ids is None else ("_t", *candidate_ids),  # _t: the reference time
    )


def recent_with_anchors(
    reply: tuple[list[str], Mapping[str, tuple]], now: float, config: SimilarityConfig
) -> tuple[list[str], list[Anchor], list]:
    """The recent items, the anchors among them and, per anchor, its neighbour hash and its
    engagement weight ``[count, stamp]`` (two replies, in this order), from the reply to
    :func:`recent_items_read`."""
    recent, linked = reply
    anchors = recent_anchors(recent, now, config)
    replies: list = []
    for anchor in anchors:
        neighbours, weight = linked.get(anchor.item_id, ({}, [None, None]))
        replies += [neighbours, weight]
    return recent, anchors, replies


def _decayed_total(value: str | None, stamp: str | None, now: float, half_life_s: float) -> float:
    if not value:
        return 0.0
    return float(value) * decay_factor(now - float(stamp or now), half_life_s)


def _item_total(item: ItemState, now: float, half_life_s: float) -> float:
    value, stamp = item_number(item, ENGAGEMENT_TOTAL), item_number(item, ENGAGEMENT_STAMP)
    if math.isnan(value) or value == 0.0:
        return 0.0
    return value * decay_factor(now - (now if math.isnan(stamp) else stamp), half_life_s)


def similarity_features(
    candidate_ids: Sequence[str],
    candidate_items: Sequence[ItemState],
    anchors: Sequence[Anchor],
    replies: Sequence,
    now: float,
    config: SimilarityConfig,
) -> np.ndarray:
    """Columns ``session_similarity`` and ``history_similarity``, one row per candidate.

    ``candidate_items`` are the candidates' items (as the features read them),
    ``replies`` those of ``anchors`` by :func:`recent_with_anchors`. The work is one
    dictionary lookup per anchor and stored neighbour (at most ``anchors * 1.5 K``),
    however many candidates.
    """
    n = len(candidate_ids)
    if not anchors or n == 0:
        return np.zeros((n, 2))
    # Each candidate's 1 / sqrt(n_j), 0 where it has no engagement; found only for the
    # candidates that are some anchor's neighbour.
    place = {c: k for k, c in enumerate(candidate_ids)}
    inverse: dict[int, float] = {}
    similarity = np.zeros((n, 2))  # session, history
    for k, anchor in enumerate(anchors):
        neighbours, (value, stamp) = replies[2 * k], replies[2 * k + 1]
        total = _decayed_total(value, stamp, now, config.half_life_s)
        if not neighbours or total <= 0:
            continue
        # Co-counts are stored as of their reference time: decay them to now, once.
        fade = decay_factor(now - float(neighbours.get("_t", now)), config.half_life_s)
        scale = fade / math.sqrt(total)
        # Walk the anchor's (at most K + K // 2) neighbours, not all the candidates.
        for neighbour, count in neighbours.items():
            j = place.get(neighbour)
            if j is None or neighbour == anchor.item_id:
                continue
            if j not in inverse:
                n_j = _item_total(candidate_items[j], now, config.half_life_s)
                inverse[j] = 1.0 / math.sqrt(n_j) if n_j > 0 else 0.0
            # Clipped: decayed counts of different ages can push a cosine a little past 1.
            cosine = min(float(count) * scale * inverse[j], 1.0)
            similarity[j, 1] += cosine
            if anchor.in_session:
                similarity[j, 0] += cosine
    return similarity


# --- recommendations ---------------------------------------------------------------------------


def recommendation_candidates(
    store: Store,
    request: SearchRequest,
    features: FeatureConfig,
    limit: int = 200,
    cache: NearCache | None = None,
) -> SearchRequest:
    """``request`` with candidates found for a recommendation (``"recommend": true``).

    The neighbours of the user's anchors (recent distinct items), by summed
    co-engagement ``co(i, j) / sqrt(n_i)``, then the shop's popular items (``g:pop``)
    by decayed weight, up to ``limit`` in all; in that order, which is the retrieval
    order the ranker then re-ranks. Without anchors (a new user, or similarity off)
    the popular items alone. Reads: the user's recent list and the popular hash (from
    ``cache`` when fresh), with the anchors' neighbour hashes, in one round trip.

    >>> from engine.store import MemoryStore
    >>> store, config = MemoryStore(), SimilarityConfig()
    >>> def engage(user, item, ts):
    ...     (recent,) = store.read(engagement_reads(user, config))
    ...     event = Interaction(f"e-{user}-{ts}", user, item, "click", ts=ts)
    ...     store.apply([*engagement_writes(event, recent, config), *recent_write(event),
    ...                  popularity_write(event, config)])
    >>> for n, user in enumerate(("u-1", "u-2", "u-3")):
    ...     engage(user, "phone", 100.0)
    ...     engage(user, "case", 160.0)
    ...     engage(user, f"sock-{n}", 170.0)
    >>> engage("u-1", "sock-0", 180.0)
    >>> engage("u-4", "phone", 200.0)
    >>> request = SearchRequest("r-1", "u-4", (), k=3, ts=260.0, recommend=True)
    >>> found = recommendation_candidates(store, request, FeatureConfig())
    >>> [c.item_id for c in found.candidates]
    ['case', 'sock-0', 'sock-1', 'sock-2', 'phone']
    """
    popular = cache.get(POPULAR_KEY) if cache is not None else None
    reads: list[Read] = [recent_read(request, features)]
    if popular is None:
        reads.append(HashRead(POPULAR_KEY))
    replies = store.read(reads)
    anchors, anchor_replies = [], []
    if features.similarity:
        _, anchors, anchor_replies = recent_with_anchors(
            replies[0], request.ts, features.co_engagement
        )
    if popular is None:
        popular = replies[1]
        if cache is not None:
            cache.put(POPULAR_KEY, popular)
    config = features.co_engagement
    similar: dict[str, float] = {}
    for k, anchor in enumerate(anchors):
        neighbours, (value, stamp) = anchor_replies[2 * k], anchor_replies[2 * k + 1]
        total = _decayed_total(value, stamp, request.ts, config.half_life_s)
        if not neighbours or total <= 0:
            continue
        stamp_age = request.ts - float(neighbours.get("_t", request.ts))
        scale = decay_factor(stamp_age, config.half_life_s) / math.sqrt(total)
        for item_id, count in neighbours.items():
            if item_id != "_t" and item_id != anchor.item_id:
                similar[item_id] = similar.get(item_id, 0.0) + float(count) * scale
    found = sorted(similar, key=lambda i: (-similar[i], i))[:limit]
    if len(found) < limit:
        taken = set(found)
        weights = {i: float(w) for i, w in popular.items() if i != "_t" and i not in taken}
        found += sorted(weights, key=lambda i: (-weights[i], i))[: limit - len(found)]
    candidates = tuple(Candidate(item_id) for item_id in found)
    return SearchRequest(
        request.request_id,
        request.user_id,
        candidates,
        query=request.query,
        k=request.k,
        ts=request.ts,
        context=request.context,
        explain=request.explain,
        recommend=True,
    )
