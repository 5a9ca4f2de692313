"""Ranking and click-prediction metrics, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from models.metrics import RankingMetrics, auc, hit_at, logloss, ndcg_at, reciprocal_rank

F, T = False, True
D2, D3, D4, D5 = 1.0, 1 / math.log2(3), 1 / math.log2(4), 1 / math.log2(5)  # discounts 1..4


@pytest.mark.parametrize(
    ("clicked", "k", "expected"),
    [
        ([T, F, F], 10, 1.0),
        ([F, T, F], 10, D3 / 1.0),
        ([F, F, T], 10, D4 / 1.0),
        ([F, T, F, T], 10, (D3 + D5) / (1.0 + D3)),
        ([T, T, F], 10, 1.0),
        ([F, F, T, T], 10, (D4 + D5) / (1.0 + D3)),
        # a click below k counts neither in the gain nor in the ideal beyond k
        ([F, F, T], 2, 0.0),
        ([F, T, T], 2, D3 / (1.0 + D3)),
        ([F, T, F, T], 3, D3 / (1.0 + D3)),
        ([T, F, T], 1, 1.0),
        ([F, F, F], 10, 0.0),
        ([], 5, 0.0),
    ],
)
def test_ndcg_at(clicked: list[bool], k: int, expected: float) -> None:
    assert ndcg_at(clicked, k) == pytest.approx(expected, rel=1e-12)


def test_ndcg_known_decimals() -> None:
    assert round(ndcg_at([F, T, F], 5), 4) == 0.6309
    assert round(ndcg_at([F, T, F, T], 10), 4) == 0.6509
    assert round(ndcg_at([F] * 10 + [T], 10), 4) == 0.0
    assert round(ndcg_at([F] * 9 + [T], 10), 4) == round(1 / math.log2(11), 4) == 0.2891


@pytest.mark.parametrize(
    ("clicked", "expected"),
    [
        ([T], 1.0),
        ([F, T], 0.5),
        ([F, F, T, T], 1 / 3),
        ([F, F, F, T], 0.25),
        ([F] * 9 + [T], 0.1),
        ([F, F], 0.0),
        ([], 0.0),
    ],
)
def test_reciprocal_rank(clicked: list[bool], expected: float) -> None:
    assert reciprocal_rank(clicked) == expected


@pytest.mark.parametrize(
    ("clicked", "k", "expected"),
    [
        ([F, F, T], 3, 1.0),
        ([F, F, T], 2, 0.0),
        ([T], 1, 1.0),
        ([F, T], 1, 0.0),
        ([F] * 10 + [T], 10, 0.0),
        ([F] * 9 + [T], 10, 1.0),
        ([], 10, 0.0),
    ],
)
def test_hit_at(clicked: list[bool], k: int, expected: float) -> None:
    assert hit_at(clicked, k) == expected


@pytest.mark.parametrize(
    ("scores", "clicked", "expected"),
    [
        ([0.9, 0.1], [T, F], 1.0),
        ([0.1, 0.9], [T, F], 0.0),
        ([0.9, 0.8, 0.1], [F, T, F], 0.5),
        # positives .8 and .5 each beat the negative .2 and lose to the negative .9
        ([0.8, 0.9, 0.5, 0.2], [T, F, T, F], 0.5),
        ([0.9, 0.1, 0.3, 0.5], [T, F, T, F], 0.75),
        # ties count half
        ([0.5, 0.5], [T, F], 0.5),
        ([0.5, 0.5, 0.2], [T, F, F], 0.75),
        ([0.5, 0.5, 0.5, 0.5], [T, F, T, F], 0.5),
        # positive .7 vs negatives .7 (tie), .7 (tie), .3 (win); positive .3 vs them: 0,0,.5
        ([0.7, 0.7, 0.7, 0.3, 0.3], [T, F, F, T, F], (0.5 + 0.5 + 1 + 0 + 0 + 0.5) / 6),
        # the order of the list does not matter, only the scores
        ([0.3, 0.7, 0.3, 0.7, 0.7], [F, F, T, F, T], (0.5 + 0.5 + 1 + 0 + 0 + 0.5) / 6),
        ([-3.0, -1.0, 0.0, -2.0], [T, F, F, F], 0.0),
    ],
)
def test_auc(scores: list[float], clicked: list[bool], expected: float) -> None:
    assert auc(scores, clicked) == pytest.approx(expected, abs=1e-12)


def test_auc_without_both_kinds_is_none() -> None:
    assert auc([0.1, 0.9], [T, T]) is None
    assert auc([0.1, 0.9], [F, F]) is None
    assert auc([], []) is None
    with pytest.raises(ValueError):
        auc([0.1, 0.9], [T])


def test_auc_matches_the_pairwise_definition() -> None:
    scores = [0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.1, 0.9, 0.35]
    clicked = [F, T, F, T, F, T, T, F, F]
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, cp in zip(scores, clicked, strict=True)
        if cp
        for n, cn in zip(scores, clicked, strict=True)
        if not cn
    ]
    assert auc(scores, clicked) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_logloss() -> None:
    assert logloss([0.5], [T]) == pytest.approx(math.log(2))
    assert logloss([0.5], [F]) == pytest.approx(math.log(2))
    assert logloss([0.8, 0.25], [T, F]) == pytest.approx(
        -(math.log(0.8) + math.log(0.75)) / 2, rel=1e-12
    )
    assert logloss([0.9, 0.9, 0.1], [T, F, F]) == pytest.approx(
        -(math.log(0.9) + math.log(0.1) + math.log(0.9)) / 3, rel=1e-12
    )


def test_logloss_clips_certain_predictions() -> None:
    worst = -math.log(1e-7)  # ~16.118: a confident mistake costs this much, not infinity
    assert logloss([0.0], [T]) == pytest.approx(worst, rel=1e-9)
    assert logloss([1.0], [F]) == pytest.approx(worst, rel=1e-9)
    assert logloss([-0.5, 1.5], [T, F]) == pytest.approx(worst, rel=1e-9)
    assert logloss([1.0, 0.0], [T, F]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-9)
    assert logloss([0.0, 0.5], [T, T]) == pytest.approx((worst + math.log(2)) / 2, rel=1e-9)
    assert math.isfinite(logloss([0.0, 1.0], [T, F]))


def test_ranking_metrics_average_over_lists() -> None:
    metrics = RankingMetrics()
    # list 1: click at rank 2; list 2: clicks at ranks 1 and 3; list 3: all clicked
    metrics.add([F, T, F], scores=[0.9, 0.8, 0.1], probabilities=[0.5, 0.5, 0.5])
    metrics.add([T, F, T], scores=[0.9, 0.5, 0.2], probabilities=[0.8, 0.25, 0.5])
    metrics.add([T, T], scores=[0.7, 0.6], probabilities=[0.5, 0.5])
    summary = metrics.summary()
    assert set(summary) == {"ndcg@5", "ndcg@10", "mrr", "hr@10", "auc", "logloss"}
    ndcg_2 = (1.0 + D4) / (1.0 + D3)
    assert summary["ndcg@5"] == summary["ndcg@10"] == round((D3 + ndcg_2 + 1.0) / 3, 4)
    assert summary["mrr"] == round((0.5 + 1.0 + 1.0) / 3, 4) == 0.8333
    assert summary["hr@10"] == 1.0
    # the all-clicked list has no AUC: the mean is over the other two lists only
    assert metrics.counts["auc"] == 2 and metrics.counts["mrr"] == 3
    assert summary["auc"] == round((0.5 + 0.5) / 2, 4)
    losses = [
        math.log(2),
        -(math.log(0.8) + math.log(0.75) + math.log(0.5)) / 3,
        math.log(2),
    ]
    assert summary["logloss"] == round(sum(losses) / 3, 4)


def test_ranking_metrics_skip_lists_without_clicks() -> None:
    metrics = RankingMetrics()
    metrics.add([F, F, F], scores=[0.3, 0.2, 0.1], probabilities=[0.9, 0.9, 0.9])
    assert metrics.summary() == {} and metrics.counts == {}
    metrics.add([F, F, F, F, T], scores=[5.0, 4.0, 3.0, 2.0, 1.0])
    metrics.add([], scores=[])
    metrics.add([F, F], scores=[0.0, 0.0], probabilities=[1.0, 1.0])
    summary = metrics.summary()
    assert metrics.counts == {"ndcg@5": 1, "ndcg@10": 1, "mrr": 1, "hr@10": 1, "auc": 1}
    assert summary["mrr"] == 0.2 and summary["hr@10"] == 1.0
    assert summary["ndcg@5"] == round(1 / math.log2(6), 4) == 0.3869
    assert summary["auc"] == 0.0
    assert "logloss" not in summary  # no probabilities given for the list that counted


def test_ranking_metrics_hit_and_ndcg_cut_at_their_depth() -> None:
    metrics = RankingMetrics()
    metrics.add([F] * 10 + [T], scores=list(range(11, 0, -1)))
    metrics.add([F] * 5 + [T], scores=list(range(6, 0, -1)))
    summary = metrics.summary()
    assert summary["hr@10"] == 0.5
    assert summary["ndcg@5"] == 0.0
    assert summary["ndcg@10"] == round((0.0 + 1 / math.log2(7)) / 2, 4)
    assert summary["mrr"] == round((1 / 11 + 1 / 6) / 2, 4)
    assert summary["auc"] == 0.0
