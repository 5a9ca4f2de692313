"""Maximal marginal relevance: a top of the list that is not all near-duplicates."""

from __future__ import annotations

import random
import time

import pytest

from engine.diversity import diversify


def near_duplicates() -> tuple[list[float], list[tuple[str | None, str | None]]]:
    """Ten phone cases of one brand with the top scores, then ten items of other kinds."""
    scores = [1.0 - 0.01 * n for n in range(10)] + [0.8 - 0.02 * n for n in range(10)]
    attributes = [("cases", "acme")] * 10 + [(f"cat-{n % 5}", f"brand-{n}") for n in range(10)]
    return scores, attributes


def test_mmr_spreads_the_top_over_categories() -> None:
    scores, attributes = near_duplicates()
    assert len({attributes[i][0] for i in range(5)}) == 1  # before: all five are cases
    order = diversify(scores, attributes, relevance_weight=0.5, k=10)
    top = order[:5]
    assert len({attributes[i][0] for i in top}) >= 3
    assert top[0] == 0  # the best item still leads
    assert sorted(order) == list(range(20))  # a permutation: nothing lost, nothing doubled
    # within a kind the score order stands
    cases = [i for i in order if attributes[i][0] == "cases"]
    assert cases == sorted(cases)


def test_relevance_weight_one_is_the_identity() -> None:
    scores, attributes = near_duplicates()
    assert diversify(scores, attributes, 1.0) == list(range(20))
    assert diversify(scores, attributes, 1.0, k=5) == list(range(20))
    # also when the scores are not sorted: the input order is returned as it is
    assert diversify([0.1, 0.9, 0.5], [("a", "x")] * 3, 1.0) == [0, 1, 2]


def test_ties_keep_the_input_order() -> None:
    attributes = [("a", "x"), ("b", "y"), ("c", "z"), ("a", "x")]
    assert diversify([0.5] * 4, attributes, 0.7) == [0, 1, 2, 3]
    # equal scores, one kind: the input order whatever the weight
    assert diversify([1.0, 1.0, 1.0], [("a", "x")] * 3, 0.3) == [0, 1, 2]


def test_k_diversifies_only_the_top_and_keeps_the_rest_in_order() -> None:
    scores, attributes = near_duplicates()
    order = diversify(scores, attributes, relevance_weight=0.5, k=3)
    assert order[:3] == diversify(scores, attributes, 0.5)[:3]
    assert order[3:] == [i for i in range(20) if i not in order[:3]]
    assert diversify(scores, attributes, 0.5, k=0) == list(range(20))


def test_brand_and_category_weights() -> None:
    scores = [1.0, 0.9, 0.85, 0.0]
    attributes = [("shoes", "acme"), ("shoes", "zeta"), ("bags", "acme"), (None, None)]
    # all weight on the category: a bag of the same brand is the fresh one
    assert diversify(scores, attributes, 0.5, category_weight=1.0)[:2] == [0, 2]
    # all weight on the brand: shoes of another brand are
    assert diversify(scores, attributes, 0.5, category_weight=0.0)[:2] == [0, 1]
    # an item with unknown category and brand is like nothing
    assert diversify(scores, attributes, 0.0)[:2] == [0, 3]


def naive_mmr(scores, attributes, relevance_weight, category_weight=0.5) -> list[int]:
    """MMR as written in the paper: rescore every item at every pick."""
    low, high = min(scores), max(scores)
    relevance = [(s - low) / (high - low) if high > low else 1.0 for s in scores]

    def similarity(i: int, j: int) -> float:
        (ci, bi), (cj, bj) = attributes[i], attributes[j]
        same_category = ci is not None and ci == cj
        same_brand = bi is not None and bi == bj
        return category_weight * same_category + (1 - category_weight) * same_brand

    order: list[int] = []
    rest = list(range(len(scores)))
    while rest:
        values = [
            relevance_weight * relevance[i]
            - (1 - relevance_weight) * max((similarity(i, j) for j in order), default=0.0)
            for i in rest
        ]
        best = rest[values.index(max(values))]  # the first of equals
        order.append(best)
        rest.remove(best)
    return order


@pytest.mark.parametrize("seed", range(20))
def test_the_fast_mmr_picks_what_the_paper_would(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 40)
    # coarse scores and few kinds: many ties and repeated penalties
    scores = sorted((rng.randrange(10) / 10 for _ in range(n)), reverse=True)
    kinds = [None, "a", "b", "c"]
    attributes = [(rng.choice(kinds), rng.choice(kinds)) for _ in range(n)]
    weight, category_weight = rng.choice([0.0, 0.3, 0.5, 0.9]), rng.choice([0.0, 0.5, 0.7, 1.0])
    assert diversify(scores, attributes, weight, category_weight=category_weight) == naive_mmr(
        scores, attributes, weight, category_weight
    )


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 scores but 1 attributes"):
        diversify([1.0, 0.5], [("a", "b")], 0.5)
    assert diversify([], [], 0.5) == []


def test_it_is_fast_for_300_candidates() -> None:
    rng = random.Random(5)
    scores = sorted((rng.random() for _ in range(300)), reverse=True)
    attributes = [(f"c{rng.randrange(20)}", f"b{rng.randrange(40)}") for _ in range(300)]
    started = time.perf_counter()
    for _ in range(20):
        order = diversify(scores, attributes, 0.7)
    assert (time.perf_counter() - started) / 20 < 0.02  # about 1 ms here
    assert sorted(order) == list(range(300))
