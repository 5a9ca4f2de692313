"""Team-draft interleaving: which of two rankers shoppers prefer, from one result list.

An A/B test compares two groups of shoppers; interleaving shows *each* shopper a
mix of both rankings and lets their clicks vote, so it needs one to two orders of
magnitude less traffic to tell two rankers apart. Team draft (Radlinski, Kurup and
Joachims, "How does clickthrough data reflect retrieval quality?", CIKM 2008): like
captains picking players, the team with fewer picks so far (a coin toss when even)
adds its best item not yet in the list. Each shown item belongs to the team that
picked it, and the team whose items get more clicks wins the impression.

- :func:`team_draft` merges two rankings, reproducibly for a seed (the request
  id: every worker, and a later replay, draws the same list).
- :func:`credit` says which ranker a request's clicks prefer.
- :func:`interleaving_test` adds up the outcomes into a preference and a sign test.

>>> shown = team_draft(["i-1", "i-2", "i-3"], ["i-3", "i-1", "i-4"], k=4, seed="r-17")
>>> shown.items, shown.teams
(('i-1', 'i-3', 'i-4', 'i-2'), ('a', 'b', 'b', 'a'))
>>> credit(shown, clicked=["i-3"])
'b'
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from scipy import stats

A = "a"
B = "b"
TIE = "tie"

A_BETTER = "a better"
B_BETTER = "b better"
UNDECIDED = "no decision yet"


class _Coin(Protocol):
    """``random.Random`` or ``numpy.random.Generator``: both have ``random()``."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Interleaving:
    """The merged list: ``items[i]`` was picked by team ``teams[i]`` (``'a'`` or ``'b'``)."""

    items: tuple[str, ...]
    teams: tuple[str, ...]

    def team_of(self) -> dict[str, str]:
        """Item id to the team that picked it."""
        return dict(zip(self.items, self.teams, strict=True))


def seed_of(key: str) -> int:
    """A seed from a string (a request id), the same in every process.

    Python's ``hash()`` of a string changes between processes, so it cannot be used.

    >>> seed_of("r-17") == seed_of("r-17")
    True
    """
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def team_draft(
    ranking_a: Sequence[str],
    ranking_b: Sequence[str],
    k: int,
    seed: int | str | _Coin,
) -> Interleaving:
    """Interleave two rankings of item ids into at most ``k`` items, without duplicates.

    The team with fewer picks goes next, a coin toss breaks ties, and a team picks
    its highest-ranked item not already shown; when one team runs out of items the
    other keeps picking. Each team's items therefore appear in its own ranking's
    order, and over many requests both teams contribute equally.

    ``seed`` is an int, a string (hashed with :func:`seed_of`) or a random generator.

    >>> team_draft(["x", "y"], ["x", "y"], k=2, seed=1).items  # same rankings, same list
    ('x', 'y')
    >>> team_draft(["x"], ["y", "z", "w"], k=3, seed=1).items  # a runs out, b carries on
    ('x', 'y', 'z')
    """
    if isinstance(seed, str):
        seed = seed_of(seed)
    coin = random.Random(seed) if isinstance(seed, int) else seed
    rankings = {A: ranking_a, B: ranking_b}
    next_index = {A: 0, B: 0}
    picks = {A: 0, B: 0}
    shown: set[str] = set()
    items: list[str] = []
    teams: list[str] = []

    def advance(team: str) -> bool:
        """Skip the team's items already shown; whether it has one left."""
        ranking, i = rankings[team], next_index[team]
        while i < len(ranking) and ranking[i] in shown:
            i += 1
        next_index[team] = i
        return i < len(ranking)

    while len(items) < k:
        has_a, has_b = advance(A), advance(B)
        if not (has_a or has_b):
            break
        if has_a and has_b:
            if picks[A] != picks[B]:
                team = A if picks[A] < picks[B] else B
            else:
                team = A if coin.random() < 0.5 else B
        else:
            team = A if has_a else B
        item = rankings[team][next_index[team]]
        shown.add(item)
        items.append(item)
        teams.append(team)
        picks[team] += 1
    return Interleaving(tuple(items), tuple(teams))


def credit(shown: Interleaving | Mapping[str, str], clicked: Iterable[str]) -> str:
    """The team whose items got more clicks: ``'a'``, ``'b'`` or ``'tie'``.

    Each clicked item counts once, however often it was clicked; clicks on items
    that were not shown are ignored. No clicks is a tie.

    >>> credit({"x": "a", "y": "b", "z": "a"}, ["x", "y", "z", "x"])
    'a'
    >>> credit({"x": "a", "y": "b"}, [])
    'tie'
    """
    team_of = shown.team_of() if isinstance(shown, Interleaving) else shown
    votes = {A: 0, B: 0}
    for item in set(clicked):
        team = team_of.get(item)
        if team is not None:
            votes[team] += 1
    if votes[A] == votes[B]:
        return TIE
    return A if votes[A] > votes[B] else B


@dataclass(frozen=True, slots=True)
class InterleavingResult:
    """The preference for ranker a over b across interleaved impressions.

    ``preference`` is ``(wins_a + ties / 2) / n - 0.5``: positive when shoppers
    prefer a, between -0.5 and 0.5. Its interval is the exact (Clopper-Pearson)
    interval of a's share of decided impressions, scaled by the decided share;
    ``p_value`` is the two-sided sign test of wins against losses (ties carry no
    information about which ranker is better).
    """

    wins_a: int
    wins_b: int
    ties: int
    preference: float
    low: float
    high: float
    p_value: float
    verdict: str

    def __str__(self) -> str:
        return (
            f"a {self.wins_a} : b {self.wins_b} (ties {self.ties}), preference for a "
            f"{self.preference:+.4f} ({self.low:+.4f} to {self.high:+.4f}), "
            f"p={self.p_value:.4g}: {self.verdict}"
        )


def interleaving_test(
    wins_a: int, wins_b: int, ties: int = 0, alpha: float = 0.05
) -> InterleavingResult:
    """Whether shoppers prefer ranker a or b, from the outcomes of :func:`credit`.

    The sign test is for one look at a fixed number of impressions.

    >>> print(interleaving_test(wins_a=230, wins_b=180, ties=590))
    a 230 : b 180 (ties 590), preference for a +0.0250 (+0.0047 to +0.0450), p=0.01542: a better
    >>> interleaving_test(wins_a=10, wins_b=12, ties=5).verdict
    'no decision yet'
    """
    n = wins_a + wins_b + ties
    decided = wins_a + wins_b
    if decided == 0:
        return InterleavingResult(wins_a, wins_b, ties, 0.0, -0.5, 0.5, 1.0, UNDECIDED)
    preference = (wins_a + ties / 2) / n - 0.5  # = decided / n * (share_a - 0.5)
    test = stats.binomtest(wins_a, decided, 0.5)
    interval = test.proportion_ci(confidence_level=1 - alpha, method="exact")
    scale = decided / n
    verdict = UNDECIDED
    if test.pvalue <= alpha and not math.isclose(preference, 0.0):
        verdict = A_BETTER if preference > 0 else B_BETTER
    return InterleavingResult(
        wins_a=wins_a,
        wins_b=wins_b,
        ties=ties,
        preference=preference,
        low=scale * (interval.low - 0.5),
        high=scale * (interval.high - 0.5),
        p_value=float(test.pvalue),
        verdict=verdict,
    )
