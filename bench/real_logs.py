"""streamrank on real public logs: the results tables of the README, reproduced.

    python bench/real_logs.py [--data ../shared/data] [--only mind,yoochoose,diginetica,obd]
                              [--json PATH] [--no-without]

For each log: import it (``streamrank.importers``), replay it in process through
the engine test-then-train (``streamrank.replay``), and print streamrank's
metrics beside the baselines computed in the same pass, with the replay speed.
Each log is replayed twice: with the co-engagement features (``session_similarity``,
``history_similarity``, ``engine.item_similarity``) and without them
(``ReplayOptions(similarity=False)``, as ``streamrank replay --no-similarity``); the
baselines (popularity, item-kNN, ...) come from the first pass and are the same in both.
Session logs (YOOCHOOSE, DIGINETICA) have 100 synthetic candidates per click;
there the twenty first of the shuffled candidates become negatives when a window
closes (``close_depth``), instead of all 99. On the Open Bandit sample, the
off-policy estimates of ``streamrank ope``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import machine, machine_lines, markdown_table  # noqa: E402
from streamrank.importers import IMPORTERS  # noqa: E402
from streamrank.replay import ReplayOptions, replay  # noqa: E402

LOGS = {
    # name: (folder under --data, replay options)
    "mind": ("mind-small-subset", ReplayOptions()),
    "yoochoose": ("yoochoose-100k", ReplayOptions(close_depth=20)),
    "diginetica": ("diginetica-views-sample", ReplayOptions(close_depth=20)),
}
METRICS = ("hr@10", "mrr", "ndcg@10", "auc")


def default_data() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def replay_log(name: str, data: Path, without: bool = True) -> dict[str, Any]:
    folder, options = LOGS[name]
    started = time.perf_counter()
    events = list(IMPORTERS[name](data / folder))
    imported_s = time.perf_counter() - started
    report = replay(events, options)
    result = {
        "log": name,
        "events": len(events),
        "import_s": round(imported_s, 2),
        "events_per_s": round(len(events) / report["elapsed_s"]),
        "close_depth": options.close_depth,
        "report": report,
    }
    if without:
        print(f"replaying {name} without similarity ...", file=sys.stderr, flush=True)
        off = replay(events, dataclasses.replace(options, similarity=False))
        result["without_similarity"] = off
        result["events_per_s_without_similarity"] = round(len(events) / off["elapsed_s"])
    return result


HEADERS = ["log", "ranking", *METRICS, "requests with clicks", "replay events/s"]


def replay_rows(result: dict[str, Any]) -> list[list[Any]]:
    report = result["report"]
    rankings = {"streamrank": report["metrics"]}
    speeds = {"streamrank": result["events_per_s"]}
    if "without_similarity" in result:
        rankings["streamrank without similarity"] = result["without_similarity"]["metrics"]
        speeds["streamrank without similarity"] = result["events_per_s_without_similarity"]
    rankings |= report["baselines"]
    return [
        [
            result["log"],
            name,
            *(summary.get(m, "") for m in METRICS),
            report["requests_with_clicks"],
            f"{speeds[name]:,}" if name in speeds else "",
        ]
        for name, summary in rankings.items()
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--only", default="mind,yoochoose,diginetica,obd")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-without",
        action="store_true",
        help="skip the second replay without the co-engagement features",
    )
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]

    results: dict[str, Any] = {"machine": machine(), "logs": [], "data": str(args.data)}
    print(machine_lines(results["machine"]))
    rows = []
    for name in wanted:
        if name not in LOGS:
            continue
        print(f"replaying {name} ...", file=sys.stderr, flush=True)
        result = replay_log(name, args.data, without=not args.no_without)
        results["logs"].append(result)
        rows += replay_rows(result)
    if rows:
        print("\nReplay, test-then-train, in process (metrics averaged over requests with a click)")
        print(markdown_table(HEADERS, rows))

    if "obd" in wanted:
        from streamrank.obd_eval import evaluate_obd, format_table

        print("off-policy evaluation on obd ...", file=sys.stderr, flush=True)
        results["obd"] = evaluate_obd(args.data / "obd-zozotown")
        print("\nOff-policy evaluation on the Open Bandit sample (random policy's log)")
        print(format_table(results["obd"]))
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return results


if __name__ == "__main__":
    main()
