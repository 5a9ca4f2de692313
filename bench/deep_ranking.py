"""Scoring time per request of the deep CTR model, beside the online linear model.

For 25, 100 and 300 candidates: the deep model (default :class:`~models.deep_ctr.DeepConfig`,
about 1.2 M parameters) hashes the request's ids into rows (user and query once, item,
category and brand per candidate) and scores them in one batched ``inference_mode``
forward pass; the online :class:`~models.online_ctr.LinearCTR` scores the same
feature matrix with one matrix-vector product. The feature matrix itself (the engine's
21 features, read from the store) is prepared beforehand and is the same for both, so the
table is the model's share of the ranking time. Item ids are drawn from a large catalog, so
the hash cache sees mostly misses, as with a real catalog. Weights are random: the time
does not depend on their values.

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

from bench._common import machine, machine_lines, write_json  # noqa: E402
from engine.features import FEATURE_NAMES  # noqa: E402
from models.deep_ctr import DeepConfig, DeepCTR  # noqa: E402
from models.online_ctr import LinearCTR  # noqa: E402

SIZES = (25, 100, 300)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


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
            rows = deep.encode_request(user, query, items, cats, brands, features)
            deep.predict_proba_many(rows)
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
    payload = {"results": results, "threads": args.threads, "model_bytes": size, "machine": info}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
