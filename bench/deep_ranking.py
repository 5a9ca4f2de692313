"""Ranking time per request with the deep CTR model, beside the online linear model alone.

First, the whole ranking (``Ranker.rank`` on the in-memory store: state, 21 features,
scoring, blend, sort) of a synthetic shop (5,000 items, 1,000 users, 3,000 past requests
and their engagement written through the engine), with the online model alone and with
a deep model serving beside it, alternating request by request so both see the same
machine. Then the models' own share, for 25, 100 and 300 candidates: the deep model
(default :class:`~models.deep_ctr.DeepConfig`, about 2.3 M parameters) hashes the
request's ids (user and query once; item, category and brand per candidate) and scores
all candidates in one batched forward pass (``DeepCTR.predict_request``); the online
:class:`~models.online_ctr.LinearCTR` scores the same prepared feature matrix with one
matrix-vector product. Item ids are drawn from a large catalog, so the hash cache sees
mostly misses, as with a real catalog. The weights are random (a fresh DCN-v2 of the
default size): the time does not depend on their values.

    python bench/deep_ranking.py [--requests 2000] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    build_history,
    machine,
    machine_lines,
    make_shop,
    parse,
    request_body,
    write_catalog,
    write_json,
)
from engine.features import FEATURE_NAMES  # noqa: E402
from engine.ranking import Ranker  # noqa: E402
from engine.store import MemoryStore  # noqa: E402
from models.deep_ctr import DeepConfig, DeepCTR  # noqa: E402
from models.online_ctr import LinearCTR  # noqa: E402

SIZES = (25, 100, 300)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def whole_ranking(deep: DeepCTR, requests_per_size: int, rng: random.Random) -> dict:
    """Median and p99 of ``Ranker.rank`` with the online model alone and with the deep one."""
    shop = make_shop(n_items=5000, n_users=1000, seed=7)
    store = MemoryStore()
    write_catalog(shop, store)
    build_history(shop, store, 3000, seed=8)
    online_only = Ranker(store, LinearCTR.prior())
    blended = Ranker(store, LinearCTR.prior())
    blended.deep_model = deep
    results = {}
    for n in SIZES:
        requests = [
            parse(request_body(shop, rng, n, f"w{n}-{r}")) for r in range(requests_per_size + 200)
        ]
        times: dict[str, list[float]] = {"online": [], "deep": []}
        for i, request in enumerate(requests):
            order = (("online", online_only), ("deep", blended))
            for name, ranker in order if i % 2 else order[::-1]:
                started = time.perf_counter()
                ranker.rank(request)
                if i >= 200:  # warm-up
                    times[name].append((time.perf_counter() - started) * 1e3)
        results[n] = {
            "online_median_ms": statistics.median(times["online"]),
            "online_p99_ms": percentile(times["online"], 99),
            "with_deep_median_ms": statistics.median(times["deep"]),
            "with_deep_p99_ms": percentile(times["deep"], 99),
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker: 1)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    deep = DeepCTR(DeepConfig())
    linear = LinearCTR.prior()
    ranking = whole_ranking(deep, args.requests, rng)
    catalog = 1_000_000
    results = {}
    for n in SIZES:
        requests = []
        for r in range(args.requests + 200):
            items = [f"i-{rng.randrange(catalog)}" for _ in range(n)]
            requests.append(
                (
                    f"u-{rng.randrange(100_000)}",
                    f"query words {r % 500}",
                    items,
                    [f"c-{rng.randrange(300)}" for _ in range(n)],
                    [f"b-{rng.randrange(2000)}" for _ in range(n)],
                    np.random.default_rng(r).random((n, len(FEATURE_NAMES))),
                )
            )
        deep_ms, linear_ms = [], []
        for i, (user, query, items, cats, brands, features) in enumerate(requests):
            started = time.perf_counter()
            deep.predict_request(user, query, items, cats, brands, features)
            middle = time.perf_counter()
            linear.predict_proba_many(features)
            ended = time.perf_counter()
            if i >= 200:  # warm-up
                deep_ms.append((middle - started) * 1e3)
                linear_ms.append((ended - middle) * 1e3)
        results[n] = {
            "deep_median_ms": statistics.median(deep_ms),
            "deep_p99_ms": percentile(deep_ms, 99),
            "linear_median_ms": statistics.median(linear_ms),
            "linear_p99_ms": percentile(linear_ms, 99),
        }
    info = machine()
    print("Whole ranking (Ranker.rank, in-memory store), ms per request:\n")
    print("| candidates | online alone p50 | p99 | online + deep p50 | p99 | added p50 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, r in ranking.items():
        print(
            f"| {n} | {r['online_median_ms']:.3f} | {r['online_p99_ms']:.3f} "
            f"| {r['with_deep_median_ms']:.3f} | {r['with_deep_p99_ms']:.3f} "
            f"| {r['with_deep_median_ms'] - r['online_median_ms']:.3f} |"
        )
    print("\nThe models' own share, ms per request:\n")
    print("| candidates | deep median ms | deep p99 ms | online linear median ms | linear p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    for n, r in results.items():
        print(
            f"| {n} | {r['deep_median_ms']:.3f} | {r['deep_p99_ms']:.3f} "
            f"| {r['linear_median_ms']:.4f} | {r['linear_p99_ms']:.4f} |"
        )
    size = len(deep.to_bytes())
    print(
        f"\nDeep model: DCN-v2, {sum(p.numel() for p in deep.network.parameters()):,} parameters, "
        f"{size / 1e6:.1f} MB saved; torch threads {args.threads}; {args.requests} requests a size."
    )
    print(machine_lines(info))
    payload = {
        "ranking": ranking,
        "results": results,
        "threads": args.threads,
        "model_bytes": size,
        "machine": info,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
