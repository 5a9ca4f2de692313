"""Experiments on simulated shoppers, where the truth is known: the figures in the README.

    .venv/bin/python bench/experiments.py [--seeds 10] [--aa-runs 1000]

Prints, as JSON: the A/A false-positive rate of the mSPRT (and of a fixed-horizon test
looked at as often) when checked after every batch of 100 requests; per seed, the A/B
test's requests to a verdict (looking every 10 requests), its lift interval against the
true lift, and the requests interleaving needed for the same verdict; the requests each
method needs for 80% of the runs to decide, and their ratio (with the ratios of medians
and means); the sample-ratio check with and without an injected mismatch. See
streamrank/experiment_sim.py for the set-up.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamrank.experiment_sim import (  # noqa: E402
    ExperimentSimulation,
    aa_false_positive_rate,
    sensitivity,
    true_lift,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--aa-runs", type=int, default=1000)
    args = parser.parse_args()
    began = time.perf_counter()
    aa = aa_false_positive_rate(runs=args.aa_runs, requests=6000, batch=100, seed=0)
    runs = []
    for seed in range(1, args.seeds + 1):
        truth = true_lift(seed)
        ab = ExperimentSimulation(seed, mode="ab").run_until_decided(batch=10)
        fixed = ab.report["comparisons"][0]["fixed_horizon"]
        low, high = fixed["lift_ci"]
        runs.append(
            {
                "seed": seed,
                "true_lift": round(truth, 4),
                "ab_requests": ab.requests,
                "ab_verdict": ab.verdict,
                "ab_lift": fixed["lift"],
                "ab_lift_ci": [low, high],
                "ci_covers_truth": low <= truth <= high,
            }
        )
    found = sensitivity(range(1, args.seeds + 1), power=0.8, batch=10)
    for run, interleaved in zip(runs, found.interleaving_requests, strict=True):
        run["interleaving_requests"] = interleaved
    comparison = {
        "looks_every": 10,
        "verdicts_agree": found.verdicts_agree,
        "ab_requests_for_80pct_power": found.ab_at_power,
        "interleaving_requests_for_80pct_power": found.interleaving_at_power,
        "ratio_at_80pct_power": round(found.ratio, 1),
        "ratio_of_medians": round(
            float(np.median(found.ab_requests) / np.median(found.interleaving_requests)), 1
        ),
        "ratio_of_means": round(
            float(np.mean(found.ab_requests) / np.mean(found.interleaving_requests)), 1
        ),
    }
    srm = {}
    for name, drop in (("healthy", 0.0), ("15% of treatment users lost", 0.15)):
        sim = ExperimentSimulation(4, mode="ab", drop_share=drop, shoppers=3000)
        sim.serve(5000)
        srm[name] = sim.look()["srm"]
    print(
        orjson.dumps(
            {
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "aa": aa,
                "ab_runs": runs,
                "ab_vs_interleaving": comparison,
                "srm": srm,
                "elapsed_s": round(time.perf_counter() - began, 1),
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


if __name__ == "__main__":
    main()
