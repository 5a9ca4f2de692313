"""Shared fixtures: one broker and one Redis for the whole session, isolated by topic prefix.

Starting the stack once keeps the suite fast (tansu and Redis are up in well under a second,
but a Faust worker's first group join takes seconds). Tests never share topics, consumer
groups or Redis keys: each gets its own `topic_prefix`, and the app id derives from it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from streamrank.localstack import Broker, RedisServer, Worker, free_port, worker_env


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A tansu broker on 127.0.0.1 (log under pytest's basetemp, kept for post-mortems)."""
    with Broker(workdir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis on 127.0.0.1 without persistence."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test, for its topics, consumer group and Redis keys."""
    return f"t{uuid.uuid4().hex[:8]}-"


class StartWorker(Protocol):
    def __call__(
        self, *, timeout: float = 60.0, prefix: str | None = None, **extra: str
    ) -> Worker: ...


@pytest.fixture
def start_worker(
    broker: Broker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> Iterator[StartWorker]:
    """Start `faust -A streams.app worker` processes on the session stack; stop them after.

    `extra` goes through `worker_env` (`partitions="2"` -> `STREAMRANK_PARTITIONS=2`).
    Workers started with the same prefix (default: this test's) share the consumer group.
    Each gets its own web port and data directory, and returns once it logged "Ready".
    """
    workers: list[Worker] = []

    def start(*, timeout: float = 60.0, prefix: str | None = None, **extra: str) -> Worker:
        workdir = tmp_path / f"worker-{len(workers)}"
        env = worker_env(
            broker,
            redis_server,
            prefix=topic_prefix if prefix is None else prefix,
            web_port=free_port(),
            datadir=workdir / "data",
            **extra,
        )
        worker = Worker(env, workdir=workdir)
        workers.append(worker)
        return worker.start(timeout)

    yield start
    for worker in reversed(workers):
        worker.stop()
