"""The experiment report: live counters in, statistics out (a JSON-ready dict).

For every experiment of the configuration the workers run (``xp:config``):

- per variant: users, requests, impressions, clicks, CTR (clicks per search), CTR@k, MRR
  of clicks, add-to-carts, purchases and their rates, revenue per search, latency;
- per treatment against the control, on the primary metric: difference and relative lift
  with delta-method intervals (one look), the mSPRT sequential test (always-valid p-value,
  confidence sequence and verdict: valid however often the report is looked at; its state
  is kept in ``xp:{exp}:seq:{variant}``, so the p-value only falls and a verdict stays),
  guardrails (:func:`~engine.experiment_stats.guardrail`), and CUPED when the experiment
  names a pre-experiment;
- the sample-ratio check of users per variant against the configured shares;
- per interleaved variant: wins, losses and ties of its two rankers and the sign test;
- a time series per metric and variant: the cumulative value at the end of every
  :data:`~engine.experiment_metrics.BUCKET_S` bucket of the last ``history_s`` seconds.

>>> from engine.experiment_config import default_config
>>> from engine.experiment_metrics import ExperimentCounter, ServedRequest, config_writes
>>> from engine.store import MemoryStore
>>> store = MemoryStore()
>>> config = default_config("s", control_share=0.5)
>>> _ = store.apply(config_writes(config))
>>> served = [ServedRequest(f"r-{n}", f"u-{n}", {"default": "control"}, ("i",), 2.0)
...           for n in range(3)]
>>> _ = store.apply_many(ExperimentCounter(store, config).request_batches(served, now=0.0))
>>> report = experiment_report(store, now=5.0)
>>> control = report["experiments"][0]["variants"]["control"]
>>> control["users"], control["requests"], control["latency_ms"]
(3, 3, 2.0)
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from engine.experiment_config import (
    METRICS,
    Experiment,
    ExperimentConfig,
    default_config,
    parse_config,
)
from engine.experiment_metrics import (
    BUCKET_S,
    CONFIG_KEY,
    bucket_of,
    ratio_totals,
    series_key,
    variant_key,
)
from engine.experiment_stats import (
    UNDECIDED,
    Comparison,
    CupedTotals,
    SequentialTest,
    compare,
    cuped_compare,
    guardrail,
    msprt_p_value,
    sample_ratio_mismatch,
)
from engine.interleaving import A_BETTER, B_BETTER, interleaving_test
from engine.store import BlobRead, HashRead, Read, SetFields, Store

#: Metrics in the report and the counter each is made of (all per search request).
#: Mixture scale of the interleaving mSPRT, in units of the mean outcome (+1, 0, -1).
INTERLEAVING_TAU = 0.05
CHARTED = ("ctr", "ctr_at_k", "mrr", "revenue_per_request", "latency_ms")


def sequential_key(experiment: str, variant: str) -> str:
    return f"xp:{experiment}:seq:{variant}"


def read_config(store: Store) -> ExperimentConfig:
    """The configuration the workers published (the default one if none did yet)."""
    (blob,) = store.read([BlobRead(CONFIG_KEY)])
    if not blob:
        return default_config()
    body = orjson.loads(blob)
    return parse_config(body, source=body.get("source", "redis"))


def experiment_report(
    store: Store,
    now: float,
    config: ExperimentConfig | None = None,
    history_s: float = 3600.0,
    record_look: bool = True,
) -> dict[str, Any]:
    """The report of every experiment (see the module docstring); one read round trip.

    With ``record_look`` the sequential tests' state is updated with this look (the running
    minimum p-value and the intersected confidence sequence are written back).
    """
    config = config or read_config(store)
    reads: list[Read] = []
    plan = []
    for e in config.experiments:
        start = max(e.start, now - history_s)
        buckets = list(range(bucket_of(start), bucket_of(now) + 1, BUCKET_S))[-720:]
        plan.append((e, buckets))
        reads += [HashRead(variant_key(e.name, v.name)) for v in e.variants]
        reads += [HashRead(sequential_key(e.name, v.name)) for v in e.treatments]
        reads += [HashRead(series_key(e.name, b)) for b in buckets]
    replies = iter(store.read(reads) if reads else [])
    experiments, writes = [], []
    for e, buckets in plan:
        values = {v.name: _floats(next(replies)) for v in e.variants}
        looks = {v.name: next(replies) for v in e.treatments}
        series = [_floats(next(replies)) for _ in buckets]
        body, seq_writes = _experiment(e, values, looks, buckets, series, now)
        experiments.append(body)
        writes += seq_writes
    if record_look and writes:
        store.apply(writes)
    return {"generated_at": now, "source": config.source, "experiments": experiments}


def _floats(values: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in (values or {}).items()}


def variant_metrics(values: dict[str, float], k: int) -> dict[str, Any]:
    """A variant's counters and the metrics made of them."""
    requests = values.get("requests", 0.0)

    def per(counter: str) -> float | None:
        return values.get(counter, 0.0) / requests if requests else None

    return {
        "users": int(values.get("users", 0)),
        "requests": int(requests),
        "impressions": int(values.get("impressions", 0)),
        "clicks": int(values.get("clicks", 0)),
        "ctr": per("clicks"),
        "ctr_at_k": per("clicks_at_k"),
        "k": k,
        "mrr": per("rr"),
        "add_to_carts": int(values.get("add_to_carts", 0)),
        "add_to_cart_rate": per("add_to_carts"),
        "purchases": int(values.get("purchases", 0)),
        "purchase_rate": per("purchases"),
        "revenue": round(values.get("revenue", 0.0), 2),
        "revenue_per_request": per("revenue"),
        "latency_ms": per("latency_ms"),
    }


def comparison_dict(c: Comparison) -> dict[str, Any]:
    return {
        "control": _num(c.control),
        "treatment": _num(c.treatment),
        "difference": _num(c.difference),
        "difference_ci": [_num(c.difference_low), _num(c.difference_high)],
        "lift": _num(c.lift),
        "lift_ci": [_num(c.lift_low), _num(c.lift_high)],
        "p_value": _num(c.p_value),
        "alpha": c.alpha,
    }


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _sequential(
    e: Experiment, variant: str, comparison: Comparison, stored: dict[str, str]
) -> tuple[dict[str, Any], SetFields]:
    metric = e.primary_metric
    test = SequentialTest(tau=e.tau_of(metric), alpha=e.alpha, higher_is_better=METRICS[metric][1])
    if stored:
        test.p_value = float(stored.get("p", 1.0))
        test.low = float(stored.get("low", -math.inf))
        test.high = float(stored.get("high", math.inf))
        test.verdict = stored.get("verdict", UNDECIDED)
        test.looks = int(stored.get("looks", 0))
    test.update(comparison)
    write = SetFields(
        sequential_key(e.name, variant),
        {
            "p": repr(test.p_value),
            "low": repr(test.low),
            "high": repr(test.high),
            "verdict": test.verdict,
            "looks": str(test.looks),
        },
    )
    verdict = test.verdict.replace("treatment", variant).replace("control", e.control, 1)
    body = {
        "metric": metric,
        "tau": test.tau,
        "p_value": _num(test.p_value),
        "confidence_sequence": [_num(test.low), _num(test.high)],
        "looks": test.looks,
        "verdict": verdict,
        "decided": test.verdict != UNDECIDED,
    }
    return body, write


def _experiment(
    e: Experiment,
    values: dict[str, dict[str, float]],
    looks: dict[str, dict[str, str]],
    buckets: list[int],
    series: list[dict[str, float]],
    now: float,
) -> tuple[dict[str, Any], list[SetFields]]:
    variants = {
        v.name: {"share": v.share, "kind": v.kind, **variant_metrics(values[v.name], e.k)}
        for v in e.variants
    }
    for v in e.interleaved:
        variants[v.name]["interleave"] = list(v.interleave or ())
    writes = []
    comparisons = []
    control_values = values[e.control]
    primary_counter = METRICS[e.primary_metric][0]
    for v in e.treatments:
        treated = values[v.name]
        fixed = compare(
            ratio_totals(control_values, primary_counter),
            ratio_totals(treated, primary_counter),
            e.alpha,
        )
        sequential, write = _sequential(e, v.name, fixed, looks[v.name])
        writes.append(write)
        guards = []
        for g in e.guardrails:
            counter = METRICS[g.metric][0]
            c = compare(ratio_totals(control_values, counter), ratio_totals(treated, counter))
            status = guardrail(c, g.max_degradation, g.higher_is_better)
            guards.append(
                {
                    "metric": g.metric,
                    "max_degradation": g.max_degradation,
                    "status": status,
                    "lift": _num(c.lift),
                    "lift_ci": [_num(c.lift_low), _num(c.lift_high)],
                }
            )
        entry: dict[str, Any] = {
            "variant": v.name,
            "control": e.control,
            "metric": e.primary_metric,
            "fixed_horizon": comparison_dict(fixed),
            "sequential": sequential,
            "guardrails": guards,
            "alerts": [g["metric"] for g in guards if g["status"] == "breached"],
        }
        if e.cuped_pre_experiment:
            adjusted = cuped_compare(
                _cuped(control_values, primary_counter), _cuped(treated, primary_counter), e.alpha
            )
            entry["cuped"] = {
                "pre_experiment": e.cuped_pre_experiment,
                **comparison_dict(adjusted),
                "stderr_ratio": _num(adjusted.stderr / fixed.stderr) if fixed.stderr else None,
            }
        comparisons.append(entry)
    shares = e.shares()
    srm = None
    if len(shares) >= 2:
        check = sample_ratio_mismatch({n: variants[n]["users"] for n in shares}, shares)
        srm = {
            "variants": list(shares),
            "users": list(check.counts),
            "expected": [round(x, 1) for x in check.expected],
            "statistic": _num(check.statistic),
            "p_value": _num(check.p_value),
            "flagged": check.flagged,
        }
    interleaving = []
    for v in e.interleaved:
        a, b = v.interleave or ("a", "b")
        counts = values[v.name]
        result = interleaving_test(
            int(counts.get("wins_a", 0)), int(counts.get("wins_b", 0)), int(counts.get("ties", 0)),
            e.alpha,
        )  # fmt: skip
        verdict = {A_BETTER: f"{a} better", B_BETTER: f"{b} better"}.get(
            result.verdict, result.verdict
        )
        sequential_p = interleaving_sequential_p(
            result.wins_a, result.wins_b, result.ties, INTERLEAVING_TAU
        )
        if sequential_p <= e.alpha and result.wins_a != result.wins_b:
            sequential_verdict = f"{a if result.wins_a > result.wins_b else b} better"
        else:
            sequential_verdict = UNDECIDED
        interleaving.append(
            {
                "variant": v.name,
                "sequential_p_value": _num(sequential_p),
                "sequential_verdict": sequential_verdict,
                "a": a,
                "b": b,
                "wins_a": result.wins_a,
                "wins_b": result.wins_b,
                "ties": result.ties,
                "preference_a": _num(result.preference),
                "preference_ci": [_num(result.low), _num(result.high)],
                "p_value": _num(result.p_value),
                "verdict": verdict,
            }
        )
    body = {
        "name": e.name,
        "layer": e.layer,
        "running": e.running(now),
        "primary_metric": e.primary_metric,
        "control": e.control,
        "variants": variants,
        "comparisons": comparisons,
        "srm": srm,
        "interleaving": interleaving,
        "series": _series(e, buckets, series),
    }
    return body, writes


def interleaving_sequential_p(wins_a: int, wins_b: int, ties: int, tau: float) -> float:
    """Always-valid p-value of "no preference" from interleaving outcomes (mSPRT).

    Each impression scores +1 (a wins), -1 (b wins) or 0 (tie); the mSPRT of their mean
    against 0, with its variance estimated from the same counts, may be looked at after
    every impression, unlike the sign test of :func:`~engine.interleaving.interleaving_test`.

    >>> round(interleaving_sequential_p(230, 180, 590, tau=0.05), 4)
    0.1916
    >>> interleaving_sequential_p(600, 400, 1000, tau=0.05) < 0.001
    True
    """
    n = wins_a + wins_b + ties
    if n < 2:
        return 1.0
    mean = (wins_a - wins_b) / n
    variance = max((wins_a + wins_b) / n - mean * mean, 0.0) * n / (n - 1) / n
    return msprt_p_value(mean, variance, tau)


def _cuped(values: dict[str, float], counter: str) -> CupedTotals:
    return CupedTotals(
        ratio_totals(values, counter),
        covariate=values.get("cov", 0.0),
        covariate_sq=values.get("cov_sq", 0.0),
        cross_numerator=values.get(f"{counter}_cx", 0.0),
        cross_denominator=values.get("cov_y", 0.0),
    )


def _series(e: Experiment, buckets: list[int], series: list[dict[str, float]]) -> dict[str, Any]:
    """Cumulative metric per variant at the end of each bucket, from the first with data."""
    first = next((n for n, s in enumerate(series) if s), len(series))
    buckets, series = buckets[first:], series[first:]
    names = [v.name for v in e.variants if v.share > 0]
    metrics: dict[str, dict[str, list[float | None]]] = {m: {n: [] for n in names} for m in CHARTED}
    requests_series: dict[str, list[int]] = {n: [] for n in names}
    totals = {n: {} for n in names}
    for bucket in series:
        for n in names:
            t = totals[n]
            for field, amount in bucket.items():
                variant, _, counter = field.partition(":")
                if variant == n:
                    t[counter] = t.get(counter, 0.0) + amount
            requests = t.get("requests", 0.0)
            requests_series[n].append(int(requests))
            for m in CHARTED:
                counter = METRICS[m][0]
                value = t.get(counter, 0.0) / requests if requests else None
                metrics[m][n].append(_num(value) if value is not None else None)
    return {
        "bucket_s": BUCKET_S,
        "t": [b + BUCKET_S for b in buckets],
        "requests": requests_series,
        "metrics": metrics,
    }
