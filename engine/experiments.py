"""Which ranking variant a shopper sees.

Assignment hashes the user id with a salt: the same user gets the same variant
on every worker and after every restart, and a new salt reshuffles everyone.

>>> assign_variant("u-42", salt="s1", control_share=0.0)
'personalized'
>>> assign_variant("u-42", salt="s1", control_share=1.0)
'control'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from engine.experiment_config import (
    KIND_CONTROL,
    KIND_INTERLEAVE,
    Experiment,
    ExperimentConfig,
    Variant,
)
from engine.interleaving import A, B, team_draft
from engine.messages import SearchRequest
from engine.ranking import CONTROL, PERSONALIZED, Ranker, Ranking, RankingConfig


def user_bucket(user_id: str, salt: str) -> float:
    """A stable, uniform number in [0, 1) for a user and a salt."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_variant(user_id: str, salt: str, control_share: float) -> str:
    return CONTROL if user_bucket(user_id, salt) < control_share else PERSONALIZED


# --- experiments with layers (engine.experiment_config) --------------------------------------


@dataclass(frozen=True, slots=True)
class Assignment:
    """The running experiments a user falls in, and their variant in each (file order).

    ``variant`` names the result's variant: that of the first experiment, or
    ``personalized`` when the user is in none.
    """

    arms: tuple[tuple[Experiment, Variant], ...] = ()

    @property
    def variant(self) -> str:
        return self.arms[0][1].name if self.arms else PERSONALIZED

    def labels(self) -> dict[str, str]:
        """Experiment name to variant name."""
        return {e.name: v.name for e, v in self.arms}


def layer_bucket(user_id: str, layer: str) -> float:
    """Where a user falls in a layer: independent of every experiment's own salt."""
    return user_bucket(user_id, f"layer:{layer}")


def variant_of(experiment: Experiment, user_id: str) -> Variant | None:
    """The user's variant by the experiment's salt and the variants' shares (file order)."""
    bucket = user_bucket(user_id, experiment.salt)
    edge = 0.0
    last = None
    for v in experiment.variants:
        if v.share <= 0:
            continue
        edge += v.share
        last = v
        if bucket < edge:
            return v
    return last  # rounding: shares adding up to 0.9999999


def assign(config: ExperimentConfig, user_id: str, now: float) -> Assignment:
    """The experiments running at ``now`` that ``user_id`` is in, and the variants.

    In a layer the experiments take disjoint ranges of the layer's hash, so a user is in at
    most one of them; each layer hashes users on its own, so layers are orthogonal.

    >>> from engine.experiment_config import parse_config
    >>> config = parse_config({"experiments": [
    ...     {"name": "a", "layer": "L", "traffic": 0.5,
    ...      "variants": [{"name": "x", "share": 1.0}]},
    ...     {"name": "b", "layer": "L", "traffic": 0.5,
    ...      "variants": [{"name": "y", "share": 1.0}]}]})
    >>> users = [f"u-{n}" for n in range(1000)]
    >>> in_a = sum("a" in assign(config, u, 0.0).labels() for u in users)
    >>> in_b = sum("b" in assign(config, u, 0.0).labels() for u in users)
    >>> in_a + in_b, 450 < in_a < 550
    (1000, True)
    """
    arms = []
    for experiment in config.experiments:
        if not experiment.running(now):
            continue
        low, high = experiment.layer_range
        if not low <= layer_bucket(user_id, experiment.layer) < high:
            continue
        variant = variant_of(experiment, user_id)
        if variant is not None:
            arms.append((experiment, variant))
    return Assignment(tuple(arms))


@dataclass(frozen=True, slots=True)
class ExperimentRanking:
    """A ranking for an assignment; ``teams`` (``'a'``/``'b'`` per result item) when it was
    interleaved, for ``interleaved`` = (experiment, variant)."""

    ranking: Ranking
    assignment: Assignment
    teams: tuple[str, ...] | None = None
    interleaved: tuple[str, str] | None = None


def rank_assigned(
    ranker: Ranker, request: SearchRequest, assignment: Assignment, started: float | None = None
) -> ExperimentRanking:
    """Rank ``request`` as its assignment says.

    A ``control`` variant in any experiment serves the retrieval order; otherwise the
    overrides of every experiment apply to the ranker's configuration (layers change
    different settings, which the configuration checks). An ``interleave`` variant ranks the
    request with both named variants' settings and merges them by team draft, seeded by the
    request id (every worker and replay draws the same list).

    >>> from engine.experiment_config import parse_config
    >>> from engine.messages import Candidate
    >>> from engine.store import MemoryStore
    >>> from models.online_ctr import LinearCTR
    >>> config = parse_config({"experiments": [{"name": "il", "variants": [
    ...     {"name": "control", "share": 0, "ranking": "control"},
    ...     {"name": "flip", "share": 0, "ranking": {"retrieval_weight": -5.0}},
    ...     {"name": "mix", "share": 1, "ranking": {"interleave": ["control", "flip"]}}]}]})
    >>> ranker = Ranker(MemoryStore(), LinearCTR.prior())
    >>> request = SearchRequest("r-1", "u-1", tuple(Candidate(f"i-{n}", 9.0 - n) for n in range(4)))
    >>> ranked = rank_assigned(ranker, request, assign(config, "u-1", 0.0))
    >>> [i.item_id for i in ranked.ranking.result.items], ranked.teams
    (['i-0', 'i-3', 'i-1', 'i-2'], ('a', 'b', 'a', 'b'))
    >>> ranked.ranking.result.variant, ranked.interleaved
    ('mix', ('il', 'mix'))
    """
    base = ranker.config
    shared: dict = {}
    control = False
    interleave: tuple[Experiment, Variant] | None = None
    for experiment, variant in assignment.arms:
        if variant.kind == KIND_CONTROL:
            control = True
        elif variant.kind == KIND_INTERLEAVE and interleave is None:
            interleave = (experiment, variant)
        else:
            shared.update(variant.overrides)
    name = assignment.variant
    if interleave is not None and not control:
        experiment, variant = interleave
        pair = [experiment.variant(member) for member in variant.interleave or ()]
        # Both sides from one read of the request's state (variants change scoring only).
        a, b = ranker.rank_ways(request, [_way(member, base, shared) for member in pair], started)
        merged, teams = interleave_rankings(a, b, request, name, base.impressions.depth)
        if teams is not None:
            return ExperimentRanking(merged, assignment, teams, (experiment.name, variant.name))
        return ExperimentRanking(merged, assignment)
    if control:
        ranking = ranker.rank(request, CONTROL, started)
    else:
        config = replace(base, **shared) if shared else base
        ranking = ranker.rank(request, PERSONALIZED, started, config)
    return ExperimentRanking(_named(ranking, name), assignment)


def _way(variant: Variant, base: RankingConfig, shared: dict) -> tuple[str, RankingConfig]:
    """How ``variant`` ranks, as a way for :meth:`~engine.ranking.Ranker.rank_ways`."""
    if variant.kind == KIND_CONTROL:
        return CONTROL, base
    return PERSONALIZED, replace(base, **{**shared, **variant.overrides})


def _named(ranking: Ranking, name: str) -> Ranking:
    if ranking.result.variant == name:
        return ranking
    impression = ranking.impression
    return replace(
        ranking,
        result=replace(ranking.result, variant=name),
        impression=replace(impression, variant=name) if impression is not None else None,
    )


def interleave_rankings(
    a: Ranking, b: Ranking, request: SearchRequest, name: str, depth: int
) -> tuple[Ranking, tuple[str, ...] | None]:
    """Team-draft merge of two rankings of one request; the teams of the result's items.

    The merged result keeps each item's score from the ranking that picked it; its
    impression holds the items in the merged order with their feature rows (a team picks
    its best item not yet shown, so the top ``depth`` merged items are all in the top
    ``depth`` of one ranking or the other). A degraded ranking is answered as it is.
    """
    if a.impression is None or b.impression is None:
        return _named(a, name), None
    ids_a = [item.item_id for item in a.result.items]
    ids_b = [item.item_id for item in b.result.items]
    shown = team_draft(ids_a, ids_b, k=len(ids_a), seed=request.request_id)
    by_team = {
        A: (
            {i.item_id: i for i in a.result.items},
            dict(zip(ids_a, a.click_probabilities, strict=False)),
        ),
        B: (
            {i.item_id: i for i in b.result.items},
            dict(zip(ids_b, b.click_probabilities, strict=False)),
        ),
    }
    items, ctr = [], []
    for rank, (item_id, team) in enumerate(zip(shown.items, shown.teams, strict=True), 1):
        ranked, estimates = by_team[team]
        items.append(ranked[item_id]._replace(rank=rank))
        ctr.append(estimates.get(item_id, 0.0))
    rows = {}
    for impression in (b.impression, a.impression):  # a's rows win: the same features anyway
        for n, item_id in enumerate(impression.item_ids):
            rows[item_id] = (
                impression.features[n],
                impression.categories[n] if n < len(impression.categories) else "",
                impression.brands[n] if n < len(impression.brands) else "",
            )
    remembered = []
    for item_id in shown.items[: len(a.impression.item_ids) or depth]:
        if item_id not in rows:
            break
        remembered.append(item_id)
    impression = replace(
        a.impression,
        item_ids=tuple(remembered),
        features=np.array([rows[i][0] for i in remembered]).reshape(
            len(remembered), a.impression.features.shape[1]
        ),
        categories=tuple(rows[i][1] for i in remembered),
        brands=tuple(rows[i][2] for i in remembered),
        variant=name,
    )
    result = replace(a.result, items=tuple(items), variant=name)
    merged = replace(a, result=result, impression=impression, click_probabilities=tuple(ctr))
    return merged, shown.teams
