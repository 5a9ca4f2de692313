"""The deep CTR model retrained periodically on a replayed log, against the online model.

The log is replayed once through the engine (test-then-train, as ``streamrank replay``);
for every request the replay keeps the feature rows the online model scored and its click
probabilities. Then, in time order, every ``retrain_every`` requests the deep model is
trained on the examples of the earlier requests whose click window has closed (the newest
``window`` of them) by the job the workers run (:func:`models.deep_trainer.run_training_job`:
a fresh candidate, validated on the newest slice, gated), and a published
candidate scores the following requests. Those requests are judged three ways: the online
model's probability alone, the deep model's alone, and their blend with the profile's
``deep_weight`` (as the rankers blend), with the replay report's metrics (per request with
a click: nDCG@10, MRR, AUC, logloss) and pooled AUC and logloss over every shown item.

    python -m streamrank.deep_replay [--data ../shared/data] [--retrain-every 500]
                                     [--profile FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from engine.impressions import LabelledExample
from engine.messages import SearchRequest
from engine.ranking import Ranking
from models.deep_ctr import DeepCTR
from models.deep_trainer import TrainingJob, run_training_job
from models.metrics import RankingMetrics, auc, logloss
from models.profile import RankingProfile
from streamrank.evaluation import Judge
from streamrank.importers import import_mind
from streamrank.replay import ReplayOptions, replay

# Deep model shares reported beside the profile's (online has the rest).
BLEND_WEIGHTS = (0.25, 0.5, 0.75)


@dataclass
class Shown:
    """A request as the online model saw it, in the candidates' input order."""

    request_id: str
    user_id: str
    query: str
    ts: float
    items: tuple[str, ...]
    features: np.ndarray
    online: np.ndarray  # the online model's click probability per item


def capture(
    events: list[dict[str, Any]], options: ReplayOptions
) -> tuple[Judge, list[Shown], dict[str, tuple[str, str]]]:
    """Replay once; keep every request's rows, the online probabilities, and item metadata."""
    shown: list[Shown] = []
    metadata = {
        e["item_id"]: (str(e.get("category") or ""), str(e.get("brand") or ""))
        for e in events
        if e.get("stream") == "catalog"
    }

    def keep(request: SearchRequest, ranking: Ranking) -> None:
        if ranking.impression is None:  # a degraded answer
            return
        items = tuple(ranking.impression.item_ids)
        by_item = dict(
            zip(
                (i.item_id for i in ranking.result.items),
                ranking.click_probabilities,
                strict=True,
            )
        )
        shown.append(
            Shown(
                request.request_id,
                request.user_id,
                request.query or "",
                request.ts,
                items,
                np.asarray(ranking.impression.features, dtype=np.float32),
                np.array([by_item[i] for i in items]),
            )
        )

    judge = Judge(options.window_s)
    replay(events, options, on_ranked=keep, judge=judge)
    return judge, shown, metadata


def examples_of(
    requests: Iterable[Shown], judge: Judge, metadata: dict[str, tuple[str, str]]
) -> list[LabelledExample]:
    out = []
    for r in requests:
        clicks = judge.clicks(r.request_id)
        for position, (item, row) in enumerate(zip(r.items, r.features, strict=True), 1):
            category, brand = metadata.get(item, ("", ""))
            out.append(
                LabelledExample(
                    r.request_id,
                    item,
                    position,
                    item in clicks,
                    tuple(row),
                    r.ts,
                    user_id=r.user_id,
                    query=r.query,
                    category=category,
                    brand=brand,
                )
            )
    return out


class _Scores:
    def __init__(self) -> None:
        self.lists = RankingMetrics()
        self.p: list[float] = []
        self.y: list[bool] = []

    def add(self, probabilities: np.ndarray, clicked: Sequence[bool]) -> None:
        order = np.argsort(-probabilities, kind="stable")
        ranked = [clicked[i] for i in order]
        self.lists.add(ranked, probabilities[order].tolist(), probabilities[order].tolist())
        self.p += probabilities.tolist()
        self.y += list(clicked)

    def summary(self) -> dict[str, float]:
        return {
            **self.lists.summary(),
            "pooled_auc": round(auc(self.p, self.y) or 0.5, 4),
            "pooled_logloss": round(logloss(self.p, self.y), 4),
        }


def deep_replay(
    events: list[dict[str, Any]],
    retrain_every: int = 500,
    window: int = 50_000,
    epochs: int = 2,
    profile: RankingProfile | None = None,
    log=print,
    **train_options: Any,
) -> dict[str, Any]:
    """Replay, retrain periodically, and judge online / deep / blend on the later requests.

    ``train_options`` go to :func:`~models.deep_trainer.train_candidate` (``config``,
    ``embedding_l2``...).
    """
    torch.set_num_threads(2)
    profile = profile or RankingProfile()
    options = ReplayOptions(profile)
    started = time.perf_counter()
    judge, shown, metadata = capture(events, options)
    replay_s = time.perf_counter() - started
    shown.sort(key=lambda r: r.ts)
    # The profile's blend first; the others show where the weight should be.
    weights = [profile.deep_weight] + [w for w in BLEND_WEIGHTS if w != profile.deep_weight]
    blends = {f"blend {1 - w:.2f}/{w:.2f}": w for w in weights}
    scorers = {name: _Scores() for name in ("online", "deep", *blends)}
    serving: DeepCTR | None = None
    trainings: list[dict[str, Any]] = []
    for begin in range(retrain_every, len(shown), retrain_every):
        cutoff = shown[begin].ts
        settled = [r for r in shown[:begin] if r.ts + options.window_s <= cutoff]
        examples = examples_of(settled, judge, metadata)[-window:]
        if sum(e.clicked for e in examples) < 10:
            continue
        job = TrainingJob(
            examples,
            serving=None if serving is None else serving.to_bytes(),
            serving_version=None if serving is None else serving.version,
            epochs=epochs,
            threads=2,
            options={"window": window, **train_options},
        )
        outcome = run_training_job(job)
        trainings.append(
            {
                "at_request": begin,
                "examples": len(examples),
                "train_s": outcome.metrics["train_s"],
                "auc": round(outcome.metrics["auc"], 4),
                "logloss": round(outcome.metrics["logloss"], 4),
                "published": outcome.publish,
                "reason": outcome.reason,
            }
        )
        log(f"request {begin}: {trainings[-1]}")
        if outcome.publish:
            serving = DeepCTR.from_bytes(outcome.model_bytes)
            serving.version = len(trainings)
        if serving is None:
            continue
        for r in shown[begin : begin + retrain_every]:
            clicks = judge.clicks(r.request_id)
            if not clicks:
                continue  # judged like the replay report: requests with a click
            clicked = [i in clicks for i in r.items]
            rows = serving.encode(examples_of([r], judge, metadata))
            deep = serving.predict_proba_many(rows)
            scorers["online"].add(r.online, clicked)
            scorers["deep"].add(deep, clicked)
            for name, w in blends.items():
                scorers[name].add((1 - w) * r.online + w * deep, clicked)
    return {
        "requests": len(shown),
        "judged_from_request": retrain_every,
        "deep_weight": profile.deep_weight,
        "replay_s": round(replay_s, 1),
        "trainings": trainings,
        "rows": {name: s.summary() for name, s in scorers.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    names = ("ndcg@10", "mrr", "auc", "logloss", "pooled_auc", "pooled_logloss")
    lines = ["| scorer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for scorer, values in report["rows"].items():
        lines.append(f"| {scorer} | " + " | ".join(f"{values.get(n, 0):.4f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default, help="holds mind-small-subset")
    parser.add_argument("--retrain-every", type=int, default=500)
    parser.add_argument("--window", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="a profile JSON (its deep_weight blends)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    events = list(import_mind(args.data / "mind-small-subset"))
    report = deep_replay(
        events,
        retrain_every=args.retrain_every,
        window=args.window,
        epochs=args.epochs,
        profile=RankingProfile.from_file(args.profile) if args.profile else None,
    )
    print(format_table(report))
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return report


if __name__ == "__main__":
    main()
