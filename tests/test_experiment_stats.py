"""A/B test statistics: right variances, safe peeking, and checks that catch what they should."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.experiment_stats import (
    AT_RISK,
    BREACHED,
    CONTROL_BETTER,
    SAFE,
    TREATMENT_BETTER,
    UNDECIDED,
    CupedTotals,
    RatioTotals,
    SequentialTest,
    compare,
    confidence_sequence,
    cuped_compare,
    guardrail,
    msprt_p_value,
    sample_ratio_mismatch,
)
from engine.store import HashRead, Increment, MemoryStore

CTR = 0.10


def shoppers(rng: np.random.Generator, shape: tuple[int, ...], ctr: float | np.ndarray):
    """Per-user (clicks, searches): users differ in how clicky they are, so clicks of
    one user are correlated and the binomial variance would be wrong."""
    searches = rng.poisson(2.0, size=shape) + 1
    propensity = rng.beta(1.0, (1 - CTR) / CTR, size=shape) * (np.asarray(ctr) / CTR)
    return rng.binomial(searches, np.clip(propensity, 0, 1)), searches


def cumulative_totals(clicks: np.ndarray, searches: np.ndarray) -> np.ndarray:
    """RatioTotals fields summed over the last axis (users), accumulated over axis 1 (looks)."""
    x, y = clicks.astype(np.float64), searches.astype(np.float64)
    sums = np.stack([x.sum(-1), y.sum(-1), (x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1)], -1)
    return np.cumsum(sums, axis=1)


def totals_at(sums: np.ndarray, users: int) -> RatioTotals:
    return RatioTotals(users, *(float(v) for v in sums))


# --- RatioTotals and compare -----------------------------------------------------------------


def test_delta_method_variance_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    clicks, searches = shoppers(rng, (4000, 300), CTR)
    ratios, variances = [], []
    for x, y in zip(clicks, searches, strict=True):
        totals = RatioTotals.from_users(x, y)
        ratios.append(totals.ratio)
        variances.append(totals.variance)
    empirical = np.var(ratios, ddof=1)
    assert np.mean(variances) == pytest.approx(empirical, rel=0.08)
    # The naive binomial variance over searches ignores that users differ: far too small.
    binomial = CTR * (1 - CTR) / searches.sum(axis=1).mean()
    assert binomial < 0.85 * empirical


def test_compare_by_hand() -> None:
    control = RatioTotals.from_users([1, 0, 2, 1], [2, 1, 3, 2])
    treatment = RatioTotals.from_users([2, 1, 1, 2], [2, 2, 2, 3])
    # Linearized per-user metric (x - R y) / mean_y; Var(R) = its sample variance / n.
    # control: R = 1/2, mean_y = 2, l = (0, -1/4, 1/4, 0): var = 1/24, Var(R) = 1/96.
    # treatment: R = 2/3, mean_y = 9/4, x - R y = (2/3, -1/3, -1/3, 0): var = 2/9,
    # Var(R) = 2/9 / (81/16) / 4 = 8/729.
    assert control.variance == pytest.approx(1 / 96)
    assert treatment.variance == pytest.approx(8 / 729)
    result = compare(control, treatment)
    stderr = math.sqrt(1 / 96 + 8 / 729)
    assert result.difference == pytest.approx(1 / 6)
    assert result.stderr == pytest.approx(stderr)
    assert result.difference_low == pytest.approx(1 / 6 - 1.959964 * stderr)
    assert result.p_value == pytest.approx(math.erfc((1 / 6) / stderr / math.sqrt(2)))
    log_se = math.sqrt((1 / 96) / (1 / 2) ** 2 + (8 / 729) / (2 / 3) ** 2)
    assert result.lift == pytest.approx(1 / 3)
    assert result.lift_low == pytest.approx(4 / 3 * math.exp(-1.959964 * log_se) - 1)
    assert result.lift_high == pytest.approx(4 / 3 * math.exp(1.959964 * log_se) - 1)
    assert not result.significant


def test_compare_without_users_concludes_nothing() -> None:
    result = compare(RatioTotals(0), RatioTotals(1, 1.0, 2.0, 1.0, 4.0, 2.0))
    assert result.p_value == 1.0
    assert math.isnan(result.lift)


def test_running_sums_from_counter_increments() -> None:
    """Counters kept with increments, event by event, equal the totals of the users."""
    rng = np.random.default_rng(1)
    store, per_user = MemoryStore(), {}
    for _ in range(500):
        user = f"u-{rng.integers(40)}"
        clicks, searches = int(rng.integers(0, 2)), int(rng.integers(0, 3))
        before = per_user.get(user)
        x, y = before or (0, 0)
        amounts = RatioTotals.increments(x, y, clicks, searches, new_user=before is None)
        store.apply([Increment("exp:personalized", amounts)])
        per_user[user] = (x + clicks, y + searches)
    (fields,) = store.read([HashRead("exp:personalized")])
    x, y = np.array(list(per_user.values())).T
    assert RatioTotals.from_fields(fields) == RatioTotals.from_users(x, y)


def test_pooled_totals_add_up() -> None:
    a = RatioTotals.from_users([1, 2], [3, 4])
    b = RatioTotals.from_users([0, 5], [1, 6])
    assert a + b == RatioTotals.from_users([1, 2, 0, 5], [3, 4, 1, 6])


# --- sequential testing ----------------------------------------------------------------------

RUNS, LOOKS, USERS_PER_LOOK = 200, 30, 200


def peeking_experiments(rng, runs, looks, users, lift):
    clicks, searches = shoppers(rng, (runs, looks, 2, users), np.array([[CTR], [CTR * lift]]))
    return cumulative_totals(clicks, searches)  # (runs, looks, 2 variants, 5 sums)


def test_aa_msprt_stays_within_alpha_while_naive_peeking_does_not() -> None:
    sums = peeking_experiments(np.random.default_rng(2), RUNS, LOOKS, USERS_PER_LOOK, 1.0)
    msprt_rejections = naive_rejections = 0
    for run in sums:
        test = SequentialTest(tau=0.01, alpha=0.05)
        naive_rejected = False
        for look, (control, treatment) in enumerate(run, start=1):
            users = look * USERS_PER_LOOK
            result = compare(totals_at(control, users), totals_at(treatment, users))
            test.update(result)
            naive_rejected |= result.p_value < 0.05
        msprt_rejections += test.verdict != UNDECIDED
        naive_rejections += naive_rejected
    assert msprt_rejections / RUNS <= 0.05
    # Checking the fixed-horizon p-value after every batch rejects far more than 5 %.
    assert naive_rejections / RUNS > 0.10


def test_ab_true_lift_is_detected_and_covered() -> None:
    runs, users_per_look, lift = 100, 700, 1.10
    sums = peeking_experiments(np.random.default_rng(3), runs, LOOKS, users_per_look, lift)
    detected = lift_covered = sequence_covered = 0
    true_difference = CTR * (lift - 1)
    for run in sums:
        test = SequentialTest(tau=0.01, alpha=0.05)
        for look, (control, treatment) in enumerate(run, start=1):
            users = look * users_per_look
            result = compare(totals_at(control, users), totals_at(treatment, users))
            test.update(result)
        detected += test.verdict == TREATMENT_BETTER
        lift_covered += result.lift_low <= lift - 1 <= result.lift_high
        sequence_covered += test.low <= true_difference <= test.high
    assert detected / runs >= 0.8
    assert lift_covered / runs >= 0.9
    assert sequence_covered / runs >= 0.9  # always valid: 95 % nominal, at every look


def test_sequential_test_direction_and_monotone_p_value() -> None:
    rng = np.random.default_rng(4)
    worse = SequentialTest(tau=0.01)
    latency_like = SequentialTest(tau=0.01, higher_is_better=False)
    control = treatment = RatioTotals(0)
    p_values = []
    for _ in range(20):
        clicks, searches = shoppers(rng, (2, 1000), np.array([[CTR], [CTR * 0.8]]))
        control += RatioTotals.from_users(clicks[0], searches[0])
        treatment += RatioTotals.from_users(clicks[1], searches[1])
        worse.update(compare(control, treatment))
        latency_like.update(compare(control, treatment))
        p_values.append(worse.p_value)
    assert worse.verdict == CONTROL_BETTER
    assert latency_like.verdict == TREATMENT_BETTER
    assert p_values == sorted(p_values, reverse=True)
    assert worse.high < 0


def test_sequential_test_skips_looks_with_few_users() -> None:
    test = SequentialTest(tau=0.01, min_users=100)
    control = RatioTotals.from_users([0] * 50, [1] * 50)
    treatment = RatioTotals.from_users([1] * 49 + [0], [1] * 50)
    assert test.update(compare(control, treatment)) == UNDECIDED
    assert test.looks == 0 and test.p_value == 1.0


def test_confidence_sequence_is_the_inverted_msprt() -> None:
    low, high = confidence_sequence(0.03, 1e-4, tau=0.01, alpha=0.05)
    # At the edge of the sequence, the mSPRT of that difference is exactly alpha.
    assert msprt_p_value(0.03 - low, 1e-4, tau=0.01) == pytest.approx(0.05)
    assert msprt_p_value(high - 0.03, 1e-4, tau=0.01) == pytest.approx(0.05)
    # Wider than the fixed-horizon interval: the price of looking at any time.
    assert high - low > 2 * 1.96 * 0.01


# --- sample ratio mismatch -------------------------------------------------------------------


def test_srm_flags_a_52_48_split_and_not_an_honest_one() -> None:
    rng = np.random.default_rng(5)
    shares = {"control": 0.5, "personalized": 0.5}
    skewed = int((rng.random(20_000) < 0.52).sum())
    flagged = sample_ratio_mismatch({"control": skewed, "personalized": 20_000 - skewed}, shares)
    assert flagged.flagged and flagged.p_value < 1e-6
    honest = int((rng.random(20_000) < 0.5).sum())
    check = sample_ratio_mismatch({"control": honest, "personalized": 20_000 - honest}, shares)
    assert not check.flagged
    assert check.expected == (10_000.0, 10_000.0)


def test_srm_false_alarms_are_rare_and_shares_need_not_be_even() -> None:
    rng = np.random.default_rng(6)
    counts = rng.multinomial(5000, [0.1, 0.3, 0.6], size=1000)
    alarms = sum(sample_ratio_mismatch(c, [1, 3, 6]).flagged for c in counts)
    assert alarms <= 5  # about 1 expected at the 0.001 threshold
    assert sample_ratio_mismatch([500, 1500, 3000], [1, 3, 6]).p_value == pytest.approx(1.0)
    assert sample_ratio_mismatch([500, 1600, 2900], [1, 3, 6], threshold=0.05).flagged


def test_srm_refuses_mismatched_variants() -> None:
    with pytest.raises(ValueError):
        sample_ratio_mismatch([1, 2, 3], [0.5, 0.5])


# --- CUPED -----------------------------------------------------------------------------------


def test_cuped_reduces_variance_and_stays_unbiased() -> None:
    rng = np.random.default_rng(7)
    experiments, users, lift = 300, 2000, 1.10
    propensity = 0.9 * rng.beta(1.0, 4.0, size=(experiments, 2, users))
    before = rng.binomial(20, propensity)  # last week's clicks: predicts this week's
    propensity[:, 1] *= lift
    searches = rng.poisson(10.0, size=propensity.shape) + 1
    clicks = rng.binomial(searches, propensity)
    true_difference = 0.9 * 0.2 * (lift - 1)  # the mean of Beta(1, 4) is 0.2
    plain, adjusted, adjusted_stderr = [], [], []
    for e in range(experiments):
        control = CupedTotals.from_users(clicks[e, 0], searches[e, 0], before[e, 0])
        treatment = CupedTotals.from_users(clicks[e, 1], searches[e, 1], before[e, 1])
        plain.append(compare(control.metric, treatment.metric).difference)
        result = cuped_compare(control, treatment)
        adjusted.append(result.difference)
        adjusted_stderr.append(result.stderr)
    plain_sd, adjusted_sd = np.std(plain, ddof=1), np.std(adjusted, ddof=1)
    assert adjusted_sd < 0.8 * plain_sd
    assert abs(np.mean(adjusted) - true_difference) < 3 * adjusted_sd / np.sqrt(experiments)
    assert np.mean(adjusted_stderr) == pytest.approx(adjusted_sd, rel=0.15)


def test_cuped_with_a_useless_covariate_changes_little() -> None:
    rng = np.random.default_rng(8)
    clicks, searches = shoppers(rng, (2, 3000), CTR)
    noise = rng.normal(size=(2, 3000))
    control = CupedTotals.from_users(clicks[0], searches[0], noise[0])
    treatment = CupedTotals.from_users(clicks[1], searches[1], noise[1])
    plain = compare(control.metric, treatment.metric)
    adjusted = cuped_compare(control, treatment)
    assert adjusted.stderr == pytest.approx(plain.stderr, rel=0.02)
    assert adjusted.difference == pytest.approx(plain.difference, abs=0.2 * plain.stderr)


# --- guardrails ------------------------------------------------------------------------------


def test_guardrail_states() -> None:
    rng = np.random.default_rng(9)

    def comparison(lift: float, users: int):
        clicks, searches = shoppers(rng, (2, users), np.array([[CTR], [CTR * lift]]))
        return compare(
            RatioTotals.from_users(clicks[0], searches[0]),
            RatioTotals.from_users(clicks[1], searches[1]),
        )

    assert guardrail(comparison(0.80, 50_000), max_degradation=0.05) == BREACHED
    assert guardrail(comparison(1.00, 50_000), max_degradation=0.05) == SAFE
    assert guardrail(comparison(1.00, 500), max_degradation=0.05) == AT_RISK
    # A metric where lower is better (latency, bounces): a 20 % rise is a breach.
    assert guardrail(comparison(1.20, 50_000), 0.05, higher_is_better=False) == BREACHED
    assert guardrail(comparison(0.80, 50_000), 0.05, higher_is_better=False) == SAFE
