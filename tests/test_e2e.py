"""End to end: a real broker, a real Redis, a real `faust -A streams.app worker` subprocess,
and a separate producer/consumer playing the search layer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from streamrank.client import SearchLayerClient
from streamrank.localstack import RedisServer, Worker, free_port, worker_env

pytestmark = pytest.mark.e2e

CATEGORIES = ("shoes/running", "kitchen/coffee")


def run(coroutine):
    return asyncio.run(coroutine)


def catalog(tag: str) -> dict[str, list[str]]:
    """Ten items in each of two categories, unique to the test."""
    return {c: [f"{tag}-{c.split('/')[1]}-{i}" for i in range(10)] for c in CATEGORIES}


async def send_catalog(client: SearchLayerClient, items: dict[str, list[str]]) -> None:
    for category, ids in items.items():
        for n, item_id in enumerate(ids):
            await client.catalog(
                {"item_id": item_id, "category": category, "brand": f"brand-{category[:4]}",
                 "price": 20.0 + n}
            )  # fmt: skip


def request(user_id: str, item_ids: list[str], **extra) -> dict:
    return {
        "request_id": f"r-{uuid.uuid4().hex[:12]}",
        "user_id": user_id,
        "query": "gift ideas",
        "candidates": [{"item_id": i, "score": 10.0 - n * 0.1} for n, i in enumerate(item_ids)],
        **extra,
    }


def interleave(items: dict[str, list[str]], picks: slice) -> list[str]:
    a, b = (items[c][picks] for c in CATEGORIES)
    return [x for pair in zip(a, b, strict=True) for x in pair]


async def click_items(client: SearchLayerClient, user_id: str, item_ids: list[str]) -> None:
    """Rank the items for the user, then click each, as a shopper on the result page would."""
    result = await client.rank(request(user_id, item_ids))
    positions = {item["item_id"]: item["rank"] for item in result["items"]}
    for item_id in item_ids:
        await client.interact(
            {"event_id": f"e-{uuid.uuid4().hex[:12]}", "user_id": user_id, "item_id": item_id,
             "type": "click", "request_id": result["request_id"],
             "position": positions[item_id]}
        )  # fmt: skip


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def catalog_stored(r: redis.Redis, prefix: str, items: dict[str, list[str]]) -> bool:
    """Catalog and clicks travel on different topics: wait for the catalog before clicking."""
    return all(r.hexists(f"{prefix}i:{i}", "cat") for ids in items.values() for i in ids)


def user_clicks(r: redis.Redis, prefix: str, user_id: str) -> float:
    value = r.hget(f"{prefix}u:{user_id}:a", "e|k")
    return float(value) if value else 0.0


def mean_rank(result: dict, item_ids: list[str]) -> float:
    ranks = {item["item_id"]: item["rank"] for item in result["items"]}
    return sum(ranks[i] for i in item_ids) / len(item_ids)


def test_request_comes_back_ranked_with_exactly_its_candidates(broker, start_worker, topic_prefix):
    worker = start_worker()

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            ids = [f"i-{n}" for n in range(25)]
            result = await client.rank(request("u-1", ids, explain=True))
            assert sorted(item["item_id"] for item in result["items"]) == sorted(ids)
            assert [item["rank"] for item in result["items"]] == list(range(1, 26))
            assert result["degraded"] is False
            assert result["variant"] == "personalized"
            assert result["model_version"].startswith("online:")
            assert result["latency_ms"] > 0
            assert "user_category_share" in result["items"][0]["explain"]
            cut = await client.rank(request("u-1", ids, k=5))
            assert len(cut["items"]) == 5

    run(scenario())
    # The worker's web server: health and Prometheus metrics, on 127.0.0.1.
    base = f"http://127.0.0.1:{worker.env['STREAMRANK_WEB_PORT']}"
    with urllib.request.urlopen(base + "/health", timeout=5) as response:
        health = json.loads(response.read())
    assert health == {"ok": True, "redis": True, "model_version": "online:0"}
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        exposition = response.read().decode()
    assert 'streamrank_requests_total{degraded="false",variant="personalized"} 2.0' in exposition
    assert 'streamrank_impressions_total{variant="personalized"} 30.0' in exposition
    for name in (
        "streamrank_request_latency_seconds_bucket",
        "streamrank_consumer_lag",
        "streamrank_dead_letters_total",
        "streamrank_interactions_total",
        "streamrank_click_through_rate",
    ):
        assert name in exposition


def test_each_shopper_sees_their_own_category_first(
    broker, redis_server, start_worker, topic_prefix
):
    start_worker()
    r = redis_server.client()
    items = catalog("p")
    runner, cook = "u-runner", "u-cook"

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            await send_catalog(client, items)
            await client.flush()
            await asyncio.to_thread(wait_for, lambda: catalog_stored(r, topic_prefix, items))
            await click_items(client, runner, items["shoes/running"][:4])
            await click_items(client, cook, items["kitchen/coffee"][:4])
            await client.flush()
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    user_clicks(r, topic_prefix, runner) > 3.99
                    and user_clicks(r, topic_prefix, cook) > 3.99
                ),
                what="clicks to be learned",
            )
            # The other items of each category, never clicked by anyone: only taste tells.
            unseen = interleave(items, slice(4, 10))
            for_runner = await client.rank(request(runner, unseen))
            for_cook = await client.rank(request(cook, unseen))
            running, coffee = items["shoes/running"][4:], items["kitchen/coffee"][4:]
            assert mean_rank(for_runner, running) + 3 < mean_rank(for_runner, coffee)
            assert mean_rank(for_cook, coffee) + 3 < mean_rank(for_cook, running)

    run(scenario())


def test_malformed_input_goes_to_dead_letters_and_the_worker_keeps_going(
    broker, start_worker, topic_prefix
):
    start_worker()

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            await client.send_raw("search-requests", b'{"request_id": "r-x", "user_id": "u-1"}')
            await client.send_raw("interactions", b"not json at all", key="u-1")
            bad_candidates = request("u-1", ["a", "a"])
            await client.send_request(bad_candidates)
            letters = [await asyncio.wait_for(client.dead_letters.get(), 15) for _ in range(3)]
            reasons = {letter["error"] for letter in letters}
            assert "candidates: must be a non-empty list" in reasons
            assert any(e.startswith("payload: not valid JSON") for e in reasons)
            assert any(e.startswith("candidates[1].item_id: duplicate") for e in reasons)
            topics = {letter["topic"] for letter in letters}
            assert topics == {f"{topic_prefix}search-requests", f"{topic_prefix}interactions"}
            assert any(letter["payload"] == "not json at all" for letter in letters)
            result = await client.rank(request("u-1", ["a", "b", "c"]))
            assert len(result["items"]) == 3

    run(scenario())


def test_a_redelivered_click_counts_once(broker, redis_server, start_worker, topic_prefix):
    start_worker()
    r = redis_server.client()

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            result = await client.rank(request("u-dup", ["x", "y", "z"]))
            click = {"event_id": "e-twice", "user_id": "u-dup", "item_id": "y", "type": "click",
                     "request_id": result["request_id"], "position": 2}  # fmt: skip
            await client.interact(click)
            await client.interact(click)
            # A later, distinct click: once it is counted, both copies were processed.
            await client.interact(click | {"event_id": "e-after", "item_id": "z", "position": 3})
            await client.flush()

    run(scenario())
    wait_for(lambda: r.hget(f"{topic_prefix}i:z", "clk") == b"1", what="the later click")
    assert r.hget(f"{topic_prefix}i:y", "clk") == b"1"
    assert user_clicks(r, topic_prefix, "u-dup") == pytest.approx(2.0, rel=1e-6)
    assert r.hget(f"{topic_prefix}g:pos", "c2") == b"1"


def helper_processes(worker: Worker) -> list[int]:
    """The worker's helper processes (spawned by multiprocessing), from /proc."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_clicks_count_once_when_the_worker_s_helper_processes_die(
    broker, redis_server, start_worker, topic_prefix
):
    """Killed mid-burst, the interactions and learner processes are replaced; every click is
    applied exactly once (what a dead process held goes through again, claimed once)."""
    worker = start_worker()
    r = redis_server.client()
    wait_for(lambda: len(helper_processes(worker)) == 2, what="the two helper processes")
    items = [f"{uuid.uuid4().hex[:6]}-k{n}" for n in range(10)]

    def clicks(first: int, last: int) -> list[dict]:
        # One user: one partition, applied in the order sent.
        return [
            {"event_id": f"e-{n}", "user_id": "u-burst", "item_id": items[n % 10], "type": "click"}
            for n in range(first, last)
        ]

    def applied() -> float:
        return sum(float(r.hget(f"{topic_prefix}i:{i}", "clk") or 0) for i in items)

    async def send(events: list[dict]) -> None:
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            for event in events:
                await client.interact(event)
            await client.flush()

    run(send(clicks(0, 1500)))
    killed = helper_processes(worker)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    run(send(clicks(0, 1500) + clicks(1500, 1501)))  # every one again, then one more
    wait_for(lambda: applied() >= 1501, timeout=60.0, what="all the clicks")
    time.sleep(1.0)
    assert applied() == 1501
    # Decayed (later clicks weigh a little more), so near 1,501: one more click would add 1.
    assert user_clicks(r, topic_prefix, "u-burst") == pytest.approx(1501.0, abs=0.01)
    # The interactions process was replaced; the learner's is, at its next examples.
    assert (
        worker.running
        and helper_processes(worker)
        and not set(helper_processes(worker)) & set(killed)
    )


def test_redis_outage_degrades_then_personalization_resumes(broker, tmp_path, topic_prefix):
    """Redis stops: requests are answered in retrieval order, flagged degraded. Catalog
    updates sent during the outage wait in the worker and are applied once Redis is back;
    then clicks personalize again."""
    with RedisServer(workdir=tmp_path / "redis") as own_redis:
        env = worker_env(
            broker, own_redis, prefix=topic_prefix, web_port=free_port(), datadir=tmp_path / "w"
        )
        worker = Worker(env, workdir=tmp_path / "worker").start()
        items = catalog("o")
        shopper = "u-outage"
        try:

            async def scenario():
                async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
                    healthy = await client.rank(request(shopper, ["a", "b"]))
                    assert healthy["degraded"] is False

                    own_redis.stop()
                    unseen = interleave(items, slice(4, 10))
                    during = await client.rank(request(shopper, unseen), timeout=5)
                    assert during["degraded"] is True
                    assert [i["item_id"] for i in during["items"]] == unseen

                    await send_catalog(client, items)
                    await client.flush()
                    await asyncio.sleep(1.0)
                    own_redis.start()

                    r = own_redis.client()
                    await asyncio.to_thread(
                        wait_for,
                        lambda: catalog_stored(r, topic_prefix, items),
                        what="catalog updates held during the outage to be applied",
                    )
                    for item_id in items["kitchen/coffee"][:4]:
                        await client.interact(
                            {"event_id": f"e-{item_id}", "user_id": shopper, "item_id": item_id,
                             "type": "click"}
                        )  # fmt: skip
                    await client.flush()
                    await asyncio.to_thread(
                        wait_for,
                        lambda: user_clicks(r, topic_prefix, shopper) > 3.99,
                        what="clicks after the outage to be applied",
                    )
                    after = await client.rank(request(shopper, unseen))
                    assert after["degraded"] is False
                    coffee, running = items["kitchen/coffee"][4:], items["shoes/running"][4:]
                    assert mean_rank(after, coffee) + 3 < mean_rank(after, running)

            run(scenario())
        finally:
            worker.stop()


def examples_learned(worker: Worker) -> float:
    base = f"http://127.0.0.1:{worker.env['STREAMRANK_WEB_PORT']}"
    with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("streamrank_examples_learned_total "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("roles", [("all",), ("serve", "learn")], ids=["one-worker", "split"])
def test_learned_model_is_swapped_in_while_serving(broker, start_worker, topic_prefix, roles):
    """The learner publishes a new version once warmed up; rankers swap it in while serving,
    whether one worker does everything or a separate learner process learns."""
    workers = [start_worker(online_warmup="3", role=role) for role in roles]

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            first = await client.rank(request("u-model", ["a", "b", "c", "d"]))
            assert first["model_version"] == "online:0"  # the prior
            # Clicks at 2, 3, 4: a positive and the negative above it, then a positive each.
            for n, item in enumerate(first["items"][1:], start=2):
                await client.interact(
                    {"event_id": f"e-m{n}", "user_id": "u-model", "item_id": item["item_id"],
                     "type": "click", "request_id": first["request_id"], "position": n}
                )  # fmt: skip
            await client.flush()
            versions = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                result = await client.rank(request("u-model", ["a", "b", "c", "d"]), timeout=5)
                versions.append(result["model_version"])
                if result["model_version"] != "online:0":
                    break
                await asyncio.sleep(0.1)
            assert versions[-1] != "online:0", versions
            assert int(versions[-1].split(":")[1]) >= 1

    run(scenario())
    learned = [examples_learned(worker) for worker in workers]
    if roles == ("serve", "learn"):
        assert learned[0] == 0 and learned[1] >= 3, learned  # only the learner learns
    else:
        assert learned[0] >= 3


def test_recommend_returns_items_co_engaged_by_other_shoppers(
    broker, redis_server, start_worker, topic_prefix
):
    start_worker()
    r = redis_server.client()
    tag = uuid.uuid4().hex[:8]
    phone, case, sock = f"{tag}-phone", f"{tag}-case", f"{tag}-sock"

    async def engage(client: SearchLayerClient, user_id: str, item_id: str) -> None:
        await client.interact(
            {"event_id": f"e-{uuid.uuid4().hex[:12]}", "user_id": user_id, "item_id": item_id,
             "type": "click"}
        )  # fmt: skip

    async def scenario():
        async with SearchLayerClient(broker.bootstrap, topic_prefix) as client:
            for n in range(3):  # shoppers who looked at the phone went on to its case
                await engage(client, f"u-{tag}-{n}", phone)
                await engage(client, f"u-{tag}-{n}", case)
            await engage(client, f"u-{tag}-x", sock)  # popular enough to be a filler
            newcomer = f"u-{tag}-new"
            await engage(client, newcomer, phone)
            await client.flush()
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    r.hget(f"{topic_prefix}i:{phone}:n", case) is not None
                    and r.llen(f"{topic_prefix}u:{newcomer}:r") == 1
                ),
                what="the co-engagement to be learned",
            )
            result = await client.rank(
                {"request_id": f"r-{uuid.uuid4().hex[:12]}", "user_id": newcomer,
                 "recommend": True, "k": 3}
            )  # fmt: skip
            ids = [item["item_id"] for item in result["items"]]
            assert ids[0] == case, ids
            assert len(ids) == 3 and not result["degraded"]
            await client.send_raw(
                "search-requests",
                orjson.dumps({"request_id": "r-bad", "user_id": newcomer, "recommend": True}),
            )
            letter = await asyncio.wait_for(client.dead_letters.get(), 15)
            assert letter["error"] == "k: required when recommend is true"

    run(scenario())
