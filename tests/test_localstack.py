"""The embedded stack itself: broker, Redis and worker processes start, work and go away."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import textwrap
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamrank.localstack import (
    WORKER_READY_MARKER,
    Broker,
    LocalStackError,
    RedisServer,
    Worker,
    create_topic,
    free_port,
    redis_server_path,
    tansu_path,
    worker_env,
)


def _gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_binaries_found() -> None:
    for path in (tansu_path(), redis_server_path()):
        assert os.access(path, os.X_OK), path


async def _round_trip(bootstrap: str, topic: str) -> tuple[set[int], bytes | None, bytes | None]:
    await create_topic(bootstrap, topic)  # tansu would auto-create it with 4 partitions

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        partitions = await producer.partitions_for(topic)
        await producer.send_and_wait(topic, b'{"hello": 1}', key=b"u-42")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=5,  # tansu does not end a long poll when data arrives
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        message = await asyncio.wait_for(consumer.getone(), timeout=10)
    finally:
        await consumer.stop()
    return partitions, message.key, message.value


def test_broker_round_trip(broker: Broker, topic_prefix: str) -> None:
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.url == f"kafka://127.0.0.1:{broker.port}"
    partitions, key, value = asyncio.run(_round_trip(broker.bootstrap, f"{topic_prefix}raw"))
    assert partitions == {0}
    assert (key, value) == (b"u-42", b'{"hello": 1}')


def test_broker_stop_leaves_nothing(tmp_path: Path) -> None:
    broker = Broker(workdir=tmp_path).start()
    pid, port = broker.pid, broker.port
    assert broker.running and not _gone(pid)
    broker.stop()
    assert not broker.running
    assert _gone(pid)
    assert _refused(port)
    broker.stop()  # idempotent
    assert "tansu" in broker.log_text()  # the log outlives the process


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    # Another server on the port would answer the readiness check while ours dies.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        broker = Broker(other.getsockname()[1], workdir=tmp_path)
        with pytest.raises(LocalStackError, match="in use"):
            broker.start()
        assert broker.pid is None


def test_redis_set_get(redis_server: RedisServer, topic_prefix: str) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis_server.client()
    try:
        client.set(f"{topic_prefix}k", "v")
        assert client.get(f"{topic_prefix}k") == b"v"
    finally:
        client.close()


def test_redis_restart_same_port_then_stop(tmp_path: Path) -> None:
    server = RedisServer(workdir=tmp_path).start()
    port, first_pid = server.port, server.pid
    client = server.client(socket_timeout=2)
    try:
        client.set("k", "v")
        server.restart()
        assert server.port == port
        assert server.pid != first_pid and _gone(first_pid)
        # The same client reconnects to the same URL; the data did not survive (no persistence).
        assert client.ping()
        assert client.get("k") is None
        client.set("k", "again")
        assert client.get("k") == b"again"
    finally:
        client.close()
    pid = server.pid
    server.stop()
    assert _gone(pid)
    assert _refused(port)
    assert not list(tmp_path.glob("*.rdb")) and not list(tmp_path.glob("*.aof"))


def test_kill_is_immediate(tmp_path: Path) -> None:
    with RedisServer(workdir=tmp_path) as server:
        pid = server.pid
        server.kill()
        assert _gone(pid)
        assert server.returncode == -signal.SIGKILL


def test_worker_env(broker: Broker, redis_server: RedisServer) -> None:
    env = worker_env(
        broker,
        redis_server,
        prefix="tabc-",
        web_port=6123,
        datadir="/tmp/x",
        partitions="2",
        PYTHONFAULTHANDLER="1",
    )
    assert env == {
        "STREAMRANK_BROKER": broker.url,
        "STREAMRANK_REDIS_URL": redis_server.url,
        "STREAMRANK_TOPIC_PREFIX": "tabc-",
        "STREAMRANK_WEB_PORT": "6123",
        "STREAMRANK_DATADIR": "/tmp/x",
        "STREAMRANK_APP_ID": "streamrank-tabc",
        "STREAMRANK_FETCH_MAX_WAIT_MS": "5",
        "STREAMRANK_BROKER_SESSION_TIMEOUT": "6",
        "STREAMRANK_PARTITIONS": "2",
        "PYTHONFAULTHANDLER": "1",
    }


def test_worker_early_exit_reports_log(tmp_path: Path) -> None:
    worker = Worker({}, app="no_such_streamrank_app", workdir=tmp_path, cwd=tmp_path)
    with pytest.raises(LocalStackError, match="exited with code") as info:
        worker.start(timeout=30)
    assert "no_such_streamrank_app" in str(info.value)  # the log tail is in the message
    assert not worker.running


# A minimal Faust app reading the same variables as streams.app, so the Worker class is
# tested without depending on the real app.
STUB_APP = """
import os

import faust

app = faust.App(
    os.environ["STREAMRANK_APP_ID"],
    broker=os.environ["STREAMRANK_BROKER"],
    web_port=int(os.environ["STREAMRANK_WEB_PORT"]),
    web_bind="127.0.0.1",
    datadir=os.environ["STREAMRANK_DATADIR"],
    broker_session_timeout=float(os.environ["STREAMRANK_BROKER_SESSION_TIMEOUT"]),
)
topic = app.topic(os.environ["STREAMRANK_TOPIC_PREFIX"] + "in")


@app.agent(topic)
async def consume(stream):
    async for _ in stream:
        pass
"""


def test_worker_ready_and_stop(
    broker: Broker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "stubapp.py").write_text(textwrap.dedent(STUB_APP))
    env = worker_env(
        broker, redis_server, prefix=topic_prefix, web_port=free_port(), datadir=tmp_path / "data"
    )
    worker = Worker(env, app="stubapp", workdir=tmp_path / "w", cwd=tmp_path)
    try:
        worker.start(timeout=60)
        pid = worker.pid
        assert worker.running
        assert WORKER_READY_MARKER in worker.log_text()
        worker.stop()
        assert _gone(pid)
        assert worker.returncode == 0, worker.log_tail()
    finally:
        worker.stop()
