"""Replay a native event log through a broker and workers: the serving path, judged.

``streamrank replay FILE --via-kafka`` sends the log's events to the topics of
DESIGN.md in time order, like a search layer and its shoppers would, and judges
the ranked results that come back with the same :class:`~streamrank.evaluation.Judge`
as the in-process replay. Each request is sent once the previous one is
answered, so the worker ranks it after the events before it in the log: the
same test-then-train order as in process. What still differs is timing: the
worker learns and publishes its model asynchronously, so a request may be
ranked by a model a few hundred milliseconds older than in process. The two
reports agree within that noise, which is what shows that the evaluated code is
the serving code.

Without ``--broker``, a local stack (tansu, Redis, one worker) is started with
the replay's settings and stopped at the end; with it, the running workers must
be configured like the replay (see :func:`worker_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from streamrank.client import SearchLayerClient
from streamrank.evaluation import Judge
from streamrank.replay import ReplayOptions


def worker_settings(options: ReplayOptions, profile_path: Path) -> dict[str, str]:
    """The worker environment that ranks and learns like the in-process replay."""
    return {
        "STREAMRANK_PROFILE": str(profile_path),
        "STREAMRANK_IMPRESSION_WINDOW": str(options.window_s),
        "STREAMRANK_IMPRESSION_DEPTH": str(options.close_depth),
        "STREAMRANK_IMPRESSION_CLOSE_DEPTH": str(options.close_depth),
        "STREAMRANK_LOGGED_ORDER_SHOWN": "1" if options.logged_order_shown else "0",
        # In process every request sees the state its predecessors left: no cache.
        "STREAMRANK_SHARED_STATE_MAX_AGE": "0",
        "STREAMRANK_MAX_CANDIDATES": "1000",
    }


async def replay_via_kafka(
    events: Iterable[dict[str, Any]],
    bootstrap: str,
    topic_prefix: str = "",
    progress: Callable[[int], None] | None = None,
    request_timeout_s: float = 30.0,
    client_options: dict[str, Any] | None = None,
    window_s: float = ReplayOptions.window_s,
) -> dict[str, Any]:
    """Send the events through the broker, wait for each ranking, return the report."""
    judge = Judge(window_s)
    clicks_seen: set[str] = set()
    started = time.perf_counter()
    async with SearchLayerClient(bootstrap, topic_prefix, **(client_options or {})) as client:
        for n, event in enumerate(events, start=1):
            stream = event.get("stream")
            body = {k: v for k, v in event.items() if k != "stream"}
            if stream == "search-requests":
                # explain: the result then carries the CTR estimate the report's AUC needs.
                result = await client.rank({**body, "explain": True}, timeout=request_timeout_s)
                items = result["items"]
                judge.ranked(
                    body["request_id"],
                    [c["item_id"] for c in body["candidates"]],
                    [item["item_id"] for item in items],
                    scores=[item["score"] for item in items],
                    click_probabilities=[item["explain"]["ctr"] for item in items],
                    ts=body.get("ts", 0.0),
                    user_id=body.get("user_id"),
                )
            elif stream == "interactions":
                await client.interact(body)
                # The worker counts a redelivered event once; so does the judge.
                if body.get("type") == "click" and body["event_id"] not in clicks_seen:
                    clicks_seen.add(body["event_id"])
                    judge.clicked(
                        body.get("request_id"),
                        body["item_id"],
                        body.get("ts"),
                        user_id=body.get("user_id"),
                    )
            elif stream == "catalog":
                await client.catalog(body)
            if progress is not None and n % 1000 == 0:
                progress(n)
                judge.settle(body.get("ts", 0.0) - window_s)
        await client.flush()
    return judge.report(time.perf_counter() - started)


def replay_on_local_stack(
    events: Iterator[dict[str, Any]],
    options: ReplayOptions,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Start tansu, Redis and a worker configured like ``options``; replay through them."""
    from streamrank.localstack import Broker, RedisServer, Worker, free_port, worker_env

    with tempfile.TemporaryDirectory(prefix="streamrank-replay-") as workdir:
        profile_path = Path(workdir) / "profile.json"
        profile_path.write_bytes(orjson.dumps(options.profile.to_dict()))
        prefix = f"replay-{uuid.uuid4().hex[:8]}-"
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(Broker(workdir=workdir))
            redis = stack.enter_context(RedisServer(workdir=workdir))
            env = worker_env(
                broker,
                redis,
                prefix=prefix,
                web_port=free_port(),
                datadir=Path(workdir) / "worker",
                **worker_settings(options, profile_path),
            )
            stack.enter_context(Worker(env, workdir=workdir))
            return asyncio.run(
                replay_via_kafka(
                    events, broker.bootstrap, prefix, progress, window_s=options.window_s
                )
            )
