"""Off-policy evaluation: what a ranking policy's click-through rate would have been,
estimated from the clicks logged under another policy.

Each logged row is one shown slot: the action (item) ``a`` the logging policy put at
position ``p`` for context ``x``, the reward ``r`` (click or not) and the logging
propensity ``pi_b(a | x, p)``, the probability that the logger put ``a`` at ``p``. The
evaluation policy enters through ``pi_e(a | x, p)``, its own probability of putting the
logged item at the logged position. The value estimated is the expected clicks per
shown slot, directly comparable with a logged policy's CTR (mean click per row).

- :func:`ips` (inverse propensity scoring) reweights each row by ``pi_e / pi_b``:
  unbiased whenever ``pi_b > 0`` wherever ``pi_e > 0``, but noisy when the weights are
  large (a deterministic ranking matches few logged rows, each weighted by ``1 / pi_b``).
- :func:`snips` divides by the sum of the weights instead of ``n``: slightly biased,
  much less variance, and invariant to a constant shift of the rewards.
- :func:`doubly_robust` adds a reward model's prediction and reweights only its error:
  unbiased like IPS, with less variance the better the model.

Every estimate comes with a 95 % confidence interval from the normal approximation,
``value ± 1.96 * sd(terms) / sqrt(n)``, with the per-row terms each estimator is a
mean of (SNIPS: its delta-method linearization). Rows must be independent given
the model; an online reward model fitted on *earlier* rows only keeps DR unbiased
(each row's model is fixed before its reward is seen).

The evaluation policy's probabilities come from :func:`top_k_marginals` (a
deterministic ranking) or :func:`plackett_luce_marginals` (a ranking sampled in
proportion to ``exp(utility)``), and the reward model from :class:`ItemPositionCTR`.

A uniform logger over 4 items whose true click rates are 0.1 to 0.4; the policy that
always shows the last item is worth 0.4:

>>> rng = np.random.default_rng(7)
>>> n, ctr = 20_000, np.array([0.1, 0.2, 0.3, 0.4])
>>> action = rng.integers(4, size=n)
>>> click = rng.random(n) < ctr[action]
>>> propensity = np.full(n, 0.25)
>>> target = (action == 3).astype(float)  # pi_e(logged action): 1 for item 3, else 0
>>> print(on_policy(click))  # the logger's own CTR, about the mean of 0.1..0.4
0.2468 (95% CI 0.2408 to 0.2528, n=20000)
>>> print(ips(click, propensity, target))
0.4024 (95% CI 0.3857 to 0.4191, n=20000)
>>> print(snips(click, propensity, target))
0.4004 (95% CI 0.3869 to 0.4139, n=20000)
>>> q = np.full(n, 0.25)  # a constant reward model: DR keeps IPS unbiased, with less noise
>>> print(doubly_robust(click, propensity, target, q, q))
0.4012 (95% CI 0.3871 to 0.4152, n=20000)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True, slots=True)
class Estimate:
    """A policy value with its 95 % confidence interval and the rows it came from.

    ``ess`` is the effective sample size of the importance weights,
    ``(sum w)^2 / sum w^2``: how many on-policy rows the estimate is worth.
    """

    value: float
    low: float
    high: float
    stderr: float
    n: int
    ess: float

    def __str__(self) -> str:
        return f"{self.value:.4f} (95% CI {self.low:.4f} to {self.high:.4f}, n={self.n})"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def mean_estimate(
    terms: ArrayLike, value: float | None = None, ess: float | None = None
) -> Estimate:
    """The mean of per-row ``terms`` (or ``value``) with a normal-approximation 95 % interval.

    >>> print(mean_estimate([0.0, 1.0, 0.0, 1.0]))
    0.5000 (95% CI -0.0658 to 1.0658, n=4)
    """
    terms = np.asarray(terms, dtype=np.float64)
    n = len(terms)
    if n == 0:
        raise ValueError("no rows to estimate from")
    centre = float(terms.mean()) if value is None else value
    stderr = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    return Estimate(
        value=centre,
        low=centre - Z_95 * stderr,
        high=centre + Z_95 * stderr,
        stderr=stderr,
        n=n,
        ess=float(n) if ess is None else ess,
    )


def on_policy(rewards: ArrayLike) -> Estimate:
    """A logged policy's own value: the mean reward of its rows (its CTR per shown slot)."""
    return mean_estimate(np.asarray(rewards, dtype=np.float64))


def importance_weights(propensities: ArrayLike, target: ArrayLike) -> np.ndarray:
    """``pi_e / pi_b`` per row; refuses propensities that are not positive (no overlap)."""
    propensities = np.asarray(propensities, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if propensities.shape != target.shape:
        raise ValueError(f"{propensities.shape} propensities for {target.shape} target rows")
    if not (propensities > 0).all():
        raise ValueError("logging propensities must be positive")
    return target / propensities


def effective_sample_size(weights: np.ndarray) -> float:
    """``(sum w)^2 / sum w^2``: ``n`` for equal weights, 1 when one row carries them all."""
    total = float(np.square(weights).sum())
    return float(weights.sum()) ** 2 / total if total > 0 else 0.0


def ips(rewards: ArrayLike, propensities: ArrayLike, target: ArrayLike) -> Estimate:
    """Inverse propensity scoring: the mean of ``r * pi_e / pi_b``.

    >>> print(ips([1, 0, 0, 1], [0.5] * 4, [1.0, 0.0, 1.0, 0.0]))
    0.5000 (95% CI -0.4800 to 1.4800, n=4)
    """
    weights = importance_weights(propensities, target)
    terms = weights * np.asarray(rewards, dtype=np.float64)
    return mean_estimate(terms, ess=effective_sample_size(weights))


def snips(rewards: ArrayLike, propensities: ArrayLike, target: ArrayLike) -> Estimate:
    """Self-normalized IPS: ``sum(w * r) / sum(w)``.

    Its interval uses the linearized terms ``w * (r - value) / mean(w)`` (delta method).
    With no weight at all (the policy never takes a logged action) there is nothing to
    normalize by, and the estimate is NaN.

    >>> print(snips([1, 0, 0, 1], [0.5] * 4, [1.0, 0.0, 1.0, 0.0]))
    0.5000 (95% CI -0.3002 to 1.3002, n=4)
    """
    weights = importance_weights(propensities, target)
    rewards = np.asarray(rewards, dtype=np.float64)
    ess = effective_sample_size(weights)
    mean_weight = float(weights.mean())
    if mean_weight == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, len(weights), ess)
    value = float((weights * rewards).sum() / weights.sum())
    return mean_estimate(weights * (rewards - value) / mean_weight, value=value, ess=ess)


def doubly_robust(
    rewards: ArrayLike,
    propensities: ArrayLike,
    target: ArrayLike,
    q_logged: ArrayLike,
    q_target: ArrayLike,
) -> Estimate:
    """Doubly robust: ``q_target + pi_e / pi_b * (r - q_logged)`` per row.

    ``q_logged`` is the reward model's estimate for the logged action at the logged
    position, ``q_target`` its expected reward under the evaluation policy,
    ``sum_a pi_e(a | x, p) q(x, a, p)``. With ``q = 0`` this is IPS.

    >>> print(doubly_robust([1, 0, 0, 1], [0.5] * 4, [1.0, 0.0, 1.0, 0.0], [0.5] * 4, [0.5] * 4))
    0.5000 (95% CI -0.3002 to 1.3002, n=4)
    """
    weights = importance_weights(propensities, target)
    residual = np.asarray(rewards, dtype=np.float64) - np.asarray(q_logged, dtype=np.float64)
    terms = np.asarray(q_target, dtype=np.float64) + weights * residual
    return mean_estimate(terms, ess=effective_sample_size(weights))


def top_k_marginals(order: ArrayLike, n_items: int, k: int) -> np.ndarray:
    """``pi(a at p)`` of a deterministic ranking: 1 for the item ranked ``p``, else 0.

    ``order`` lists item indices best first; the result has one row per item and one
    column per position ``1..k``.

    >>> top_k_marginals([2, 0, 1], n_items=3, k=2).tolist()
    [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    """
    order = np.asarray(order, dtype=np.int64)[:k]
    marginals = np.zeros((n_items, k))
    marginals[order, np.arange(len(order))] = 1.0
    return marginals


def plackett_luce_marginals(
    utilities: ArrayLike, k: int, samples: int = 0, seed: int = 0
) -> np.ndarray:
    """``pi(a at p)`` for ``p = 1..k`` when the ranking is drawn by Plackett-Luce.

    Plackett-Luce picks the first item with probability ``exp(u_a) / sum exp(u)``, the
    second among the rest the same way, and so on: a softmax ranking, deterministic in
    the limit of large utility gaps. For ``k <= 3`` the marginals are exact and cost
    ``O(n^2)`` (position 3 sums over the ordered pairs above it). For deeper lists, or
    with ``samples > 0``, they are a Monte-Carlo estimate from ``samples`` rankings
    drawn by the Gumbel-top-k trick with a fixed ``seed``. Each column sums to 1.

    >>> m = plackett_luce_marginals(np.log([3.0, 2.0, 1.0]), k=2)
    >>> m.round(4).tolist()
    [[0.5, 0.35], [0.3333, 0.4], [0.1667, 0.25]]
    >>> bool(np.abs(plackett_luce_marginals(np.log([3.0, 2.0, 1.0]), 2, samples=20_000) - m).max()
    ...      < 0.02)
    True
    """
    utilities = np.asarray(utilities, dtype=np.float64)
    k = min(k, len(utilities))
    if samples > 0 or k > 3:
        return _plackett_luce_sampled(utilities, k, samples or 1000, seed)
    w = np.exp(utilities - utilities.max())
    w /= w.sum()
    columns = [w]
    if k >= 2:
        # P(b first, a second) = w_b / rest(b) * w_a, summed over b != a, where rest(b) is
        # the weight left once b is taken. Near-deterministic rankings leave rests far
        # below 1 that ``1 - w_b`` would round to 0: every sum here adds positive terms.
        v = w / np.maximum(_sum_without_one(w), np.finfo(float).tiny)
        columns.append(w * _sum_without_one(v))
    if k >= 3:
        # P(b, c, then a) = w_b / rest(b) * w_c / rest(b, c) * w_a, over ordered pairs
        # b != c that exclude a.
        with np.errstate(over="ignore", invalid="ignore"):
            pairs = v[:, None] * w[None, :] / np.maximum(_rest_of_pairs(w), np.finfo(float).tiny)
        pairs[~np.isfinite(pairs)] = 0.0  # only when the weight left underflowed to 0
        np.fill_diagonal(pairs, 0.0)
        columns.append(w * _sum_without_cross(pairs))
    # Utility gaps beyond ~700 underflow weights to 0: such items get probability 0 (and a
    # column may then fall short of 1); the guard keeps every entry a probability.
    return np.clip(np.nan_to_num(np.stack(columns, axis=1)), 0.0, 1.0)


def _sum_without_one(x: np.ndarray) -> np.ndarray:
    """``sum(x) - x[a]`` for every ``a``, as sums before and after ``a`` (no cancellation)."""
    before = np.concatenate(([0.0], np.cumsum(x)[:-1]))
    after = np.concatenate((np.cumsum(x[::-1])[::-1][1:], [0.0]))
    return before + after


def _rest_of_pairs(w: np.ndarray) -> np.ndarray:
    """``sum(w) - w[b] - w[c]`` for every pair, as sums of the weights left (no cancellation)."""
    n = len(w)
    before = np.concatenate(([0.0], np.cumsum(w)[:-1]))  # w[:b]
    after = np.concatenate((np.cumsum(w[::-1])[::-1][1:], [0.0]))  # w[b + 1:]
    # between[b, c] = w[b + 1 : c] for b < c
    between = np.triu(np.broadcast_to(w, (n, n)), k=1).cumsum(axis=1)
    between = np.concatenate((np.zeros((n, 1)), between[:, :-1]), axis=1)
    rest = before[:, None] + between + after[None, :]  # valid where b < c
    upper = np.triu(rest, k=1)
    return upper + upper.T


def _sum_without_cross(u: np.ndarray) -> np.ndarray:
    """``sum(u[b, c] for b != a and c != a)`` for every ``a``, for ``u >= 0``: each row
    without column ``a`` (sums before and after it), then each column without row ``a``,
    so that no large total is ever subtracted."""
    before = np.zeros_like(u)
    before[:, 1:] = np.cumsum(u[:, :-1], axis=1)
    after = np.zeros_like(u)
    after[:, :-1] = np.cumsum(u[:, :0:-1], axis=1)[:, ::-1]
    rows = before + after  # rows[b, a] = sum(u[b, c] for c != a)
    return np.triu(rows, k=1).sum(axis=0) + np.tril(rows, k=-1).sum(axis=0)


def _plackett_luce_sampled(utilities: np.ndarray, k: int, samples: int, seed: int) -> np.ndarray:
    """Monte-Carlo marginals: top ``k`` of ``utilities + Gumbel noise``, ``samples`` times."""
    rng = np.random.default_rng(seed)
    noisy = utilities[None, :] + rng.gumbel(size=(samples, len(utilities)))
    top = np.argsort(-noisy, axis=1)[:, :k]
    marginals = np.zeros((len(utilities), k))
    for p in range(k):
        marginals[:, p] = np.bincount(top[:, p], minlength=len(utilities)) / samples
    return marginals


class ItemPositionCTR:
    """A reward model for DR: clicks per show of each (item, position), learned online.

    The item's CTR at a position is shrunk towards the position's CTR by ``prior_shows``
    pseudo-shows, and the position's CTR towards ``prior_ctr`` the same way, so that an
    item never shown at a position is predicted at its position's rate. Shows and clicks
    are counted as they arrive (a click comes after its show), and a row's prediction
    is read before its own click is learned, which keeps DR unbiased.

    >>> model = ItemPositionCTR(n_items=2, n_positions=1, prior_shows=2.0)
    >>> for _ in range(8):
    ...     model.learn_one(0, 1, shows=1)
    >>> model.learn_one(0, 1, clicks=2)
    >>> model.predict_proba_many().round(4).tolist()  # item 1: never shown, position's rate
    [[0.242], [0.21]]
    """

    def __init__(
        self,
        n_items: int,
        n_positions: int,
        prior_shows: float = 20.0,
        prior_ctr: float = 0.05,
        prior_position_shows: float = 2.0,
    ) -> None:
        self.shows = np.zeros((n_items, n_positions))
        self.clicks = np.zeros((n_items, n_positions))
        self.prior_shows = prior_shows
        self.prior_ctr = prior_ctr
        self.prior_position_shows = prior_position_shows

    def learn_one(self, item: int, position: int, shows: float = 0.0, clicks: float = 0.0) -> None:
        """Count ``shows`` and ``clicks`` of ``item`` at 1-based ``position``."""
        self.shows[item, position - 1] += shows
        self.clicks[item, position - 1] += clicks

    def predict_proba_many(self) -> np.ndarray:
        """The CTR estimate of every item (rows) at every position (columns)."""
        m = self.prior_position_shows
        position_ctr = (self.clicks.sum(axis=0) + m * self.prior_ctr) / (self.shows.sum(axis=0) + m)
        return (self.clicks + self.prior_shows * position_ctr) / (self.shows + self.prior_shows)
