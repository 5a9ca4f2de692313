"""Prometheus metrics of a worker, served at ``/metrics`` by its web server.

Counters are per worker process; Prometheus sums them across workers
(``sum(rate(streamrank_clicks_total[1m])) by (variant) /
sum(rate(streamrank_requests_total[1m])) by (variant)`` is the live CTR per
variant). Gauges say what this worker sees now: its consumer lag per partition
and the model version it serves.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

registry = CollectorRegistry()

request_latency = Histogram(
    "streamrank_request_latency_seconds",
    "Time from taking a search request off the topic to handing its result to the producer.",
    ["variant"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
    registry=registry,
)
requests = Counter(
    "streamrank_requests",
    "Search requests answered.",
    ["variant", "degraded"],
    registry=registry,
)
impressions = Counter(
    "streamrank_impressions", "Items returned in ranked results.", ["variant"], registry=registry
)
interactions = Counter(
    "streamrank_interactions", "Interactions applied (once each).", ["type"], registry=registry
)
clicks = Counter(
    "streamrank_clicks",
    "Clicks on a ranked result, by the variant that ranked it.",
    ["variant"],
    registry=registry,
)
dead_letters = Counter(
    "streamrank_dead_letters", "Rejected inputs sent to dead-letters.", ["topic"], registry=registry
)
examples_learned = Counter(
    "streamrank_examples_learned",
    "Labelled examples learned by the online model.",
    registry=registry,
)
deep_candidates = Counter(
    "streamrank_deep_candidates",
    "Deep model candidates trained, by outcome (published, refused, failed).",
    ["outcome"],
    registry=registry,
)
model_version = Gauge(
    "streamrank_model_version", "Version of the model this worker serves.", ["model"],
    registry=registry,
)  # fmt: skip
consumer_lag = Gauge(
    "streamrank_consumer_lag",
    "Messages on a partition not yet read by this worker.",
    ["topic", "partition"],
    registry=registry,
)
click_through_rate = Gauge(
    "streamrank_click_through_rate",
    "Clicks per request seen by this worker since it started, by variant.",
    ["variant"],
    registry=registry,
)


def update_consumer_lag(end_offsets: Mapping, read_offsets: Mapping) -> None:
    """Lag = the partition's end offset minus the last offset this worker read."""
    for tp, end in end_offsets.items():
        read = read_offsets.get(tp)
        lag = end - (read + 1) if read is not None else end
        consumer_lag.labels(tp.topic, str(tp.partition)).set(max(lag, 0))


def update_click_through_rate() -> None:
    shown: dict[str, float] = {}
    for metric in requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                variant = sample.labels["variant"]
                shown[variant] = shown.get(variant, 0.0) + sample.value
    for metric in clicks.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                variant = sample.labels["variant"]
                if shown.get(variant):
                    click_through_rate.labels(variant).set(sample.value / shown[variant])


def exposition() -> bytes:
    """The metrics in Prometheus' text format."""
    update_click_through_rate()
    return generate_latest(registry)
