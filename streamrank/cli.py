"""The ``streamrank`` command: everything but the worker (``faust -A streams.app worker``)."""

from __future__ import annotations

import argparse
import sys
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
    from streamrank.replay import ReplayOptions, replay

    def progress(n: int) -> None:
        print(f"\r{n:,} events", end="", file=sys.stderr, flush=True)

    from models.profile import RankingProfile

    profile = RankingProfile.from_file(args.profile) if args.profile else RankingProfile()
    report = replay(read_events(args.file), ReplayOptions(profile), progress=progress)
    print(file=sys.stderr)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.report:
        args.report.write_bytes(text + b"\n")
    print(text.decode())
    return 0


def command_up(args: argparse.Namespace) -> int:
    from streamrank.up import run_up

    return run_up(args)


def command_simulate(args: argparse.Namespace) -> int:
    from streamrank.up import run_simulate

    return run_simulate(args)


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
    replayer.add_argument(
        "--profile", type=Path, help="a ranking profile (JSON, as `streamrank tune` writes)"
    )
    replayer.set_defaults(run=command_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
