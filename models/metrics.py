"""Ranking and click-prediction metrics for one ranked list, and their running means.

Each function takes the list as ranked (top first) with a click label per item;
``RankingMetrics`` averages them over lists, as the replay report does.

>>> clicked = [False, True, False]
>>> round(ndcg_at(clicked, 10), 4), reciprocal_rank(clicked), hit_at(clicked, 1)
(0.6309, 0.5, 0.0)
>>> auc([0.9, 0.8, 0.1], [False, True, False])
0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def ndcg_at(clicked: Sequence[bool], k: int) -> float:
    """Normalized discounted cumulative gain of the top ``k`` (binary gains)."""
    dcg = sum(1.0 / math.log2(i + 2) for i, c in enumerate(clicked[:k]) if c)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(sum(clicked), k)))
    return dcg / ideal if ideal > 0 else 0.0


def reciprocal_rank(clicked: Sequence[bool]) -> float:
    """1 / rank of the first clicked item (0 if none)."""
    for i, c in enumerate(clicked):
        if c:
            return 1.0 / (i + 1)
    return 0.0


def hit_at(clicked: Sequence[bool], k: int) -> float:
    return 1.0 if any(clicked[:k]) else 0.0


def auc(scores: Sequence[float], clicked: Sequence[bool]) -> float | None:
    """Probability that a clicked item outscores an unclicked one (ties count half);
    ``None`` when the list lacks either kind."""
    positives = [s for s, c in zip(scores, clicked, strict=True) if c]
    negatives = [s for s, c in zip(scores, clicked, strict=True) if not c]
    if not positives or not negatives:
        return None
    # Rank-sum (Mann-Whitney U) with average ranks for ties: O(n log n).
    ordered = sorted(zip(scores, clicked, strict=True), key=lambda pair: pair[0])
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2.0
        rank_sum += average_rank * sum(1 for _, c in ordered[i:j] if c)
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(probabilities: Sequence[float], clicked: Sequence[bool]) -> float:
    """Mean binary cross-entropy of the predicted click probabilities."""
    total = 0.0
    for p, c in zip(probabilities, clicked, strict=True):
        p = min(max(p, 1e-7), 1.0 - 1e-7)
        total -= math.log(p if c else 1.0 - p)
    return total / len(probabilities)


def list_metrics(
    clicked: Sequence[bool],
    scores: Sequence[float],
    probabilities: Sequence[float] | None = None,
) -> dict[str, float]:
    """The metrics of one list with a click, ranked top first (AUC only with both labels,
    logloss only with probabilities)."""
    values = {
        "ndcg@5": ndcg_at(clicked, 5),
        "ndcg@10": ndcg_at(clicked, 10),
        "mrr": reciprocal_rank(clicked),
        "hr@10": hit_at(clicked, 10),
    }
    list_auc = auc(scores, clicked)
    if list_auc is not None:
        values["auc"] = list_auc
    if probabilities is not None:
        values["logloss"] = logloss(probabilities, clicked)
    return values


@dataclass
class RankingMetrics:
    """Means over ranked lists with at least one click.

    >>> metrics = RankingMetrics()
    >>> metrics.add([False, True], probabilities=[0.2, 0.6], scores=[0.2, 0.6])
    >>> metrics.summary()["mrr"], metrics.summary()["auc"]
    (0.5, 1.0)
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        clicked: Sequence[bool],
        scores: Sequence[float],
        probabilities: Sequence[float] | None = None,
    ) -> None:
        """Add one list, ranked top first, with the scores it was ranked by."""
        if any(clicked):
            self.add_values(list_metrics(clicked, scores, probabilities))

    def add_values(self, values: dict[str, float]) -> None:
        """Add one list's metrics, as :func:`list_metrics` computed them."""
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def summary(self) -> dict[str, float]:
        return {name: round(self.sums[name] / self.counts[name], 4) for name in self.sums}
