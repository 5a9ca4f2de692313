"""Reading a request's item hashes from Redis: one script call against a pipeline.

    python bench/redis_reads.py [--items 100] [--requests 300]

``RedisStore.read`` reads many item hashes with one EVALSHA (``_READ_HASHES``);
the baseline, measured in the same run on the same Redis, is what it did before:
a redis-py pipeline of one HGETALL per item. Both decode every field to str.
Prints the median and p99 time per request of each.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, machine_lines  # noqa: E402
from engine.redis_store import RedisStore  # noqa: E402
from engine.store import HashRead  # noqa: E402
from streamrank.localstack import RedisServer  # noqa: E402

ITEM = {
    "cat": "shoes/running", "brand": "acme", "price": "59.9", "avail": "1", "imp": "812",
    "clk": "31", "exp": "24.5", "cart": "4", "buy": "1", "t|i": "12.5", "t|c": "0.8",
    "t|_t": "1764300000.0",
}  # fmt: skip


def timed(read: Callable[[list[str]], object], requests: list[list[str]]) -> list[float]:
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

        def script(keys: list[str]) -> object:
            return store.read([HashRead(key) for key in keys])

        def pipeline(keys: list[str]) -> object:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return [{k.decode(): v.decode() for k, v in r.items()} for r in pipe.execute()]

        assert script(requests[0]) == pipeline(requests[0])
        results: dict[str, list[float]] = {"pipeline (baseline)": [], "one script call": []}
        for _ in range(2):  # interleaved rounds: drift on a noisy machine hits both alike
            results["pipeline (baseline)"] += timed(pipeline, requests)
            results["one script call"] += timed(script, requests)
        client.close()

    print(machine_lines(machine()))
    print(f"\n{args.items} item hashes per request, {2 * args.requests} requests each\n")
    print("| read | p50 ms | p99 ms | p50 / baseline p50 |")
    print("|---|---:|---:|---:|")
    base = statistics.median(results["pipeline (baseline)"])
    for name, times in results.items():
        p50 = statistics.median(times)
        p99 = statistics.quantiles(times, n=100)[98]
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / base:.2f} |")


if __name__ == "__main__":
    main()
