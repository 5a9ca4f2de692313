"""The interactions process: a batch prepared while the one before commits, on Redis."""

from __future__ import annotations

import uuid

import orjson
import redis

from engine.experiment_config import default_config
from engine.experiment_metrics import ServedRequest, read_variant
from engine.features import FeatureConfig, catalog_writes, item_key
from engine.messages import Candidate, CatalogItem, Limits, SearchRequest
from engine.ranking import Ranker, RankingConfig
from engine.redis_store import RedisStore
from engine.store import HashRead
from models.online_ctr import LinearCTR
from streams import feedback_process

T = 50_000.0
CONFIG = default_config("s")


def shop(redis_url: str, prefix: str) -> list[str]:
    """A catalog and one ranked result page, remembered and counted by the interactions
    process (twice: the second changes nothing)."""
    store = RedisStore(redis_url, key_prefix=prefix, timeout_s=2.0)
    for n, item_id in enumerate("abcdef"):
        item = CatalogItem(item_id, f"c{n % 2}", "acme", 10.0 + n)
        store.apply(catalog_writes(item, FeatureConfig()))
    feedback_process.start_with(store, RankingConfig(), Limits())
    ranking = Ranker(store, LinearCTR.prior()).rank(
        SearchRequest("r-1", "u-1", tuple(map(Candidate, "abcdef")), ts=T)
    )
    ids = tuple(item.item_id for item in ranking.result.items)
    served = ServedRequest("r-1", "u-1", {"default": "personalized"}, ids, 1.0)
    for _ in range(2):
        feedback_process.remember([(ranking.impression, ranking.positions)], [served], T, CONFIG)
    assert read_variant(store, "default", "personalized")["requests"] == 1.0
    assert float(store.read([HashRead(item_key(ids[0]))])[0]["imp"]) == 1.0
    return list(ids)


def click(event_id: str, item_id: str, ts: float) -> bytes:
    fields = {"event_id": event_id, "user_id": "u-1", "item_id": item_id, "type": "click",
              "ts": ts, "request_id": "r-1"}  # fmt: skip
    return orjson.dumps(fields)


def batches(ids: list[str]) -> list[list[bytes]]:
    # One user and one page in both: recent items, labels and the experiment's totals carry.
    return [
        [click("e-1", ids[3], T + 1), click("e-2", ids[1], T + 2)],
        [click("e-3", ids[4], T + 3), click("e-1", ids[3], T + 1), click("e-4", ids[0], T + 4)],
    ]


def contents(redis_url: str, prefix: str) -> dict:
    client = redis.Redis.from_url(redis_url)
    out = {}
    for key in client.scan_iter(f"{prefix}*"):
        name = key.decode().removeprefix(prefix)
        if name.startswith(("ev:", "rq:", "xq:")):
            continue
        kind = client.type(key).decode()
        if kind == "hash":
            out[name] = client.hgetall(key)
        elif kind == "list":
            out[name] = client.lrange(key, 0, -1)
        elif kind == "zset":
            out[name] = client.zrange(key, 0, -1, withscores=True)
        else:
            out[name] = client.get(key) if kind == "string" else kind
    client.close()
    return out


def test_batches_prepared_while_the_one_before_commits_end_as_one_after_the_other(
    redis_url: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    one_after_other, pipelined = f"seq-{tag}-", f"pipe-{tag}-"
    applied = []

    ids = shop(redis_url, one_after_other)
    for batch in batches(ids):
        feedback_process.prepare(batch, T + 5, CONFIG)
        assert feedback_process.commit().applied == {}  # nothing was committing
        applied.append(feedback_process.finish().applied)
    assert applied == [{"click": 2}, {"click": 2}]  # e-1 again: applied before

    ids = shop(redis_url, pipelined)
    first, second = batches(ids)
    prepared = feedback_process.prepare(first, T + 5, CONFIG)
    assert len(prepared.examples) == 1 and not prepared.rejected
    assert feedback_process.commit().applied == {}
    feedback_process.prepare(second, T + 5, CONFIG)  # while the first commits
    assert feedback_process.commit().applied == {"click": 2}  # the first's
    assert feedback_process.finish().applied == {"click": 2}
    assert feedback_process.finish().applied == {}  # nothing left under way

    assert contents(redis_url, pipelined) == contents(redis_url, one_after_other)
