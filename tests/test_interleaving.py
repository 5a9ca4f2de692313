"""Team-draft interleaving: a fair draft, and clicks that find the better ranker."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.interleaving import (
    A_BETTER,
    B_BETTER,
    TIE,
    UNDECIDED,
    A,
    B,
    Interleaving,
    credit,
    interleaving_test,
    team_draft,
)


def random_rankings(rng: random.Random) -> tuple[list[str], list[str]]:
    """Two overlapping rankings of unequal length over a small catalog."""
    catalog = [f"i-{n}" for n in range(rng.randint(1, 15))]
    return (
        rng.sample(catalog, rng.randint(0, len(catalog))),
        rng.sample(catalog, rng.randint(0, len(catalog))),
    )


def is_subsequence(items: list[str], ranking: list[str]) -> bool:
    positions = iter(ranking)
    return all(item in positions for item in items)


def test_draft_has_no_duplicates_and_keeps_each_team_in_its_order() -> None:
    rng = random.Random(0)
    for n in range(2000):
        ranking_a, ranking_b = random_rankings(rng)
        k = rng.randint(1, 12)
        shown = team_draft(ranking_a, ranking_b, k, seed=n)
        items = list(shown.items)
        assert len(items) == len(set(items)) == len(shown.teams)
        assert len(items) == min(k, len(set(ranking_a) | set(ranking_b)))
        team_a = [item for item, team in zip(items, shown.teams, strict=True) if team == A]
        team_b = [item for item, team in zip(items, shown.teams, strict=True) if team == B]
        assert is_subsequence(team_a, ranking_a)
        assert is_subsequence(team_b, ranking_b)
        # Each team picks its best item not yet shown: the top of each ranking is shown
        # whenever its team picked at all.
        if team_a:
            assert ranking_a[0] in items


def test_draft_is_balanced() -> None:
    rng = random.Random(1)
    catalog = [f"i-{n}" for n in range(30)]
    first_a = 0
    for n in range(3000):
        ranking_a, ranking_b = rng.sample(catalog, 20), rng.sample(catalog, 20)
        shown = team_draft(ranking_a, ranking_b, k=10, seed=f"r-{n}")
        # Both rankings are long enough: the teams pick alternately, 5 each.
        assert shown.teams.count(A) == shown.teams.count(B) == 5
        first_a += shown.teams[0] == A
    assert first_a / 3000 == pytest.approx(0.5, abs=0.03)
    # With an odd k, the extra item goes to either team equally often.
    odd = [team_draft(catalog, catalog[::-1], k=5, seed=n).teams.count(A) for n in range(3000)]
    assert np.mean(odd) == pytest.approx(2.5, abs=0.05)


def test_draft_is_deterministic_for_a_seed() -> None:
    ranking_a = [f"i-{n}" for n in range(10)]
    ranking_b = ranking_a[::-1]
    draws = {team_draft(ranking_a, ranking_b, 6, seed="r-42") for _ in range(5)}
    assert len(draws) == 1
    # Another request id draws another team order.
    assert len({team_draft(ranking_a, ranking_b, 6, seed=f"r-{n}") for n in range(50)}) > 1
    # A generator works too, and the same seed gives the same list.
    with_numpy = team_draft(ranking_a, ranking_b, 6, seed=np.random.default_rng(3))
    assert with_numpy == team_draft(ranking_a, ranking_b, 6, seed=np.random.default_rng(3))


def test_draft_edge_cases() -> None:
    assert team_draft([], [], k=5, seed=0) == Interleaving((), ())
    assert team_draft(["x"], ["y"], k=0, seed=0) == Interleaving((), ())
    assert team_draft([], ["y", "z"], k=5, seed=0) == Interleaving(("y", "z"), (B, B))
    shown = team_draft(["x", "y"], ["x", "y"], k=5, seed=0)
    assert shown.items == ("x", "y") and sorted(shown.teams) == [A, B]


def test_credit() -> None:
    shown = Interleaving(("x", "y", "z", "w"), (A, B, B, A))
    assert credit(shown, ["y"]) == B
    assert credit(shown, ["x", "y"]) == TIE
    assert credit(shown, ["x", "w", "y"]) == A
    assert credit(shown, ["y", "y", "y", "x", "w"]) == A  # repeated clicks count once
    assert credit(shown, ["not-shown"]) == TIE
    assert credit(shown.team_of(), ["z"]) == B


def test_interleaving_test_by_hand() -> None:
    result = interleaving_test(wins_a=60, wins_b=40, ties=100)
    assert result.preference == pytest.approx((60 + 50) / 200 - 0.5)
    # Sign test of 60 wins against 40: two-sided binomial p-value.
    assert result.p_value == pytest.approx(0.056887, rel=1e-4)
    assert result.verdict == UNDECIDED
    assert result.low < 0 < result.high
    assert interleaving_test(0, 0, 10).verdict == UNDECIDED
    assert interleaving_test(10, 40).verdict == B_BETTER
    assert interleaving_test(40, 10, alpha=0.01).verdict == A_BETTER


def click_simulation(
    seed: int, queries: int, noise_a: float, noise_b: float
) -> tuple[int, int, int]:
    """Interleave two noisy rankers over true relevance and click with position bias."""
    rng = np.random.default_rng(seed)
    outcomes = {A: 0, B: 0, TIE: 0}
    items = np.array([f"i-{n}" for n in range(20)])
    examined = 1.0 / np.arange(1, 11)  # shoppers look at the top far more than below
    for q in range(queries):
        relevance = rng.beta(0.5, 2.0, size=20)
        ranking_a = items[np.argsort(-(relevance + noise_a * rng.normal(size=20)))]
        ranking_b = items[np.argsort(-(relevance + noise_b * rng.normal(size=20)))]
        shown = team_draft(list(ranking_a), list(ranking_b), k=10, seed=f"{seed}-{q}")
        truth = dict(zip(items, relevance, strict=True))
        p_click = examined[: len(shown.items)] * [truth[item] for item in shown.items]
        clicked = [item for item, p in zip(shown.items, p_click, strict=True) if rng.random() < p]
        outcomes[credit(shown, clicked)] += 1
    return outcomes[A], outcomes[B], outcomes[TIE]


def test_a_truly_better_ranker_wins() -> None:
    wins_a, wins_b, ties = click_simulation(seed=5, queries=2000, noise_a=0.5, noise_b=0.1)
    result = interleaving_test(wins_a, wins_b, ties)
    assert result.verdict == B_BETTER
    assert result.p_value < 1e-4
    assert result.high < 0


def test_equal_rankers_rarely_differ() -> None:
    rejections = sum(
        interleaving_test(*click_simulation(seed, 150, 0.3, 0.3)).verdict != UNDECIDED
        for seed in range(60)
    )
    assert rejections <= 6  # 5 % of 60 is 3
