"""What the co-engagement signals cost: ranking time per request and Redis memory.

    python bench/similarity.py [--requests 1000] [--sizes 25,100,300] [--history 3000]
                               [--items 5000] [--users 1000] [--json PATH]

The synthetic shop of ``bench/_common.py`` (``make_shop``) gets its catalog and
``--history`` past requests with the clicks, carts and purchases they lead to
(``build_history``: ``Feedback`` learns the co-engagement pairs as a worker does), on a
real Redis (``RedisStore``). Then, per size, the same requests are ranked by two rankers
on that Redis, interleaved request by request (alternating which goes first):

- ``off``: ``FeatureConfig(similarity=False)``, the baseline measured in the same run;
- ``on``: the default, ``session_similarity`` and ``history_similarity`` computed from the
  user's anchors' neighbour hashes (a second round trip when the user has recent items,
  the neighbour hashes then served from the ranker's near cache for a second).

Each ranker has its own near cache (1 s, as in a worker). The added time per request is
the difference of the medians (and the median of the per-request differences).

Memory, with Redis ``MEMORY USAGE`` (exact, ``SAMPLES 0``): per item, its neighbour hash
``i:{item}:n`` and the two fields ``s|n``, ``s|_t`` it adds to the item hash; per user,
nothing is added (the recent items list that the anchors come from is kept by the
features anyway: its size is printed for scale); the shop-wide popular items ``g:pop``.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    build_history,
    machine,
    machine_lines,
    make_shop,
    markdown_table,
    parse,
    request_body,
    write_catalog,
    write_json,
)
from engine.features import FeatureConfig  # noqa: E402
from engine.item_similarity import POPULAR_KEY, TOTAL_PREFIX  # noqa: E402
from engine.ranking import Ranker, RankingConfig  # noqa: E402
from engine.redis_store import RedisStore  # noqa: E402
from models.online_ctr import LinearCTR  # noqa: E402
from streamrank.localstack import RedisServer  # noqa: E402

PREFIX = "bench:"


def _usage(client, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def memory(client) -> dict:
    """Bytes per item (neighbour hash, fields in the item hash) and per user, exact."""
    neighbour_keys = list(client.scan_iter(match=f"{PREFIX}i:*:n", count=1000))
    sizes = [_usage(client, k) for k in neighbour_keys]
    lengths = [client.hlen(k) - 1 for k in neighbour_keys]  # less the stamp _t
    # The item hash with and without the similarity fields: copy it without them.
    extra = []
    for key in neighbour_keys[:300]:
        item_key = key[: -len(":n")]
        fields = client.hgetall(item_key)
        if not any(f.startswith(TOTAL_PREFIX.encode()) for f in fields):
            continue
        plain = {f: v for f, v in fields.items() if not f.startswith(TOTAL_PREFIX.encode())}
        client.delete("tmp:plain", "tmp:full")
        client.hset("tmp:full", mapping=fields)
        client.hset("tmp:plain", mapping=plain)
        extra.append(_usage(client, "tmp:full") - _usage(client, "tmp:plain"))
    client.delete("tmp:plain", "tmp:full")
    recent = [_usage(client, k) for k in client.scan_iter(match=f"{PREFIX}u:*:r", count=1000)]
    return {
        "items_with_neighbours": len(neighbour_keys),
        "neighbours_mean": round(statistics.fmean(lengths), 1) if lengths else 0,
        "neighbours_max": max(lengths, default=0),
        "neighbour_hash_bytes_mean": round(statistics.fmean(sizes)) if sizes else 0,
        "neighbour_hash_bytes_max": max(sizes, default=0),
        "item_hash_extra_bytes_mean": round(statistics.fmean(extra)) if extra else 0,
        "user_added_bytes": 0,
        "user_recent_list_bytes_mean": round(statistics.fmean(recent)) if recent else 0,
        "popular_hash_bytes": _usage(client, PREFIX + POPULAR_KEY),
        "popular_items": max(0, client.hlen(PREFIX + POPULAR_KEY) - 1),
    }


def measure(args: argparse.Namespace) -> dict:
    shop = make_shop(n_items=args.items, n_users=args.users, seed=args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict = {"machine": machine(), "config": vars(args).copy(), "sizes": {}}
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix=PREFIX, timeout_s=2.0)
        started = time.perf_counter()
        write_catalog(shop, store)
        history = build_history(shop, store, args.history, seed=args.seed + 1)
        print(
            f"history: {history.requests} requests, {history.clicks} clicks, {history.carts} "
            f"carts, {history.purchases} purchases in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        client = store.client
        results["memory"] = memory(client)
        gc.collect()
        gc.freeze()
        rankers = {
            "off": Ranker(
                store, LinearCTR.prior(), RankingConfig(features=FeatureConfig(similarity=False))
            ),
            "on": Ranker(store, LinearCTR.prior(), RankingConfig()),
        }
        rng = random.Random(args.seed + 2)
        for size in sizes:
            total = args.warmup + args.requests
            requests = [parse(request_body(shop, rng, size, f"s{size}-{n}")) for n in range(total)]
            timings: dict[str, list[float]] = {"off": [], "on": []}
            with_anchors = 0
            for n, request in enumerate(requests):
                order = ("off", "on") if n % 2 == 0 else ("on", "off")
                for name in order:
                    t0 = time.perf_counter()
                    ranking = rankers[name].rank(request)
                    elapsed = (time.perf_counter() - t0) * 1000.0
                    assert not ranking.result.degraded
                    if n >= args.warmup:
                        timings[name].append(elapsed)
                if n >= args.warmup and ranking.impression is not None:
                    with_anchors += bool(ranking.impression.features[:, -1].any())
            off, on = statistics.median(timings["off"]), statistics.median(timings["on"])
            paired = statistics.median(
                b - a for a, b in zip(timings["off"], timings["on"], strict=True)
            )
            results["sizes"][size] = {
                "off_p50_ms": round(off, 3),
                "on_p50_ms": round(on, 3),
                "added_p50_ms": round(on - off, 3),
                "added_paired_p50_ms": round(paired, 3),
                "requests": len(timings["on"]),
                "requests_with_similarity": with_anchors,
            }
            print(f"{size:>4} candidates: {results['sizes'][size]}", flush=True)
        store.client.close()
    return results


def report(results: dict) -> None:
    print()
    print(machine_lines(results["machine"]))
    rows = [
        [
            size,
            s["off_p50_ms"],
            s["on_p50_ms"],
            s["added_p50_ms"],
            s["added_paired_p50_ms"],
            f"{s['requests_with_similarity']}/{s['requests']}",
        ]
        for size, s in results["sizes"].items()
    ]
    print("\nRanking time per request on RedisStore (median ms), similarity off vs on")
    headers = [
        "candidates",
        "off p50",
        "on p50",
        "added (p50 on - p50 off)",
        "added (paired p50)",
        "requests with a non-zero history_similarity",
    ]
    print(markdown_table(headers, rows))
    m = results["memory"]
    print("\nRedis memory (MEMORY USAGE, exact)")
    print(
        markdown_table(
            ["what", "bytes"],
            [
                [
                    f"per item: neighbour hash i:{{item}}:n (mean of {m['items_with_neighbours']}"
                    f" items; {m['neighbours_mean']} neighbours mean, {m['neighbours_max']} max)",
                    m["neighbour_hash_bytes_mean"],
                ],
                ["per item: neighbour hash, largest", m["neighbour_hash_bytes_max"]],
                ["per item: s|n, s|_t in the item hash", m["item_hash_extra_bytes_mean"]],
                ["per user: added", m["user_added_bytes"]],
                ["per user: recent items list (kept anyway)", m["user_recent_list_bytes_mean"]],
                [
                    f"shop: popular items g:pop ({m['popular_items']} items)",
                    m["popular_hash_bytes"],
                ],
            ],
        )
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sizes", default="25,100,300")
    parser.add_argument("--history", type=int, default=3000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = measure(args)
    report(results)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
