"""Statistics of an A/B test, computed from running sums.

Users are the randomization unit, so a metric such as the click-through rate is a
*ratio of means over users*: clicks per user over searches per user. A user's
searches are not independent of each other, so the binomial variance of "clicks over
searches" is too small; the delta method over per-user totals is the right one.
Everything here needs only sums over users (of ``x``, ``y``, ``x**2``, ``y**2``,
``x*y``), which live counters can keep with increments (:meth:`RatioTotals.increments`).

- :func:`compare` gives the difference and relative lift of treatment over control,
  with confidence intervals and a fixed-horizon p-value: valid if looked at *once*.
- :class:`SequentialTest` is valid however often it is looked at: a mixture
  sequential probability ratio test (mSPRT, Johari et al., "Always valid inference")
  with an always-valid p-value and confidence sequence.
- :func:`sample_ratio_mismatch` checks that users were split as configured: when
  not, assignment or logging is broken and no result of the test can be trusted.
- :func:`cuped_compare` removes the part of the metric a pre-experiment covariate
  predicts (CUPED), for narrower intervals at the same traffic.
- :func:`guardrail` says whether a metric that must not get worse did.

Two variants of 2,000 users each, the treatment's click-through rate 10 % higher:

>>> rng = np.random.default_rng(3)
>>> searches = rng.poisson(3.0, size=(2, 2000)) + 1
>>> clicks = rng.binomial(searches, [[0.10], [0.11]])
>>> control = RatioTotals.from_users(clicks[0], searches[0])
>>> treatment = RatioTotals.from_users(clicks[1], searches[1])
>>> print(compare(control, treatment))
+0.0145 (95% CI +0.0050 to +0.0240), lift +14.3% (95% CI +4.7% to +24.8%), p=0.0027
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

TREATMENT_BETTER = "treatment better"
CONTROL_BETTER = "control better"
UNDECIDED = "no decision yet"

BREACHED = "breached"
AT_RISK = "at risk"
SAFE = "safe"


# --- one variant's totals --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RatioTotals:
    """One variant's sums over users of a ratio metric ``x / y``.

    For the click-through rate, ``x`` is a user's clicks and ``y`` their searches;
    for a per-user mean (revenue per user), ``y`` is 1 for every user. The field
    names double as the fields of a counter hash (:meth:`from_fields`).

    Parameters
    ----------
    users
        Users in the variant.
    numerator, denominator
        Sums of ``x`` and ``y`` over users.
    numerator_sq, denominator_sq, cross
        Sums of ``x**2``, ``y**2`` and ``x*y`` over users.

    Examples
    --------
    >>> totals = RatioTotals.from_users(clicks=[1, 0, 2], searches=[2, 1, 3])
    >>> totals.users, totals.numerator, totals.denominator, totals.cross
    (3, 3.0, 6.0, 8.0)
    >>> totals.ratio, round(totals.variance, 6)
    (0.5, 0.020833)

    A user who had 1 click in 2 searches makes another search and clicks:

    >>> step = RatioTotals.increments(1, 2, clicks=1, searches=1)
    >>> step["numerator_sq"], step["denominator_sq"], step["cross"]  # 1->4, 4->9, 2->6
    (3, 5, 4)
    """

    users: int
    numerator: float = 0.0
    denominator: float = 0.0
    numerator_sq: float = 0.0
    denominator_sq: float = 0.0
    cross: float = 0.0

    @classmethod
    def from_users(cls, clicks: ArrayLike, searches: ArrayLike | None = None) -> RatioTotals:
        """Totals of per-user ``x`` (``clicks``) and ``y`` (``searches``; 1 each if omitted)."""
        x = np.asarray(clicks, dtype=np.float64)
        y = np.ones_like(x) if searches is None else np.asarray(searches, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{x.shape} numerators for {y.shape} denominators")
        return cls(
            users=len(x),
            numerator=float(x.sum()),
            denominator=float(y.sum()),
            numerator_sq=float(x @ x),
            denominator_sq=float(y @ y),
            cross=float(x @ y),
        )

    @classmethod
    def from_fields(cls, values: Mapping[str, str | float]) -> RatioTotals:
        """Totals from a counter hash (as a store reads it: strings, absent fields 0)."""
        return cls(
            **{
                f.name: (int if f.name == "users" else float)(float(values.get(f.name, 0)))
                for f in fields(cls)
            }
        )

    @staticmethod
    def increments(
        clicks_before: float,
        searches_before: float,
        clicks: float = 0.0,
        searches: float = 0.0,
        *,
        new_user: bool = False,
    ) -> dict[str, float]:
        """What to add to the counters when a user's totals grow by ``clicks`` and ``searches``.

        The squares need the user's totals before the event (the stream keeps them
        per user): ``(x + dx)**2 - x**2 = 2*x*dx + dx**2``.
        """
        x, y, dx, dy = clicks_before, searches_before, clicks, searches
        return {
            "users": 1 if new_user else 0,
            "numerator": dx,
            "denominator": dy,
            "numerator_sq": 2 * x * dx + dx * dx,
            "denominator_sq": 2 * y * dy + dy * dy,
            "cross": x * dy + y * dx + dx * dy,
        }

    def __add__(self, other: RatioTotals) -> RatioTotals:
        """Pooled totals (sums add up)."""
        return RatioTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def ratio(self) -> float:
        """The metric: sum of ``x`` over sum of ``y`` (nan without any ``y``)."""
        return self.numerator / self.denominator if self.denominator else math.nan

    @property
    def variance(self) -> float:
        """The delta-method variance of :attr:`ratio` (inf with fewer than 2 users).

        ``Var(R) ~ (s_xx - 2 R s_xy + R**2 s_yy) / (n * mean_y**2)`` with the sample
        (co)variances of the per-user ``x`` and ``y``: the variance of the mean of the
        linearized metric ``(x - R y) / mean_y``.
        """
        if self.users < 2 or not self.denominator:
            return math.inf
        s_xx, s_yy, s_xy = self._covariances()
        r = self.ratio
        mean_y = self.denominator / self.users
        return max(s_xx - 2 * r * s_xy + r * r * s_yy, 0.0) / (self.users * mean_y**2)

    def _covariances(self) -> tuple[float, float, float]:
        n = self.users
        mx, my = self.numerator / n, self.denominator / n
        return (
            (self.numerator_sq - n * mx * mx) / (n - 1),
            (self.denominator_sq - n * my * my) / (n - 1),
            (self.cross - n * mx * my) / (n - 1),
        )


# --- fixed-horizon comparison ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    """Treatment against control: difference and relative lift, with ``1 - alpha`` intervals.

    The lift interval comes from the log of the ratio of ratios (delta method), so it
    is asymmetric and never goes below -100 %. ``p_value`` is a two-sided z-test of
    no difference, valid for one look at a horizon fixed in advance.
    """

    control: float
    treatment: float
    difference: float
    difference_low: float
    difference_high: float
    stderr: float
    lift: float
    lift_low: float
    lift_high: float
    p_value: float
    alpha: float
    control_users: int
    treatment_users: int

    @property
    def significant(self) -> bool:
        return self.p_value <= self.alpha

    def __str__(self) -> str:
        level = round(100 * (1 - self.alpha))
        return (
            f"{self.difference:+.4f} ({level}% CI {self.difference_low:+.4f} to "
            f"{self.difference_high:+.4f}), lift {self.lift:+.1%} ({level}% CI "
            f"{self.lift_low:+.1%} to {self.lift_high:+.1%}), p={self.p_value:.4f}"
        )


def compare(control: RatioTotals, treatment: RatioTotals, alpha: float = 0.05) -> Comparison:
    """Treatment against control on a ratio metric, for one look at a fixed horizon.

    >>> control = RatioTotals.from_users([1, 0, 2, 1], [2, 1, 3, 2])
    >>> treatment = RatioTotals.from_users([2, 1, 1, 2], [2, 2, 2, 3])
    >>> print(compare(control, treatment))
    +0.1667 (95% CI -0.1200 to +0.4533), lift +33.3% (95% CI -19.5% to +120.9%), p=0.2545
    """
    return _comparison(
        control.ratio,
        control.variance,
        treatment.ratio,
        treatment.variance,
        alpha,
        control.users,
        treatment.users,
    )


def _comparison(
    control: float,
    control_variance: float,
    treatment: float,
    treatment_variance: float,
    alpha: float,
    control_users: int,
    treatment_users: int,
) -> Comparison:
    z = float(stats.norm.ppf(1 - alpha / 2))
    difference = treatment - control
    stderr = math.sqrt(control_variance + treatment_variance)
    if stderr > 0 and math.isfinite(stderr):
        p_value = float(2 * stats.norm.sf(abs(difference) / stderr))
    else:  # no spread yet (or no users): nothing can be concluded
        p_value = 1.0
    lift, lift_low, lift_high = math.nan, math.nan, math.nan
    if control > 0 and treatment > 0:
        lift = treatment / control - 1
        # Var(log T - log C) ~ Var(T)/T**2 + Var(C)/C**2: a ratio's interval is asymmetric.
        log_se = math.sqrt(control_variance / control**2 + treatment_variance / treatment**2)
        log_lift = math.log(treatment / control)
        lift_low = math.exp(log_lift - z * log_se) - 1
        lift_high = math.exp(log_lift + z * log_se) - 1
    return Comparison(
        control=control,
        treatment=treatment,
        difference=difference,
        difference_low=difference - z * stderr,
        difference_high=difference + z * stderr,
        stderr=stderr,
        lift=lift,
        lift_low=lift_low,
        lift_high=lift_high,
        p_value=p_value,
        alpha=alpha,
        control_users=control_users,
        treatment_users=treatment_users,
    )


# --- sequential test -------------------------------------------------------------------------


def msprt_p_value(difference: float, variance: float, tau: float) -> float:
    """One look's mSPRT p-value for "no difference": ``min(1, 1 / Lambda)``.

    ``Lambda`` is the likelihood ratio of the estimate under a normal mixture of true
    differences ``N(0, tau**2)`` against a difference of zero, with the estimate's
    ``variance`` (Johari et al. 2017, eq. 11 with ``V = 2 sigma**2 / n``):
    ``sqrt(V / (V + tau**2)) * exp(tau**2 d**2 / (2 V (V + tau**2)))``.

    >>> round(msprt_p_value(0.0, 1e-4, tau=0.01), 4)  # no difference: evidence for none
    1.0
    >>> round(msprt_p_value(0.05, 1e-4, tau=0.01), 6)  # five standard errors away
    0.00273
    """
    if not (variance > 0 and math.isfinite(variance)):
        return 1.0
    total = variance + tau * tau
    log_lambda = 0.5 * math.log(variance / total) + (
        tau * tau * difference * difference / (2 * variance * total)
    )
    return min(1.0, math.exp(-log_lambda))


def confidence_sequence(
    difference: float, variance: float, tau: float, alpha: float = 0.05
) -> tuple[float, float]:
    """The always-valid ``1 - alpha`` interval of a difference: the mSPRT inverted.

    The true difference stays inside these intervals at *every* look with probability
    ``1 - alpha``; they are wider than the fixed-horizon interval, the price of peeking.

    >>> low, high = confidence_sequence(0.05, 1e-4, tau=0.01)
    >>> round(low, 4), round(high, 4)
    (0.0134, 0.0866)
    """
    if not (variance > 0 and math.isfinite(variance)):
        return -math.inf, math.inf
    total = variance + tau * tau
    half = math.sqrt(
        variance * total / (tau * tau) * (2 * math.log(1 / alpha) + math.log(total / variance))
    )
    return difference - half, difference + half


class SequentialTest:
    """An A/B test that may be looked at after every batch of traffic.

    A fixed-horizon p-value checked again and again will dip below ``alpha`` by
    chance far more often than ``alpha`` of the time. The mSPRT p-value does not:
    the chance that it *ever* goes below ``alpha`` in an A/A test is at most
    ``alpha``, so the test can stop as soon as it does. The p-value kept is the
    running minimum, and the confidence sequence the running intersection (both
    remain valid); the verdict, once reached, is final.

    Parameters
    ----------
    tau
        Standard deviation of the mixture over true differences, in the metric's
        units: about the size of difference the test should find fast (0.01 for one
        point of click-through rate). Any value keeps the test valid; a good one
        makes it stop sooner.
    alpha
        False-positive rate, over the whole life of the test.
    higher_is_better
        Whether a larger metric is better (clicks) or worse (latency, bounces).
    min_users
        Looks with fewer users in either variant are skipped: their variance
        estimate is too noisy to plug in.

    Attributes
    ----------
    p_value
        The always-valid p-value (non-increasing).
    low, high
        The always-valid confidence sequence of the difference (narrowing).
    verdict
        :data:`TREATMENT_BETTER`, :data:`CONTROL_BETTER` or :data:`UNDECIDED`.

    Examples
    --------
    >>> rng = np.random.default_rng(5)
    >>> test = SequentialTest(tau=0.01)
    >>> control, treatment = RatioTotals(0), RatioTotals(0)
    >>> for day in range(30):
    ...     searches = rng.poisson(3.0, size=(2, 1000)) + 1
    ...     clicks = rng.binomial(searches, [[0.10], [0.12]])
    ...     control += RatioTotals.from_users(clicks[0], searches[0])
    ...     treatment += RatioTotals.from_users(clicks[1], searches[1])
    ...     if test.update(compare(control, treatment)) != UNDECIDED:
    ...         break
    >>> day, test.verdict, test.p_value < 0.05
    (1, 'treatment better', True)
    """

    def __init__(
        self,
        tau: float,
        alpha: float = 0.05,
        higher_is_better: bool = True,
        min_users: int = 100,
    ) -> None:
        if tau <= 0:
            raise ValueError("tau must be positive")
        self.tau = tau
        self.alpha = alpha
        self.higher_is_better = higher_is_better
        self.min_users = min_users
        self.p_value = 1.0
        self.low = -math.inf
        self.high = math.inf
        self.verdict = UNDECIDED
        self.looks = 0

    def update(self, comparison: Comparison) -> str:
        """Take one look at the current totals' comparison; return the verdict so far."""
        if min(comparison.control_users, comparison.treatment_users) < self.min_users:
            return self.verdict
        self.looks += 1
        variance = comparison.stderr**2
        self.p_value = min(self.p_value, msprt_p_value(comparison.difference, variance, self.tau))
        low, high = confidence_sequence(comparison.difference, variance, self.tau, self.alpha)
        self.low, self.high = max(self.low, low), min(self.high, high)
        if self.verdict == UNDECIDED and self.p_value <= self.alpha:
            better = (comparison.difference > 0) == self.higher_is_better
            self.verdict = TREATMENT_BETTER if better else CONTROL_BETTER
        return self.verdict


# --- sample ratio mismatch -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleRatioCheck:
    """Observed users per variant against the configured split (chi-square fit)."""

    counts: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    p_value: float
    flagged: bool


def sample_ratio_mismatch(
    counts: Mapping[str, int] | Sequence[int],
    shares: Mapping[str, float] | Sequence[float],
    threshold: float = 0.001,
) -> SampleRatioCheck:
    """Whether users reached the variants in the configured shares.

    Flagged when the chi-square goodness-of-fit p-value is below ``threshold``: the
    threshold is strict because the check runs all the time, and a flag means the
    experiment is broken (assignment, redirects, bots or logging), not just unlucky.
    Shares need not sum to 1; with mappings, variants are matched by name.

    >>> sample_ratio_mismatch({"control": 5100, "personalized": 4900},
    ...                       {"control": 0.5, "personalized": 0.5}).flagged
    False
    >>> sample_ratio_mismatch([5400, 4600], [0.5, 0.5]).flagged
    True
    """
    if isinstance(shares, Mapping):
        names = list(shares)
        weights = [float(shares[name]) for name in names]
        if isinstance(counts, Mapping):
            observed = [int(counts.get(name, 0)) for name in names]
        else:
            observed = [int(c) for c in counts]
    else:
        if isinstance(counts, Mapping):
            raise TypeError("counts by variant name need shares by variant name")
        weights = [float(s) for s in shares]
        observed = [int(c) for c in counts]
    if len(observed) != len(weights):
        raise ValueError(f"{len(observed)} counts for {len(weights)} shares")
    total = sum(observed)
    expected = [total * w / sum(weights) for w in weights]
    if total == 0:
        return SampleRatioCheck(tuple(observed), tuple(expected), 0.0, 1.0, False)
    statistic, p_value = stats.chisquare(observed, expected)
    return SampleRatioCheck(
        counts=tuple(observed),
        expected=tuple(expected),
        statistic=float(statistic),
        p_value=float(p_value),
        flagged=bool(p_value < threshold),
    )


# --- CUPED -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CupedTotals:
    """A variant's metric totals with those of a pre-experiment covariate ``c``.

    ``c`` is measured before the user's first exposure (their clicks the week
    before, say), so the treatment cannot have moved it; users without history
    count with ``c = 0``.

    Parameters
    ----------
    metric
        The metric's :class:`RatioTotals`.
    covariate, covariate_sq
        Sums of ``c`` and ``c**2`` over the same users.
    cross_numerator, cross_denominator
        Sums of ``c*x`` and ``c*y``.
    """

    metric: RatioTotals
    covariate: float = 0.0
    covariate_sq: float = 0.0
    cross_numerator: float = 0.0
    cross_denominator: float = 0.0

    @classmethod
    def from_users(
        cls, clicks: ArrayLike, searches: ArrayLike | None, covariate: ArrayLike
    ) -> CupedTotals:
        """Totals of per-user ``x``, ``y`` (1 each if ``None``) and covariate ``c``."""
        x = np.asarray(clicks, dtype=np.float64)
        y = np.ones_like(x) if searches is None else np.asarray(searches, dtype=np.float64)
        c = np.asarray(covariate, dtype=np.float64)
        if c.shape != x.shape:
            raise ValueError(f"{c.shape} covariates for {x.shape} users")
        return cls(
            metric=RatioTotals.from_users(x, y),
            covariate=float(c.sum()),
            covariate_sq=float(c @ c),
            cross_numerator=float(c @ x),
            cross_denominator=float(c @ y),
        )

    def __add__(self, other: CupedTotals) -> CupedTotals:
        return CupedTotals(
            self.metric + other.metric,
            self.covariate + other.covariate,
            self.covariate_sq + other.covariate_sq,
            self.cross_numerator + other.cross_numerator,
            self.cross_denominator + other.cross_denominator,
        )

    def _moments(self) -> tuple[float, float, float]:
        """Per user: variance of the linearized metric, of ``c``, and their covariance."""
        m, n = self.metric, self.metric.users
        r, mean_y = m.ratio, m.denominator / n
        s_xx, s_yy, s_xy = m._covariances()
        mean_c = self.covariate / n
        s_cc = (self.covariate_sq - n * mean_c * mean_c) / (n - 1)
        s_cx = (self.cross_numerator - n * mean_c * m.numerator / n) / (n - 1)
        s_cy = (self.cross_denominator - n * mean_c * mean_y) / (n - 1)
        # The ratio moves like the mean of (x - R y) / mean_y: its linearization.
        s_ll = (s_xx - 2 * r * s_xy + r * r * s_yy) / mean_y**2
        s_lc = (s_cx - r * s_cy) / mean_y
        return s_ll, s_cc, s_lc


def cuped_theta(control: CupedTotals, treatment: CupedTotals) -> float:
    """The covariate's coefficient, ``cov(metric, c) / var(c)``, from both variants pooled.

    Pooling keeps the estimate of the difference unbiased: the same ``theta`` is
    subtracted from both variants, and randomization makes their mean ``c`` equal
    in expectation.
    """
    _, s_cc, s_lc = (control + treatment)._moments()
    return s_lc / s_cc if s_cc > 0 else 0.0


def cuped_compare(control: CupedTotals, treatment: CupedTotals, alpha: float = 0.05) -> Comparison:
    """:func:`compare`, after removing what the pre-experiment covariate predicts.

    Each variant's ratio becomes ``R - theta * (mean_c - pooled mean_c)``, whose
    variance is ``var(l) - 2 theta cov(l, c) + theta**2 var(c)`` over users: smaller
    by the share of the metric's variance the covariate explains.

    >>> rng = np.random.default_rng(11)
    >>> propensity = rng.beta(1, 4, size=(2, 3000))  # how clicky each user is
    >>> before = rng.binomial(20, propensity)  # their clicks in 20 searches last week
    >>> searches = rng.poisson(10.0, size=(2, 3000)) + 1
    >>> clicks = rng.binomial(searches, propensity)
    >>> control = CupedTotals.from_users(clicks[0], searches[0], before[0])
    >>> treatment = CupedTotals.from_users(clicks[1], searches[1], before[1])
    >>> plain = compare(control.metric, treatment.metric)
    >>> adjusted = cuped_compare(control, treatment)
    >>> round(adjusted.stderr / plain.stderr, 2)
    0.7
    """
    theta = cuped_theta(control, treatment)
    pooled = control + treatment
    pooled_mean_c = pooled.covariate / pooled.metric.users
    adjusted = []
    for totals in (control, treatment):
        n = totals.metric.users
        if n < 2 or not totals.metric.denominator:
            adjusted.append((totals.metric.ratio, math.inf))
            continue
        s_ll, s_cc, s_lc = totals._moments()
        ratio = totals.metric.ratio - theta * (totals.covariate / n - pooled_mean_c)
        variance = max(s_ll - 2 * theta * s_lc + theta * theta * s_cc, 0.0) / n
        adjusted.append((ratio, variance))
    (c_ratio, c_var), (t_ratio, t_var) = adjusted
    return _comparison(
        c_ratio, c_var, t_ratio, t_var, alpha, control.metric.users, treatment.metric.users
    )


# --- guardrails ------------------------------------------------------------------------------


def guardrail(comparison: Comparison, max_degradation: float, higher_is_better: bool = True) -> str:
    """Whether a guardrail metric got worse than tolerated, from its lift interval.

    - :data:`BREACHED`: the whole interval of the lift is worse than
      ``max_degradation`` (e.g. 0.02 for 2 %): stop the experiment.
    - :data:`AT_RISK`: a degradation beyond the tolerance is not ruled out yet.
    - :data:`SAFE`: the interval rules it out (non-inferiority shown).

    >>> c = RatioTotals.from_users([1, 0, 2, 1] * 500, [2, 1, 3, 2] * 500)
    >>> t = RatioTotals.from_users([1, 0, 1, 1] * 500, [2, 1, 3, 2] * 500)
    >>> guardrail(compare(c, t), max_degradation=0.02)
    'breached'
    >>> guardrail(compare(c, c), max_degradation=0.02)  # lift CI -2.2% to +2.2%
    'at risk'
    >>> guardrail(compare(c, c), max_degradation=0.05)
    'safe'
    """
    if higher_is_better:
        worst, best = comparison.lift_low, comparison.lift_high
        if best < -max_degradation:
            return BREACHED
        return AT_RISK if not worst >= -max_degradation else SAFE
    worst, best = comparison.lift_high, comparison.lift_low
    if best > max_degradation:
        return BREACHED
    return AT_RISK if not worst <= max_degradation else SAFE
