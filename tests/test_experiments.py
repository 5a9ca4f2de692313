"""Experiments: configuration, assignment with layers, live metrics, report, simulated truth."""

from __future__ import annotations

import doctest
import json
import math
import os

import numpy as np
import orjson
import pytest

import streamrank.experiment_report
from engine.experiment_config import ConfigError, ConfigWatcher, default_config, parse_config
from engine.experiment_metrics import (
    ExperimentCounter,
    ServedRequest,
    bucket_of,
    config_writes,
    read_variant,
    request_key,
    series_key,
)
from engine.experiment_report import experiment_report
from engine.experiments import assign, assign_variant, rank_assigned
from engine.messages import Candidate, Interaction, SearchRequest
from engine.ranking import Ranker
from engine.store import HashRead, MemoryStore
from models.online_ctr import LinearCTR
from streamrank.experiment_sim import (
    ExperimentSimulation,
    aa_false_positive_rate,
    sensitivity,
    true_lift,
)

USERS = [f"u-{n}" for n in range(4000)]


def two_layers() -> dict:
    return {
        "experiments": [
            {"name": "blend", "layer": "ranking", "traffic": 0.5,
             "variants": [{"name": "control", "share": 0.5, "ranking": "control"},
                          {"name": "heavy", "share": 0.5, "ranking": {"retrieval_weight": 0.3}}]},
            {"name": "deep", "layer": "ranking", "traffic": 0.5,
             "variants": [{"name": "off", "share": 0.5, "ranking": {"deep_weight": 0.0}},
                          {"name": "on", "share": 0.5, "ranking": {"deep_weight": 0.9}}]},
            {"name": "ui", "layer": "other", "salt": "ui-1",
             "variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]},
        ]
    }  # fmt: skip


def test_default_config_assigns_as_before() -> None:
    config = default_config("streamrank", 0.3)
    for user in USERS[:500]:
        assert assign(config, user, 0.0).variant == assign_variant(user, "streamrank", 0.3)


def test_layers_are_exclusive_within_and_orthogonal_across() -> None:
    config = parse_config(two_layers())
    labels = [assign(config, u, 0.0).labels() for u in USERS]
    assert all(not ("blend" in x and "deep" in x) for x in labels)  # one per layer
    assert all("ui" in x for x in labels)
    in_blend = [x for x in labels if "blend" in x]
    assert 0.45 < len(in_blend) / len(USERS) < 0.55
    # Orthogonal: the ui split is the same inside and outside the blend experiment.
    share_b_in = np.mean([x["ui"] == "b" for x in in_blend])
    share_b_out = np.mean([x["ui"] == "b" for x in labels if "blend" not in x])
    assert abs(share_b_in - share_b_out) < 0.05
    # Stable: the same answer every time (and in every process: a keyed hash, no hash()).
    assert [assign(config, u, 0.0).labels() for u in USERS[:50]] == labels[:50]


def test_schedule_and_bad_configs() -> None:
    body = two_layers()
    body["experiments"][2]["start"] = "2030-01-01T00:00:00Z"
    config = parse_config(body)
    assert "ui" not in assign(config, "u-1", 0.0).labels()
    assert "ui" in assign(config, "u-1", 1.9e9).labels()
    bad = [
        ({"experiments": [{"name": "x", "variants": [{"name": "a", "share": 0.4}]}]}, "add up"),
        ({"experiments": [{"name": "x", "variants": [
            {"name": "a", "share": 1, "ranking": {"nope": 1}}]}]}, "not a ranking setting"),
        ({"experiments": [{"name": "x", "variants": [
            {"name": "a", "share": 1, "ranking": {"interleave": ["a", "z"]}}]}]}, "interleave"),
        ({"experiments": [{"name": "x", "layer": "L", "traffic": 0.7,
                           "variants": [{"name": "a", "share": 1}]},
                          {"name": "y", "layer": "L", "traffic": 0.7,
                           "variants": [{"name": "a", "share": 1}]}]}, "no traffic left"),
        ({"experiments": [{"name": "x", "layer": "L1", "variants": [
            {"name": "a", "share": 1, "ranking": {"retrieval_weight": 1}}]},
                          {"name": "y", "layer": "L2", "variants": [
            {"name": "a", "share": 1, "ranking": {"retrieval_weight": 2}}]}]}, "changed in layers"),
    ]  # fmt: skip
    for body, reason in bad:
        with pytest.raises(ConfigError, match=reason):
            parse_config(body)


def test_watcher_reloads_and_keeps_the_last_good_config(tmp_path) -> None:
    path = tmp_path / "experiments.json"
    watcher = ConfigWatcher(path, default_config())
    path.write_text(json.dumps(two_layers()))
    assert [e.name for e in watcher.poll().experiments] == ["blend", "deep", "ui"]
    assert watcher.poll() is None  # unchanged
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    assert watcher.poll() is None and "not JSON" in watcher.error
    assert [e.name for e in watcher.current.experiments] == ["blend", "deep", "ui"]


def test_variants_rank_with_their_settings() -> None:
    config = parse_config(two_layers())
    ranker = Ranker(MemoryStore(), LinearCTR.prior())
    request = SearchRequest("r-1", "", tuple(Candidate(f"i-{n}", 10.0 - n) for n in range(5)))
    seen = set()
    for user in USERS[:200]:
        assignment = assign(config, user, 0.0)
        ranked = rank_assigned(ranker, request.__class__(**{**_fields(request), "user_id": user}),
                               assignment)  # fmt: skip
        assert ranked.ranking.result.variant == assignment.variant
        assert ranked.ranking.impression.variant == assignment.variant
        seen.add(assignment.variant)
    assert {"control", "heavy", "off", "on"} <= seen


def _fields(request: SearchRequest) -> dict:
    return {name: getattr(request, name) for name in request.__slots__}


def test_counts_are_exact_once_and_per_user() -> None:
    store = MemoryStore()
    config = default_config("s", 0.5)
    counter = ExperimentCounter(store, config)
    served = [
        ServedRequest("r-1", "u-1", {"default": "control"}, ("i-1", "i-2", "i-3"), 2.0),
        ServedRequest("r-2", "u-1", {"default": "control"}, ("i-4", "i-5"), 4.0),
        ServedRequest("r-3", "u-2", {"default": "control"}, ("i-1",), 1.0),
    ]
    assert store.apply_many(counter.request_batches(served, now=100.0)) == [True] * 3
    assert store.apply_many(counter.request_batches(served, now=100.0)) == [False] * 3
    events = [
        Interaction("e-1", "u-1", "i-3", "click", 101.0, request_id="r-1"),
        Interaction("e-2", "u-1", "i-3", "click", 102.0, request_id="r-1"),  # same item again
        Interaction("e-3", "u-1", "i-1", "click", 103.0, request_id="r-1"),
        Interaction("e-4", "u-1", "i-1", "purchase", 104.0, request_id="r-1", value=20.0),
        Interaction("e-5", "u-2", "i-1", "click", 105.0, request_id="r-3"),
    ]
    for event, writes in zip(events, counter.interaction_writes(events, 105.0), strict=True):
        store.apply(writes, once=f"ev:{event.event_id}")
    for event, writes in zip(events, counter.interaction_writes(events, 106.0), strict=True):
        assert not store.apply(writes, once=f"ev:{event.event_id}")  # redelivered
    v = read_variant(store, "default", "control")
    assert (v["users"], v["requests"], v["impressions"]) == (2, 3, 6)
    assert (v["clicks"], v["purchases"], v["revenue"]) == (3, 1, 20.0)
    assert v["rr"] == pytest.approx(1.0 + 1.0)  # r-1: best position 1; r-3: position 1
    assert v["latency_ms"] == 7.0
    # Per-user sums: u-1 has 2 searches, 2 clicks; u-2 has 1 search, 1 click.
    assert (v["requests_sq"], v["clicks_sq"], v["clicks_xy"]) == (5, 5, 5)
    assert v["latency_ms_sq"] == 6.0**2 + 1.0
    buckets = store.read([HashRead(series_key("default", bucket_of(100.0)))])[0]
    assert float(buckets["control:requests"]) == 3


def test_interleaved_clicks_credit_teams() -> None:
    store = MemoryStore()
    config = parse_config({"experiments": [{"name": "il", "variants": [
        {"name": "x", "share": 0, "ranking": "control"}, {"name": "y", "share": 0},
        {"name": "mix", "share": 1, "ranking": {"interleave": ["x", "y"]}}]}]})  # fmt: skip
    counter = ExperimentCounter(store, config)
    served = [
        ServedRequest(f"r-{n}", f"u-{n}", {"il": "mix"}, ("i-1", "i-2", "i-3"), 1.0,
                      ("a", "b", "a"), ("il", "mix"))
        for n in range(3)
    ]  # fmt: skip
    store.apply_many(counter.request_batches(served, 0.0))
    events = [
        Interaction("e-1", "u-0", "i-2", "click", 1.0, request_id="r-0"),  # b
        Interaction("e-2", "u-1", "i-1", "click", 1.0, request_id="r-1"),  # a
        Interaction("e-3", "u-1", "i-3", "click", 1.0, request_id="r-1"),  # a again
        Interaction("e-4", "u-2", "i-1", "click", 1.0, request_id="r-2"),  # a, then b: tie
        Interaction("e-5", "u-2", "i-2", "click", 1.0, request_id="r-2"),
    ]
    for event, writes in zip(events, counter.interaction_writes(events, 1.0), strict=True):
        store.apply(writes, once=f"ev:{event.event_id}")
    v = read_variant(store, "il", "mix")
    assert (v.get("wins_a", 0), v.get("wins_b", 0), v.get("ties", 0)) == (1, 1, 1)
    assert store.read([HashRead(request_key("r-1"))])[0]["va"] == "2"
    store.apply(config_writes(config))
    (il,) = experiment_report(store, 2.0)["experiments"][0]["interleaving"]
    assert (il["a"], il["b"], il["wins_a"], il["wins_b"], il["ties"]) == ("x", "y", 1, 1, 1)


def test_interleaving_reads_the_request_state_once() -> None:
    """Both sides of an interleaving come from one read: they differ only in scoring."""

    class CountingStore(MemoryStore):
        reads = 0

        def read(self, reads):
            self.reads += 1
            return super().read(reads)

    store = CountingStore()
    config = parse_config({"experiments": [{"name": "il", "variants": [
        {"name": "x", "share": 0, "ranking": "control"},
        {"name": "y", "share": 0, "ranking": {"retrieval_weight": -5.0}},
        {"name": "mix", "share": 1, "ranking": {"interleave": ["x", "y"]}}]}]})  # fmt: skip
    ranker = Ranker(store, LinearCTR.prior())
    request = SearchRequest("r-1", "u-1", tuple(Candidate(f"i-{n}", 9.0 - n) for n in range(6)))
    ranked = rank_assigned(ranker, request, assign(config, "u-1", 0.0))
    assert store.reads == 1
    assert ranked.teams is not None and set(ranked.teams) == {"a", "b"}
    # Side y reverses the retrieval order, so the merged list starts with each side's top.
    assert {i.item_id for i in ranked.ranking.result.items[:2]} == {"i-0", "i-5"}


def test_report_text_and_cli_module_examples() -> None:
    sim = ExperimentSimulation(seed=2, mode="ab")
    sim.serve(600)
    report = experiment_report(sim.store, 0.0, sim.config)
    text = streamrank.experiment_report.render_report(report)
    assert "sequential (mSPRT, always valid)" in text and "sample ratio" in text
    assert doctest.testmod(streamrank.experiment_report).failed == 0
    orjson.dumps(report)  # JSON-ready


# --- the simulated truth --------------------------------------------------------------------


def test_aa_sequential_false_positive_rate_holds_when_peeking_after_every_batch() -> None:
    result = aa_false_positive_rate(runs=300, requests=4000, batch=100, seed=3)
    assert result["looks"] == 40
    assert result["sequential"] <= 0.05, result
    # The fixed-horizon test looked at as often goes wrong far more often: why mSPRT.
    assert result["fixed_horizon_peeking"] > 2 * max(result["sequential"], 0.05), result


def test_ab_detects_the_better_ranking_and_covers_the_true_lift() -> None:
    truth = true_lift(seed=1)
    assert 0.1 < truth < 0.6
    run = ExperimentSimulation(seed=1, mode="ab").run_until_decided(batch=100)
    (comparison,) = run.report["comparisons"]
    assert run.verdict == "top_pick better"
    low, high = comparison["fixed_horizon"]["lift_ci"]
    assert low <= truth <= high, (low, truth, high)
    assert run.report["srm"]["flagged"] is False


def test_interleaving_agrees_with_at_least_5x_fewer_requests() -> None:
    found = sensitivity(range(1, 11), power=0.8)
    assert found.verdicts_agree
    # For 80% of the runs to decide, the A/B test needs 5 times the requests or more.
    assert found.ratio >= 5, (found.ab_requests, found.interleaving_requests)


def test_an_injected_sample_ratio_mismatch_is_flagged() -> None:
    # 15% of the treatment's users lost by a broken logging path.
    broken = ExperimentSimulation(seed=4, mode="ab", drop_share=0.15, shoppers=3000)
    broken.serve(5000)
    assert broken.look()["srm"]["flagged"] is True
    healthy = ExperimentSimulation(seed=4, mode="ab", shoppers=3000)
    healthy.serve(5000)
    assert healthy.look()["srm"]["flagged"] is False
    assert not math.isnan(healthy.look()["srm"]["p_value"])
