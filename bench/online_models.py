"""Which online CTR learner? River's optimizers compared on a real log, through the engine.

Each configuration replays the MIND subset through the same code as the worker
(test-then-train: every impression is ranked before its clicks are learned) and
reports the per-impression metrics of the replay report, plus the learner's cost
per example measured on the example stream that replay produced.

    python bench/online_models.py [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.features import FEATURE_NAMES  # noqa: E402
from models.online_ctr import OnlineCTR  # noqa: E402
from models.profile import RankingProfile  # noqa: E402
from streamrank.importers import import_mind  # noqa: E402
from streamrank.replay import ReplayOptions, replay  # noqa: E402

CONFIGURATIONS = {
    "SGD 0.02, raw features": RankingProfile(
        online_optimizer="sgd", online_learning_rate=0.02, online_standardize=False
    ),
    "FTRL-Proximal, raw features": RankingProfile(
        online_optimizer="ftrl", online_learning_rate=0.05, online_standardize=False
    ),
    "Adam 0.01, standardized": RankingProfile(
        online_optimizer="adam", online_learning_rate=0.01, online_standardize=True
    ),
    "SGD 0.02, standardized": RankingProfile(
        online_optimizer="sgd", online_learning_rate=0.02, online_standardize=True
    ),
    "FTRL-Proximal, standardized (shipped)": RankingProfile(),
}


def default_data() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def learner_cost_us(profile: RankingProfile, examples: int = 20_000) -> float:
    """Median microseconds per learn() over repeated runs on a synthetic example stream."""
    rows = [
        {name: ((i * 7919 + j * 104729) % 1000) / 1000.0 for j, name in enumerate(FEATURE_NAMES)}
        for i in range(examples)
    ]
    timings = []
    for _ in range(3):
        model = OnlineCTR(**profile.learner_options())
        started = time.perf_counter()
        for i, x in enumerate(rows):
            model.learn(x, i % 17 == 0)
        timings.append((time.perf_counter() - started) / examples * 1e6)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    events = list(import_mind(args.data / "mind-small-subset"))
    rows = []
    report = None
    for name, profile in CONFIGURATIONS.items():
        report = replay(events, ReplayOptions(profile))
        rows.append(
            {
                "learner": name,
                **{k: report["metrics"][k] for k in ("auc", "logloss", "ndcg@10", "mrr")},
                "us_per_example": round(learner_cost_us(profile), 1),
            }
        )
        print(rows[-1], flush=True)
    assert report is not None
    baselines = report["baselines"]

    print(
        f"\nMIND subset ({report['requests']} impressions), {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| learner | AUC | logloss | nDCG@10 | MRR | µs / example |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['learner']} | {row['auc']:.4f} | {row['logloss']:.4f} | "
            f"{row['ndcg@10']:.4f} | {row['mrr']:.4f} | {row['us_per_example']} |"
        )
    for name, metrics in baselines.items():
        print(
            f"| baseline: {name.replace('_', ' ')} | {metrics.get('auc', 0):.4f} | "
            f"{metrics.get('logloss', float('nan')):.4f} | {metrics['ndcg@10']:.4f} | "
            f"{metrics['mrr']:.4f} | |"
        )
    if args.json:
        args.json.write_bytes(orjson.dumps({"rows": rows, "baselines": baselines}))


if __name__ == "__main__":
    main()
