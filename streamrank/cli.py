"""The ``streamrank`` command: everything but the worker (``faust -A streams.app worker``)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from streamrank.importers import IMPORTERS


def default_data_dir() -> Path:
    """``../shared/data`` beside the checkout, where the public logs live on a dev machine."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def read_events(path: Path) -> Iterator[dict]:
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                yield orjson.loads(line)


def command_import(args: argparse.Namespace) -> int:
    count = 0
    with args.output.open("wb") as out:
        for event in IMPORTERS[args.format](args.source):
            out.write(orjson.dumps(event) + b"\n")
            count += 1
    print(f"wrote {count} events to {args.output}", file=sys.stderr)
    return 0


def command_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.profile import RankingProfile
    from streamrank.replay import ReplayOptions, replay

    options = ReplayOptions(
        RankingProfile.from_file(args.profile) if args.profile else RankingProfile(),
        close_depth=args.close_depth,
        similarity=not args.no_similarity,
    )
    if args.via_kafka and args.no_similarity:
        print("--no-similarity: only for the in-process replay", file=sys.stderr)
        return 2
    with args.file.open("rb") as lines:
        total = sum(1 for line in lines if line.strip())
    with tqdm(total=total, unit=" events", unit_scale=True, file=sys.stderr) as bar:

        def progress(n: int) -> None:
            bar.update(n - bar.n)

        if args.via_kafka:
            report = _replay_via_kafka(args, options, progress)
        else:
            report = replay(read_events(args.file), options, progress=progress)
        bar.update(total - bar.n)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.report:
        args.report.write_bytes(text + b"\n")
    print(text.decode())
    return 0


def _replay_via_kafka(args: argparse.Namespace, options, progress) -> dict:
    import asyncio

    from streamrank.replay_kafka import replay_on_local_stack, replay_via_kafka

    if args.broker is None:
        return replay_on_local_stack(read_events(args.file), options, progress)
    from streams.settings import Settings

    return asyncio.run(
        replay_via_kafka(
            read_events(args.file),
            args.broker,
            args.topic_prefix,
            progress,
            client_options=Settings.from_env().kafka_auth(),
        )
    )


def command_tune(args: argparse.Namespace) -> int:
    import optuna

    from streamrank.tuning import format_table, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial comes from tune

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = tune(
        read_events(args.file),
        trials=args.trials,
        holdout=args.holdout,
        seed=args.seed,
        objective=args.objective,
        prune=not args.no_prune,
        log=log,
    )
    text = orjson.dumps(result.to_dict(data=args.file.name), option=orjson.OPT_INDENT_2)
    args.output.write_bytes(text + b"\n")
    print(format_table(result), file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    print(text.decode())
    return 0


def command_up(args: argparse.Namespace) -> int:
    from streamrank.up import run_up

    return run_up(args)


def command_simulate(args: argparse.Namespace) -> int:
    from streamrank.up import run_simulate

    return run_simulate(args)


def command_ope(args: argparse.Namespace) -> int:
    from streamrank.obd_eval import OPEOptions, evaluate_obd, format_table

    folder = args.folder or default_data_dir() / "obd-zozotown"
    if not folder.exists():
        print(f"no OBD folder at {folder}", file=sys.stderr)
        return 2

    def progress(n: int) -> None:
        print(f"\r{n:,} events", end="", file=sys.stderr, flush=True)

    options = OPEOptions(temperatures=tuple(args.temperature or OPEOptions().temperatures))
    if min(options.temperatures, default=1.0) <= 0:
        print("--temperature must be positive", file=sys.stderr)
        return 2
    report = evaluate_obd(folder, options, progress=progress)
    print(file=sys.stderr)
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(format_table(report))
    return 0


def command_model(args: argparse.Namespace) -> int:
    """``streamrank model list|promote VERSION|rollback`` on the deep model registry in Redis."""
    from engine.redis_store import RedisStore
    from models.registry import ModelRegistry
    from streams.settings import Settings

    settings = Settings.from_env()
    # Models are megabytes: a longer timeout than the ranking hot path's.
    store = RedisStore(settings.redis_url, key_prefix=settings.topic_prefix, timeout_s=5.0)
    registry = ModelRegistry(store)
    try:
        if args.action == "promote":
            print(f"serving version {registry.promote(args.version)}")
        elif args.action == "rollback":
            print(f"serving version {registry.rollback()}")
        else:
            versions = registry.list()
            if args.json:
                print(orjson.dumps(versions, option=orjson.OPT_INDENT_2).decode())
                return 0
            print("| version | serving | created (UTC) | auc | logloss | examples | size |")
            print("|---|---|---|---|---|---|---|")
            for v in versions:
                m = v["metrics"]
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created"]))
                print(
                    f"| {v['version']} | {'*' if v['serving'] else ''} | {created} "
                    f"| {m.get('auc', float('nan')):.4f} | {m.get('logloss', float('nan')):.4f} "
                    f"| {m.get('n_train', 0) + m.get('n_valid', 0)} | {v['size']:,} |"
                )
    except LookupError as error:
        print(f"streamrank model: {error.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.client.close()
    return 0


def command_experiment(args: argparse.Namespace) -> int:
    """``streamrank experiment report [--json]``."""
    from streamrank.experiment_report import command_experiment as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole stack locally with simulated shoppers")
    from streamrank.up import add_arguments, add_simulate_arguments

    add_arguments(up)
    up.set_defaults(run=command_up)

    simulate = commands.add_parser(
        "simulate",
        help="simulated shoppers against a running broker and workers (load test)",
        description="The simulated search layer and shoppers of `streamrank up`, against an "
        "existing broker and workers: the catalog, then search requests at --rate per second "
        "and the shoppers' clicks, add-to-carts and purchases; the live view, then a summary. "
        "Kafka SASL/TLS settings come from the worker's STREAMRANK_KAFKA_* variables. Redis "
        "is not used, so the first requests may be ranked before the workers stored the "
        "catalog (see --catalog-wait).",
    )
    add_simulate_arguments(simulate)
    simulate.set_defaults(run=command_simulate)

    importer = commands.add_parser("import", help="convert a public log to the native event log")
    importer.add_argument("format", choices=sorted(IMPORTERS))
    importer.add_argument("source", type=Path, help="the log's folder or file")
    importer.add_argument("-o", "--output", type=Path, required=True)
    importer.set_defaults(run=command_import)

    replayer = commands.add_parser("replay", help="replay a native event log through the engine")
    replayer.add_argument("file", type=Path)
    replayer.add_argument("--report", type=Path, help="write the JSON report here too")
    from streamrank.replay import ReplayOptions

    replayer.add_argument(
        "--close-depth",
        type=int,
        default=ReplayOptions.close_depth,
        help="logged positions labelled negative when a request's window closes without "
        "their click (default: all; 20 keeps 100-candidate session logs fast)",
    )
    replayer.add_argument(
        "--via-kafka",
        action="store_true",
        help="send the log through a broker and worker instead of replaying in process: a "
        "local stack started for the run, or the running one named by --broker",
    )
    replayer.add_argument(
        "--broker", help="HOST:PORT of a running broker (its workers set up like the replay)"
    )
    replayer.add_argument("--topic-prefix", default="", help="the running workers' prefix")
    replayer.add_argument(
        "--no-similarity",
        action="store_true",
        help="turn the co-engagement features (session_similarity, history_similarity) off: "
        "the without-signals side of a with/without comparison",
    )
    replayer.add_argument(
        "--profile", type=Path, help="a ranking profile (JSON, as `streamrank tune` writes)"
    )
    replayer.set_defaults(run=command_replay)

    tuner = commands.add_parser(
        "tune",
        help="tune the ranking profile on a native event log (Optuna, progressive validation)",
        description="Search the online model's knobs and the blend weight: each trial replays "
        "the first part of the log test-then-train and is judged on it; the best profile and "
        "the default are then replayed on the whole log and reported on the held-out part "
        "(the last requests in time). Writes the profile file that workers "
        "(STREAMRANK_PROFILE) and `streamrank replay --profile` load.",
    )
    tuner.add_argument("file", type=Path)
    tuner.add_argument("--trials", type=int, default=30)
    tuner.add_argument(
        "--holdout", type=float, default=0.3, help="share of the requests held out, the last"
    )
    tuner.add_argument("--objective", choices=("auc", "ndcg@10"), default="auc")
    tuner.add_argument("--seed", type=int, default=0)
    tuner.add_argument(
        "--no-prune", action="store_true", help="run every trial to the end (no median pruning)"
    )
    tuner.add_argument("-o", "--output", type=Path, default=Path("profile.json"))
    tuner.set_defaults(run=command_tune)

    ope = commands.add_parser(
        "ope",
        help="off-policy evaluation of the ranking on the Open Bandit Dataset",
        description="Replay the uniform-random log of an Open Bandit Dataset folder through the "
        "engine, test-then-train, and estimate the CTR per slot that streamrank's ranking "
        "(greedy, and Plackett-Luce at each --temperature) would have had: IPS, SNIPS and DR "
        "with 95% intervals, next to the logged policies' own CTRs.",
    )
    ope.add_argument(
        "folder",
        type=Path,
        nargs="?",
        help="the OBD folder holding random/ (and bts/), or one policy folder "
        "(default: ../shared/data/obd-zozotown beside the checkout)",
    )
    ope.add_argument("--json", type=Path, help="write the JSON report here too")
    ope.add_argument(
        "--temperature",
        type=float,
        action="append",
        help="Plackett-Luce temperature (repeat for several; default 1 and 0.25)",
    )
    ope.set_defaults(run=command_ope)

    model = commands.add_parser(
        "model",
        help="list, promote or roll back versions of the deep CTR model",
        description="The deep CTR model registry in Redis (STREAMRANK_REDIS_URL, keys under "
        "STREAMRANK_TOPIC_PREFIX).",
    )
    actions = model.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="retained versions with their held-out metrics")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    promote = actions.add_parser("promote", help="serve a retained version")
    promote.add_argument("version", type=int)
    actions.add_parser("rollback", help="serve the previous serving version again")
    model.set_defaults(run=command_model)

    experiment = commands.add_parser(
        "experiment",
        help="experiment reports",
        description="The live experiments, read from Redis (STREAMRANK_REDIS_URL, keys under "
        "STREAMRANK_TOPIC_PREFIX).",
    )
    experiment_actions = experiment.add_subparsers(dest="action", required=True)
    report = experiment_actions.add_parser(
        "report", help="per-variant metrics, lift, sequential verdict, sample-ratio check"
    )
    report.add_argument("--json", action="store_true", help="the report as JSON")
    report.add_argument(
        "--history", type=float, default=3600.0, help="seconds of time series (default 3600)"
    )
    experiment.set_defaults(run=command_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
