"""The deep model registry on both stores, its watcher, and `streamrank model`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import orjson
import pytest
import torch

from engine.redis_store import RedisStore
from engine.store import BlobRead, MemoryStore
from models.deep_ctr import DeepConfig, DeepCTR
from models.registry import (
    BLOB_KEY,
    REVISION_KEY,
    DeepModelWatcher,
    ModelRegistry,
    RegistryConflict,
)
from streamrank.cli import main

torch.set_num_threads(1)

TINY = DeepConfig(
    user_buckets=8, item_buckets=8, category_buckets=4, brand_buckets=4, query_buckets=8
)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        prefix = f"ut:{uuid.uuid4().hex[:10]}:"
        redis_store = RedisStore(request.getfixturevalue("redis_url"), key_prefix=prefix)
        yield redis_store
        redis_store.client.close()


def model_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    return DeepCTR(TINY).to_bytes()


def test_publish_list_promote_rollback(store) -> None:
    registry = ModelRegistry(store, keep=5)
    assert registry.serving_version() is None and registry.list() == []
    with pytest.raises(LookupError):
        registry.load()
    with pytest.raises(LookupError):
        registry.rollback()
    blobs = {v: model_bytes(v) for v in (1, 2, 3)}
    for v in (1, 2, 3):
        window = (100.0 * v, 100.0 * v + 50)
        assert registry.publish(blobs[v], {"auc": 0.6 + v / 100, "logloss": 0.3}, window) == v
    listed = registry.list()
    assert [e["version"] for e in listed] == [1, 2, 3]
    assert [e["serving"] for e in listed] == [False, False, True]
    assert listed[0]["metrics"]["auc"] == pytest.approx(0.61)
    assert listed[0]["window"] == [100.0, 150.0] and listed[0]["size"] == len(blobs[1])
    assert registry.serving_version() == 3 and registry.load().version == 3
    assert registry.read_blob(2) == blobs[2]

    assert registry.promote(1) == 1 and registry.serving_version() == 1
    with pytest.raises(LookupError):
        registry.promote(42)
    assert registry.rollback() == 3  # back to what served before the promotion
    assert registry.rollback() == 2
    assert registry.rollback() == 1
    with pytest.raises(LookupError):
        registry.rollback()
    # A version published without serving waits for a promotion.
    assert registry.publish(model_bytes(4), {"auc": 0.5}, (0, 1), serve=False) == 4
    assert registry.serving_version() == 1


def test_retention_keeps_the_serving_version_and_bounds_the_blobs(store) -> None:
    registry = ModelRegistry(store, keep=3)
    for v in range(1, 4):
        registry.publish(b"m%d" % v, {}, (0, 1))
    registry.promote(1)
    for v in range(4, 8):
        registry.publish(b"m%d" % v, {}, (0, 1), serve=False)
    assert [e["version"] for e in registry.list()] == [1, 6, 7]
    assert registry.serving_version() == 1 and registry.read_blob(1) == b"m1"
    with pytest.raises(LookupError):
        registry.read_blob(5)
    slots = store.read([BlobRead(BLOB_KEY.format(slot=s)) for s in range(4)])
    assert sorted(slots[:3]) == [b"m1", b"m6", b"m7"] and slots[3] is None
    # Rolled back past evicted versions: nothing earlier is retained.
    registry.promote(7)
    assert registry.rollback() == 1


def test_oversized_models_are_refused(store) -> None:
    registry = ModelRegistry(store, max_bytes=1000)
    with pytest.raises(ValueError, match="bound"):
        registry.publish(b"x" * 1001, {}, (0, 1))
    assert registry.list() == []


def test_a_concurrent_change_is_never_overwritten() -> None:
    store = MemoryStore()
    registry = ModelRegistry(store)
    registry.publish(b"m1", {}, (0, 1))
    # Another writer claimed the next revision: this writer must not write over it.
    store.apply([], once=REVISION_KEY.format(revision=2))
    with pytest.raises(RegistryConflict):
        registry.publish(b"m2", {}, (0, 1))
    assert [e["version"] for e in registry.list()] == [1]


def test_watcher_loads_only_on_change_and_follows_rollbacks(store) -> None:
    registry = ModelRegistry(store)
    watcher = DeepModelWatcher(registry)
    assert watcher.poll() is None
    registry.publish(model_bytes(1), {"auc": 0.7}, (0, 1))
    first = watcher.poll()
    assert first is not None and first.version == 1 and watcher.poll() is None
    registry.publish(model_bytes(2), {"auc": 0.71}, (0, 1))
    assert watcher.poll().version == 2
    registry.rollback()
    assert watcher.poll().version == 1


def test_watcher_keeps_the_model_when_a_version_is_refused() -> None:
    registry = ModelRegistry(MemoryStore())
    watcher = DeepModelWatcher(registry)
    registry.publish(model_bytes(1), {}, (0, 1))
    assert watcher.poll().version == 1
    registry.publish(b"not a model", {}, (0, 1))
    assert watcher.poll() is None and watcher.version == 1


def test_cli_model_list_promote_rollback(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("STREAMRANK_REDIS_URL", redis_url)
    monkeypatch.setenv("STREAMRANK_TOPIC_PREFIX", prefix)
    store = RedisStore(redis_url, key_prefix=prefix, timeout_s=2.0)
    registry = ModelRegistry(store)
    for v in (1, 2):
        registry.publish(model_bytes(v), {"auc": 0.7 + v / 100, "logloss": 0.3}, (0, 1))

    assert main(["model", "list"]) == 0
    table = capsys.readouterr().out
    assert "| 2 | * |" in table and "0.7200" in table and "| 1 |  |" in table
    assert main(["model", "promote", "1"]) == 0
    assert "serving version 1" in capsys.readouterr().out
    assert registry.serving_version() == 1
    assert main(["model", "list", "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert [(e["version"], e["serving"]) for e in listed] == [(1, True), (2, False)]
    assert main(["model", "rollback"]) == 0
    assert registry.serving_version() == 2
    assert main(["model", "promote", "9"]) == 1
    assert "not in the registry" in capsys.readouterr().err
    store.client.close()
