"""Batch learning-to-rank beside streaming: LightGBM LambdaMART against streamrank on one log.

The log is replayed once through the engine, test-then-train, exactly as
``streamrank replay`` does; for every request the replay keeps the feature matrix
the online model scored (``Ranking.impression``). Those are the online features at
ranking time: user, item and query state built from the events before the request,
never from its own clicks, so nothing leaks into the labels (the request's clicks).

Requests are split in time order as ``streamrank tune`` splits them: LambdaMART
learns from the first part (one list per request, label = clicked; its tree size
and number of trees chosen by early stopping on the latest fifth of that part) and
is then frozen; streamrank's online model keeps learning through the held-out part, as in
production. Both are judged on the held-out requests with the replay report's
metrics, beside its baselines. Only LambdaMART's weights are frozen: its features
still come from the streaming state, which every held-out click updates. So the
table says what learning online gains or loses against a batch ranker trained once.

    python bench/lambdamart.py [--data ../shared/data | --log events.jsonl]
                               [--holdout 0.3] [--profile profile.json] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm  # noqa: F401  (the eval extra; imported here so that fit's timing excludes it)
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, machine_lines  # noqa: E402
from engine.features import FEATURE_NAMES  # noqa: E402
from engine.messages import SearchRequest  # noqa: E402
from engine.ranking import Ranking  # noqa: E402
from models.lambdamart import LambdaMART  # noqa: E402
from models.metrics import RankingMetrics, ndcg_at, reciprocal_rank  # noqa: E402
from models.profile import RankingProfile  # noqa: E402
from streamrank.cli import read_events  # noqa: E402
from streamrank.evaluation import Judge  # noqa: E402
from streamrank.importers import import_mind  # noqa: E402
from streamrank.replay import ReplayOptions, replay  # noqa: E402
from streamrank.tuning import split_requests  # noqa: E402

METRICS = ("ndcg@10", "mrr", "hr@10", "auc")
LEAVES = (7, 15, 31)  # tree sizes LambdaMART chooses from, on the training part
MAX_TREES = 500


def default_data() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@dataclass(frozen=True, slots=True)
class Shown:
    """A request as the online model saw it: items in input order, their feature rows at
    ranking time, and streamrank's order."""

    items: tuple[str, ...]
    features: np.ndarray
    ranked: tuple[str, ...]


def capture(
    events: list[dict[str, Any]], profile: RankingProfile
) -> tuple[Judge, dict[str, Shown]]:
    """Replay once; keep every request's items, feature rows and streamrank's order."""
    shown: dict[str, Shown] = {}

    def keep(request: SearchRequest, ranking: Ranking) -> None:
        if ranking.impression is not None:  # None only for a degraded answer
            # float32, as the worker stores impressions: the precision LightGBM bins anyway
            features = np.asarray(ranking.impression.features, dtype=np.float32)
            ranked = tuple(item.item_id for item in ranking.result.items)
            shown[request.request_id] = Shown(ranking.impression.item_ids, features, ranked)

    options = ReplayOptions(profile)
    judge = Judge(options.window_s)  # as replay's own: clicks judge within the window
    replay(events, options, on_ranked=keep, judge=judge)
    return judge, shown


def fit(judge: Judge, shown: dict[str, Shown], train: list[str]) -> LambdaMART:
    """LambdaMART on the training requests, its tree size and count chosen on their latest
    fifth: for each of :data:`LEAVES`, boosting stops early on the last 20% of the training
    requests (in time); the best of those is refit on all training requests. The held-out
    part plays no part in any choice, as in ``streamrank tune``."""

    def lists_of(ids: list[str]) -> tuple[list[np.ndarray], list[list[bool]]]:
        clicks = [judge.clicks(r) for r in ids]
        return (
            [shown[r].features for r in ids],
            [[i in c for i in shown[r].items] for r, c in zip(ids, clicks, strict=True)],
        )

    cut = round(len(train) * 0.8)
    first, valid = lists_of(train[:cut]), lists_of(train[cut:])
    if not any(0 < sum(y) < len(y) for y in valid[1]):  # too small a log to choose on
        return LambdaMART().fit(*lists_of(train), feature_names=FEATURE_NAMES)
    candidates = [
        LambdaMART(n_estimators=MAX_TREES, num_leaves=leaves).fit(
            *first, feature_names=FEATURE_NAMES, valid=valid
        )
        for leaves in LEAVES
    ]
    best = max(candidates, key=lambda m: m.best_score or 0.0)  # ties: the smallest trees
    return LambdaMART(n_estimators=best.best_iteration, num_leaves=best.params["num_leaves"]).fit(
        *lists_of(train), feature_names=FEATURE_NAMES
    )


def evaluate(
    model: LambdaMART, judge: Judge, shown: dict[str, Shown], request_ids: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """LambdaMART's metrics on requests with a click, ranking each by its scores; and, per
    request, nDCG@10 and reciprocal rank of LambdaMART and of streamrank (for paired
    differences)."""
    metrics = RankingMetrics()
    per_request = {}
    for request_id in request_ids:
        clicks = judge.clicks(request_id)
        if not clicks or request_id not in shown:
            continue
        request = shown[request_id]
        scores = model.score(request.features)
        order = np.argsort(-scores, kind="stable")  # ties keep the input order
        labels = [request.items[i] in clicks for i in order]
        metrics.add(labels, scores[order].tolist())
        online = [i in clicks for i in request.ranked]
        per_request[request_id] = {
            "ndcg@10": ndcg_at(labels, 10) - ndcg_at(online, 10),
            "mrr": reciprocal_rank(labels) - reciprocal_rank(online),
        }
    return metrics.summary(), per_request


def paired(differences: list[float]) -> dict[str, float]:
    """Mean of paired per-request differences and twice its standard error."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return {"mean": float(values.mean()) if len(values) else 0.0, "two_se": float("nan")}
    two_se = 2.0 * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": float(values.mean()), "two_se": float(two_se)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="holds mind-small-subset")
    parser.add_argument("--log", type=Path, help="a native event log instead of the MIND subset")
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--profile", type=Path, help="streamrank's profile (as tune writes it)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    if args.log:
        events, source = list(read_events(args.log)), args.log.name
    else:
        events, source = list(import_mind(args.data / "mind-small-subset")), "MIND subset"
    profile = RankingProfile.from_file(args.profile) if args.profile else RankingProfile()
    split = split_requests(events, args.holdout)

    started = time.perf_counter()
    judge, shown = capture(events, profile)
    replay_s = time.perf_counter() - started

    train = [r for r in split.tuning if r in shown]
    started = time.perf_counter()
    model = fit(judge, shown, train)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    lambdamart, differences = evaluate(model, judge, shown, split.held_out)
    judged = len(differences)
    score_s = time.perf_counter() - started

    held_out = judge.report(replay_s, only=set(split.held_out))
    if judged != held_out["requests_with_clicks"]:
        raise RuntimeError(
            f"LambdaMART judged {judged} requests, streamrank {held_out['requests_with_clicks']}"
        )
    rows = {
        "streamrank (online, learns through the held-out part)": held_out["metrics"],
        "LambdaMART (LightGBM, trained on the first part, frozen)": lambdamart,
        "baseline: popularity (online)": held_out["baselines"]["popularity"],
        "baseline: click count (online)": held_out["baselines"]["click_count"],
        "baseline: input order": held_out["baselines"]["input_order"],
    }
    result = {
        "data": source,
        "profile": profile.to_dict(),
        "split": split.to_dict(),
        "features": len(FEATURE_NAMES),
        "train_requests_with_clicks": sum(1 for r in train if judge.clicks(r)),
        "held_out_requests_with_clicks": judged,
        "rows": rows,
        "lambdamart_minus_streamrank": {
            m: paired([d[m] for d in differences.values()]) for m in ("ndcg@10", "mrr")
        },
        "replay_s": round(replay_s, 1),
        "lambdamart_trees": model.best_iteration,
        "lambdamart_leaves": model.params["num_leaves"],
        "lambdamart_train_s": round(train_s, 2),
        "lambdamart_score_us_per_request": round(score_s / max(judged, 1) * 1e6, 1),
        "machine": machine(),
    }

    print(
        f"\n{source}: LambdaMART trained on {len(split.tuning)} requests "
        f"({result['train_requests_with_clicks']} with clicks; {model.best_iteration} trees of "
        f"{model.params['num_leaves']} leaves, chosen on their last fifth) in {train_s:.1f} s; "
        f"judged on the {judged} held-out requests with clicks "
        f"(last {args.holdout:.0%} in time)\n{machine_lines(result['machine'])}\n"
    )
    print("| ranker | nDCG@10 | MRR | HR@10 | AUC |")
    print("|---|---|---|---|---|")
    for name, metrics in rows.items():
        cells = " | ".join(f"{metrics[m]:.4f}" if m in metrics else "-" for m in METRICS)
        print(f"| {name} | {cells} |")
    gaps = result["lambdamart_minus_streamrank"]
    print(
        f"\nLambdaMART minus streamrank, paired over the {judged} requests (± 2 standard "
        "errors): "
        + ", ".join(f"{m} {g['mean']:+.4f} ± {g['two_se']:.4f}" for m, g in gaps.items())
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return result


if __name__ == "__main__":
    main()
