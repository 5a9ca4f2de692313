"""End to end: the worker retrains the deep CTR model periodically and every ranker swaps
each published version in while a steady stream of requests is answered."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import numpy as np
import pytest

from engine.redis_store import RedisStore
from models.registry import ModelRegistry
from streamrank.client import SearchLayerClient

pytestmark = pytest.mark.e2e

CATEGORIES = ("shoes", "coffee", "books", "toys")
RATE = 20  # requests per second, produced open loop
# End to end through broker and worker, on a 2-core machine that also trains the model.
LATE_MS = 1000.0


def deep_version(model_version: str) -> int | None:
    """``online:12+deep:3`` -> 3; ``online:12`` -> None."""
    _, _, deep = model_version.partition("+deep:")
    return int(deep) if deep else None


async def steady_traffic(client: SearchLayerClient, tag: str, seconds_max: float) -> list[dict]:
    """Shoppers who each click their own category; stops two deep versions after the first."""
    items = {c: [f"{tag}-{c}-{n}" for n in range(12)] for c in CATEGORIES}
    for category, ids in items.items():
        for n, item_id in enumerate(ids):
            await client.catalog(
                {"item_id": item_id, "category": category, "brand": f"{category}-{n % 3}",
                 "price": 10.0 + n}
            )  # fmt: skip
    await client.flush()
    await asyncio.sleep(1.0)  # catalog and requests travel on different topics
    rng = random.Random(7)
    users = [(f"{tag}-u{n}", CATEGORIES[n % len(CATEGORIES)]) for n in range(24)]
    answered: list[dict] = []
    pending: set[asyncio.Task] = set()

    async def one_search(user_id: str, favourite: str) -> None:
        candidates = rng.sample([i for ids in items.values() for i in ids], 24)
        body = {
            "request_id": f"r-{uuid.uuid4().hex[:12]}",
            "user_id": user_id,
            "query": f"{favourite} gifts",
            "candidates": [{"item_id": i, "score": 24.0 - n} for n, i in enumerate(candidates)],
            "k": 10,
        }
        sent = time.perf_counter()
        result = await client.rank(body, timeout=10.0)  # a lost request fails the test here
        result["e2e_ms"] = (time.perf_counter() - sent) * 1000.0
        answered.append(result)
        for item in result["items"]:
            if item["item_id"].split("-")[1] == favourite and rng.random() < 0.7:
                await client.interact(
                    {"event_id": f"e-{uuid.uuid4().hex[:12]}", "user_id": user_id,
                     "item_id": item["item_id"], "type": "click",
                     "request_id": result["request_id"], "position": item["rank"]}
                )  # fmt: skip

    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < seconds_max:
        versions = {deep_version(r["model_version"]) for r in answered} - {None}
        if len(versions) >= 3:  # none -> first -> second -> third: at least two changes
            break
        user_id, favourite = users[sent % len(users)]
        task = asyncio.create_task(one_search(user_id, favourite))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / RATE - time.monotonic()))
    await asyncio.gather(*pending)  # raises if any request was lost
    assert len(answered) == sent
    return answered


def test_deep_model_versions_are_swapped_in_under_steady_traffic(
    broker, redis_server, start_worker, topic_prefix
):
    start_worker(
        train_interval="2",
        train_min_examples="200",
        online_warmup="50",
        impression_window="3",
    )

    async def scenario() -> list[dict]:
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            return await steady_traffic(client, topic_prefix.strip("-"), seconds_max=120.0)

    answered = asyncio.run(scenario())
    versions = [deep_version(r["model_version"]) for r in answered]
    changes = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
    assert versions[0] is None and changes >= 2, sorted(set(versions) - {None})
    # Versions only move forward: a ranker never serves an older model after a newer one.
    served = [v for v in versions if v is not None]
    assert served == sorted(served)
    latencies = np.array([r["e2e_ms"] for r in answered])
    assert latencies.max() < LATE_MS, (np.percentile(latencies, [50, 99]), latencies.max())
    assert not any(r["degraded"] for r in answered)

    registry = ModelRegistry(RedisStore(redis_server.url, key_prefix=topic_prefix))
    listed = registry.list()
    assert len(listed) >= 2 and listed[-1]["serving"]
    newest = listed[-1]["metrics"]
    assert 0.5 < newest["auc"] <= 1.0 and newest["n_valid"] > 0
    print(
        f"\n{len(answered)} requests, deep versions {sorted(set(served))}, e2e p50 "
        f"{np.percentile(latencies, 50):.1f} ms p99 {np.percentile(latencies, 99):.1f} ms "
        f"max {latencies.max():.1f} ms; newest held-out AUC {newest['auc']:.3f}"
    )
