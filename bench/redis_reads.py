"""Reading a request's state from Redis: item hashes, and a query's counters.

    python bench/redis_reads.py [--items 100] [--requests 300] [--query-items 100]

1. ``RedisStore.read`` reads many item hashes in one round trip of HGETALLs that hiredis
   packs (``RedisStore._round_trip``); the baseline, measured in the same run on the same
   Redis, is a redis-py pipeline of the same commands, which looks at every argument and
   reply in Python first. Both decode every field to str.
2. A query's counters (``q:{query}``: ``{item}|i``, ``|c``, ``|e``) for ``--items``
   candidates, one HMGET of three fields each, from a hash holding ``--query-items`` items'
   counters, in Redis's compact encoding (what its default ``hash-max-listpack-entries``
   of 512 keeps a hash of up to 512 fields in) and as a hash table (what
   ``streamrank.localstack.REDIS_TUNING`` makes of one over 128 fields).

Prints the median and p99 time per request of each, and for the query counters Redis's
own time per HMGET (INFO commandstats).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, machine_lines  # noqa: E402
from engine.redis_store import RedisStore  # noqa: E402
from engine.store import FieldsRead, HashRead  # noqa: E402
from streamrank.localstack import RedisServer  # noqa: E402

ITEM = {
    "cat": "shoes/running", "brand": "acme", "price": "59.9", "avail": "1", "imp": "812",
    "clk": "31", "exp": "24.5", "cart": "4", "buy": "1", "t|i": "12.5", "t|c": "0.8",
    "t|_t": "1764300000.0",
}  # fmt: skip


def timed(read: Callable[[Any], object], requests: Sequence[Any]) -> list[float]:
    times = []
    for keys in requests:
        started = time.perf_counter()
        read(keys)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="item hashes per request")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--catalog", type=int, default=5000)
    parser.add_argument("--query-items", type=int, default=100, help="items in a query's hash")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    with RedisServer() as server:
        store = RedisStore(server.url, timeout_s=2.0)
        client = store.client
        for n in range(args.catalog):
            client.hset(f"i:{n}", mapping=ITEM)
        requests = [
            [f"i:{rng.randrange(args.catalog)}" for _ in range(args.items)]
            for _ in range(args.requests)
        ]

        def store_read(keys: list[str]) -> object:
            return store.read([HashRead(key) for key in keys])

        def pipeline(keys: list[str]) -> object:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return [{k.decode(): v.decode() for k, v in r.items()} for r in pipe.execute()]

        assert store_read(requests[0]) == pipeline(requests[0])
        results: dict[str, list[float]] = {"redis-py pipeline (baseline)": [], "RedisStore": []}
        for _ in range(2):  # interleaved rounds: drift on a noisy machine hits both alike
            results["redis-py pipeline (baseline)"] += timed(pipeline, requests)
            results["RedisStore"] += timed(store_read, requests)
        query_results, server_us = query_counters(store, args, rng)
        client.close()

    print(machine_lines(machine()))
    print(f"\n{args.items} item hashes per request, {2 * args.requests} requests each\n")
    print("| read | p50 ms | p99 ms | p50 / baseline p50 |")
    print("|---|---:|---:|---:|")
    base = statistics.median(results["redis-py pipeline (baseline)"])
    for name, times in results.items():
        p50 = statistics.median(times)
        p99 = statistics.quantiles(times, n=100)[98]
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f} |")
    print(
        f"\nA query's counters of {args.items} candidates ({3 * args.items} fields, one HMGET) "
        f"from a hash of {args.query_items} items' counters ({3 * args.query_items} fields), "
        f"{args.requests} requests each\n"
    )
    print("| the query's hash | p50 ms | p99 ms | Redis's own µs per HMGET |")
    print("|---|---:|---:|---:|")
    for name, times in query_results.items():
        p99 = statistics.quantiles(times, n=100)[98]
        print(f"| {name} | {statistics.median(times):.3f} | {p99:.3f} | {server_us[name]:.1f} |")


def query_counters(
    store: RedisStore, args: argparse.Namespace, rng: random.Random
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """HMGET times of a query's counters from the same fields in both encodings of a hash."""
    client = store.client
    shown = [f"item-{n}" for n in range(args.query_items)]
    counters = {f"{item}|{s}": str(rng.randrange(1, 50)) for item in shown for s in "ice"}
    encodings = {}
    # A hash keeps the encoding it was written in while under the limit it was written with.
    for name, limit in (("compact (Redis's default limit)", 512), ("hash table", 128)):
        client.config_set("hash-max-ziplist-entries", limit)
        key = f"q:{limit}"
        client.hset(key, mapping=counters)
        encodings[name] = (key, client.object("encoding", key).decode())
    asked = [rng.sample(shown, args.items) for _ in range(args.requests)]
    fields = [tuple(f"{item}|{s}" for item in items for s in "ice") for items in asked]
    results: dict[str, list[float]] = {}
    server_us: dict[str, float] = {}
    for name, (key, encoding) in encodings.items():
        label = f"{name}: {encoding}"
        client.config_resetstat()
        results[label] = timed(lambda f, key=key: store.read([FieldsRead(key, f)]), fields)
        server_us[label] = client.info("commandstats")["cmdstat_hmget"]["usec_per_call"]
    return results, server_us


if __name__ == "__main__":
    main()
