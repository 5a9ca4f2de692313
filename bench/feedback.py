"""In-process cost of the interaction path (clicks, add-to-carts, purchases) on Redis.

    python bench/feedback.py [--batches 40] [--batch 500] [--json PATH] [--profile]

What is timed, per batch of ``--batch`` interactions, as the worker's ``apply_feedback``
and ``learn`` agents do it (no Kafka; the same functions, in the same order):

- prepare: ``Feedback.prepare_many`` with the experiments' counts
  (``ExperimentCounter.interaction_writes``, default experiment config): one pipelined
  Redis read for items, users' recent lists, impressions and labels, then the writes and
  labelled examples;
- send: encoding the learner's message of the batch (``examples_message``);
- commit: ``Feedback.commit_many``, one Lua script call that claims each event once;
- learn: decoding that message (``read_examples_message``) and
  ``OnlineLearner.learn_many`` (claims, River FTRL updates).

Figures: interactions per second (median over batches of the wall time of all four
steps), this process's CPU ms per interaction per step (``time.process_time``), and the
Redis server's CPU per interaction (its /proc CPU time over the timed batches) with its
own time in the commit script (INFO commandstats).

State first: a catalog of ``--items`` items and ``--history`` past requests ranked,
remembered and engaged with (``bench/_common.build_history``). Then the requests the
timed clicks come from are ranked, remembered and counted in the experiments (as the
worker's ``remember_and_count``), untimed. Interactions: 80% clicks on those results,
carrying request id and position (position-biased), 15% add-to-carts of clicked items
(half with the request id), 5% purchases of carted items without value (the experiments
read the catalog price); every event id is new. The first ``--warmup`` batches are run
but not counted. Nothing here asserts a timing: the figures are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    MachineLoad,
    build_history,
    load_line,
    machine,
    machine_lines,
    make_shop,
    markdown_table,
    parse,
    process_cpu_seconds,
    request_body,
    run_bench,
    write_catalog,
)
from engine.experiment_config import default_config  # noqa: E402
from engine.experiment_metrics import ExperimentCounter, ServedRequest  # noqa: E402
from engine.experiments import assign  # noqa: E402
from engine.feedback import Feedback  # noqa: E402
from engine.impressions import examples_message, read_examples_message  # noqa: E402
from engine.messages import Interaction  # noqa: E402
from engine.ranking import Ranker  # noqa: E402
from engine.redis_store import RedisStore  # noqa: E402
from models.online_ctr import LinearCTR  # noqa: E402
from models.online_learner import OnlineLearner  # noqa: E402
from streamrank.localstack import RedisServer  # noqa: E402

TARGET_PER_S = 3000.0
CLICKS_PER_REQUEST = 3
STEPS = ("prepare", "send", "commit", "learn")


class Worker:
    """The worker's objects, wired as streams/app.py wires them (default settings)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.ranker = Ranker(store, LinearCTR.prior())
        self.feedback = Feedback(store)
        self.config = default_config("streamrank")
        self.counter = ExperimentCounter(store, self.config)
        # Never published during the run: publishing is on a timer, not per batch.
        self.learner = OnlineLearner(store, publish_every_s=1e9, warmup_examples=500)

    def serve(self, bodies: list[dict], now: float) -> list[tuple[str, str, list[str]]]:
        """Rank, remember and count requests, as the serving path does (untimed); returns
        each result's request id, user and items as remembered (top 20)."""
        rankings, served = [], []
        for body in bodies:
            ranking = self.ranker.rank(parse(body))
            rankings.append(ranking)
            result = ranking.result
            served.append(
                ServedRequest(
                    request_id=result.request_id,
                    user_id=result.user_id,
                    variants=assign(self.config, result.user_id, now).labels(),
                    items=tuple(item.item_id for item in result.items[:20]),
                    latency_ms=result.latency_ms,
                )
            )
        self.ranker.remember_many(rankings)
        self.store.apply_many(self.counter.request_batches(served, now))
        return [(s.request_id, s.user_id, list(s.items)) for s in served]

    def apply(self, batch: list[Interaction], now: float) -> dict[str, tuple[float, float]]:
        """One batch through the feedback and learner agents: (wall, cpu) seconds per step."""
        spent: dict[str, tuple[float, float]] = {}
        w0, c0 = time.perf_counter(), time.process_time()
        plans = self.feedback.prepare_many(batch, self.counter, now)
        w1, c1 = time.perf_counter(), time.process_time()
        message = examples_message([(p.event_id, p.examples) for p in plans if p.examples])
        w2, c2 = time.perf_counter(), time.process_time()
        committed = self.feedback.commit_many(plans)
        w3, c3 = time.perf_counter(), time.process_time()
        self.learner.learn_many(read_examples_message(message))
        w4, c4 = time.perf_counter(), time.process_time()
        assert all(committed), "every event id is new"
        for step, (wa, wb, ca, cb) in zip(
            STEPS,
            ((w0, w1, c0, c1), (w1, w2, c1, c2), (w2, w3, c2, c3), (w3, w4, c3, c4)),
            strict=True,
        ):
            spent[step] = (wb - wa, cb - ca)
        return spent


def interactions_for(
    shop, rng: random.Random, results: list[tuple[str, str, list[str]]], size: int, first: int
) -> list[Interaction]:
    """``size`` interactions: clicks on ``results`` (request id, user, shown items), carts of
    clicked items, purchases of carted ones; event ids from ``first`` on."""
    events: list[Interaction] = []
    clicked: list[tuple[str, str, str]] = []  # (request id, user, item)
    carted: list[tuple[str, str]] = []
    ts = time.time()
    for n in range(size):
        ts += 0.002
        event_id = f"be-{first + n}"
        draw = rng.random()
        if draw < 0.80 or not clicked:
            request_id, user_id, shown = results[min(n // CLICKS_PER_REQUEST, len(results) - 1)]
            position = min(len(shown), 1 + int(rng.expovariate(0.3)))
            item_id = shown[position - 1]
            events.append(
                Interaction(event_id, user_id, item_id, "click", ts, request_id, position)
            )
            clicked.append((request_id, user_id, item_id))
        elif draw < 0.95 or not carted:
            request_id, user_id, item_id = rng.choice(clicked)
            rid = request_id if rng.random() < 0.5 else None
            events.append(Interaction(event_id, user_id, item_id, "add_to_cart", ts, rid))
            carted.append((user_id, item_id))
        else:
            user_id, item_id = rng.choice(carted)
            events.append(Interaction(event_id, user_id, item_id, "purchase", ts))
    return events


def measure(args: argparse.Namespace) -> dict:
    info = machine()
    shop = make_shop(n_items=args.items, n_users=args.users, seed=args.seed)
    results: dict = {"machine": info, "config": vars(args).copy()}
    with RedisServer() as server:
        store = RedisStore(server.url, key_prefix="bench:", timeout_s=2.0)
        client = store.client
        started = time.perf_counter()
        write_catalog(shop, store)
        history = build_history(shop, store, args.history, seed=args.seed + 1)
        print(
            f"state: {len(shop.items)} items, {history.requests} history requests, "
            f"{history.clicks + history.carts + history.purchases} interactions, "
            f"{client.dbsize()} keys ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        worker = Worker(store)
        rng = random.Random(args.seed + 2)
        total = args.warmup + args.batches
        per_batch = args.batch * 0.8 / CLICKS_PER_REQUEST
        batches: list[list[Interaction]] = []
        now = time.time()
        for b in range(total + (1 if args.profile else 0)):
            bodies = [
                request_body(shop, rng, rng.randint(20, 60), f"br-{b}-{n}")
                for n in range(int(per_batch) + 1)
            ]
            shown = worker.serve(bodies, now)
            batches.append(interactions_for(shop, rng, shown, args.batch, b * args.batch))
        print(f"{len(batches)} batches of {args.batch} interactions prepared", flush=True)

        gc.collect()
        gc.freeze()
        timings: dict[str, list[float]] = {f"{s}_{k}": [] for s in STEPS for k in ("wall", "cpu")}
        batch_wall: list[float] = []
        examples = 0
        for b, batch in enumerate(batches[:total]):
            if b == args.warmup:
                client.config_resetstat()
                load = MachineLoad({"redis": server.pid})
                redis_cpu0 = process_cpu_seconds(server.pid)
                learned0 = worker.learner.model.examples_seen
            spent = worker.apply(batch, now)
            if b >= args.warmup:
                for step, (wall, cpu) in spent.items():
                    timings[f"{step}_wall"].append(wall)
                    timings[f"{step}_cpu"].append(cpu)
                batch_wall.append(sum(wall for wall, _ in spent.values()))
        counted = args.batches * args.batch
        redis_cpu = process_cpu_seconds(server.pid) - redis_cpu0
        examples = worker.learner.model.examples_seen - learned0
        stats = client.info("commandstats")
        results["load"] = load.stop()
        per_s = [args.batch / w for w in batch_wall]
        results["throughput"] = {
            "interactions_per_s_median": statistics.median(per_s),
            "interactions_per_s_overall": counted / sum(batch_wall),
            "examples_per_interaction": examples / counted,
        }
        results["cpu_ms_per_interaction"] = {
            step: 1000.0 * sum(timings[f"{step}_cpu"]) / counted for step in STEPS
        }
        results["cpu_ms_per_interaction"]["total"] = sum(results["cpu_ms_per_interaction"].values())
        results["wall_ms_per_interaction"] = {
            step: 1000.0 * sum(timings[f"{step}_wall"]) / counted for step in STEPS
        }
        results["redis"] = {
            "server_cpu_ms_per_interaction": 1000.0 * redis_cpu / counted,
            "commit_script_us_per_interaction": sum(
                float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("evalsha", "eval")
            )
            / counted,
            # What the scripts spend their time on (commands run inside a script count).
            "commands_us_per_interaction": {
                name.removeprefix("cmdstat_"): float(entry.get("usec", 0)) / counted
                for name, entry in sorted(
                    stats.items(), key=lambda kv: -float(kv[1].get("usec", 0))
                )
                if name not in ("cmdstat_evalsha", "cmdstat_eval")
            },
        }
        if args.profile:
            results["profile"] = profile(worker, batches[total:], now, args.profile_top)
        client.close()
    return results


def profile(worker: Worker, batches: list[list[Interaction]], now: float, top: int) -> str:
    """cProfile of one more batch (cProfile inflates pure-Python calls: read the order)."""
    profiler = cProfile.Profile()
    for batch in batches:
        profiler.enable()
        worker.apply(batch, now)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    out = "\n".join(line for line in lines[start:] if line.strip())
    print(f"\n--- cProfile: one batch of {len(batches[0])} interactions, by own time ---")
    print(out)
    return out


def report(results: dict) -> None:
    cfg, cpu, wall = (
        results["config"],
        results["cpu_ms_per_interaction"],
        results["wall_ms_per_interaction"],
    )
    print("\n## Interaction path per interaction (bench/feedback.py)\n")
    print(machine_lines(results["machine"]))
    print(load_line(results["load"]))
    print(
        f"{cfg['batches']} timed batches of {cfg['batch']} after {cfg['warmup']} warm-up; "
        f"catalog {cfg['items']} items, {cfg['history']} history requests, RedisStore\n"
    )
    rows = [[step, cpu[step], wall[step]] for step in STEPS]
    rows.append(["total", cpu["total"], sum(wall.values())])
    print(markdown_table(["step", "worker CPU ms / interaction", "wall ms / interaction"], rows))
    redis, tp = results["redis"], results["throughput"]
    print(
        f"\nRedis server CPU: {redis['server_cpu_ms_per_interaction']:.4f} ms / interaction "
        f"(commit script {redis['commit_script_us_per_interaction']:.1f} us of it)"
    )
    top = list(redis["commands_us_per_interaction"].items())[:8]
    print(
        "Redis commands inside the scripts, us / interaction: "
        + ", ".join(f"{name} {us:.1f}" for name, us in top)
    )
    print(f"examples learned per interaction: {tp['examples_per_interaction']:.2f}")
    rate = tp["interactions_per_s_median"]
    print(
        f"throughput: {rate:.0f} interactions/s median over batches "
        f"({tp['interactions_per_s_overall']:.0f}/s overall); target {TARGET_PER_S:.0f}/s in "
        f"the worker -> {'MET' if rate >= TARGET_PER_S else 'NOT MET'} in process"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches")
    parser.add_argument("--batch", type=int, default=500, help="interactions per batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--items", type=int, default=5000, help="catalog size")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--history", type=int, default=2000, help="past requests engaged with")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="10 batches, 500 history requests")
    parser.add_argument("--profile", action="store_true", help="cProfile one more batch")
    parser.add_argument("--profile-top", type=int, default=20, help="functions printed")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.history = 10, 500
    run_bench(measure, report, args)


if __name__ == "__main__":
    main()
