"""Through the broker and a worker: end-to-end ranking latency and interactions per second.

    python bench/streaming.py [--rate 100] [--requests 1500] [--interactions 20000]
                              [--sizes 25,100,300] [--json PATH] [--py-spy] [--quick]

One run starts its own local stack: a tansu broker, a Redis server and one
``faust -A streams.app worker`` (``streamrank.localstack``; unique topic prefix and app id),
and stops all three at the end whatever happens. Then:

1. seeds a catalog through the ``catalog`` topic (waits until Redis holds every item), and
   engagement history in-process with the engine against the worker's Redis and key prefix
   (ranked requests, clicks, carts, purchases), so features are not empty;
2. the baseline: the raw broker single hop (``bench/broker_hop.py``'s ``measure_raw_hop``),
   produce -> consume with no app in between, at the same steady rate;
3. end to end, per candidate count: requests produced on a fixed schedule (open loop: the
   sender never waits for answers) with ``SearchLayerClient.send_request``; the latency is
   from just before the produce to the moment the client's reader resolves the request's
   future (matched by ``request_id``). The first ``--warmup`` requests are not counted;
4. interactions per second: a few hundred requests ranked through the worker over a fixed
   pool of items, then ``--interactions`` events (80% clicks carrying those results'
   request_id and position, 15% add-to-carts, 5% purchases; unique event ids) produced as
   fast as the producer goes; completion is detected by summing the pool's ``clk``, ``cart``
   and ``buy`` counters in Redis (one pipeline of HMGETs every 100 ms).

Latency is judged as a ratio to the raw hop measured in the same run (DESIGN.md, "The local
broker"); nothing asserts a timing. ``--py-spy`` samples the worker during the throughput
phase and prints where its CPU goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    MachineLoad,
    build_history,
    load_line,
    machine,
    machine_lines,
    make_shop,
    markdown_table,
    ratio,
    request_body,
    summarize,
    write_json,
)
from bench.broker_hop import measure_raw_hop  # noqa: E402
from engine.redis_store import RedisStore  # noqa: E402
from models.deep_ctr import DeepConfig, DeepCTR  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from streamrank.client import SearchLayerClient  # noqa: E402
from streamrank.localstack import Broker, RedisServer, Worker, free_port, worker_env  # noqa: E402

LATENCY_TARGET_SIZE = 100
LATENCY_TARGET_RATIO = 4.0
THROUGHPUT_TARGET = 3000.0


class WorkerDied(RuntimeError):
    """The worker process exited mid-run (its log tail is printed)."""


# --- seeding -------------------------------------------------------------------------------


async def seed_catalog(
    client: SearchLayerClient, r: aioredis.Redis, shop, prefix: str, timeout: float
) -> float:
    started = time.perf_counter()
    for item_id in shop.items:
        await client.catalog(shop.catalog_message(item_id))
    await client.flush()
    keys = [f"{prefix}i:{item_id}" for item_id in shop.items]
    deadline = time.monotonic() + timeout
    while True:
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.hexists(key, "cat")
        stored = sum(await pipe.execute())
        if stored == len(keys):
            return time.perf_counter() - started
        if time.monotonic() > deadline:
            raise RuntimeError(f"catalog: only {stored} of {len(keys)} items stored")
        await asyncio.sleep(0.2)


# --- end-to-end latency ----------------------------------------------------------------------


async def open_loop(
    client: SearchLayerClient,
    bodies: list[dict],
    rate: float,
    warmup: int,
    timeout: float = 60.0,
    max_backlog_s: float = 0.0,
    alive=lambda: True,
) -> dict:
    """Send ``bodies`` at ``rate`` per second without waiting; time each answer.

    With ``max_backlog_s``, sending stops early once the oldest unanswered request is that
    old: the worker cannot keep up, the latency only measures the growing backlog from
    then on, and the phase would overrun its time (and spill into the next one).
    """
    latencies: dict[int, float] = {}
    sent_at: dict[int, float] = {}
    results: dict[int, dict] = {}
    lateness: list[float] = []
    futures: list[asyncio.Future] = []

    def answered(index: int, sent: float, future: asyncio.Future) -> None:
        now = time.perf_counter()
        if not future.cancelled() and future.exception() is None:
            latencies[index] = (now - sent) * 1000.0
            results[index] = future.result()

    oldest = 0  # index of the oldest request not yet answered
    stopped_at: int | None = None
    start = time.perf_counter()
    for index, body in enumerate(bodies):
        if index % 50 == 0 and not alive():
            raise WorkerDied("the worker exited while requests were being sent")
        while oldest < len(futures) and futures[oldest].done():
            oldest += 1
        if (
            max_backlog_s
            and oldest < len(futures)
            and time.perf_counter() - sent_at[oldest] > max_backlog_s
        ):
            stopped_at = index
            break
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter()
        sent_at[index] = sent
        lateness.append((sent - due) * 1000.0)
        future = await client.send_request(body)
        future.add_done_callback(functools.partial(answered, index, sent))
        futures.append(future)
    send_seconds = time.perf_counter() - start
    sent_count = len(futures)
    await client.flush()
    deadline = time.monotonic() + timeout
    while any(not f.done() for f in futures) and time.monotonic() < deadline:
        if not alive():
            raise WorkerDied("the worker exited with requests unanswered")
        await asyncio.wait([f for f in futures if not f.done()], timeout=1.0)
    await asyncio.sleep(0)  # let the done callbacks of the last futures run
    for body, future in zip(bodies, futures, strict=False):
        if not future.done():
            future.cancel()
            client._pending.pop(body["request_id"], None)

    answer_times = sorted(sent_at[i] + latencies[i] / 1000.0 for i in latencies)
    answered_rate = (
        (len(answer_times) - 1) / (answer_times[-1] - answer_times[0])
        if len(answer_times) > 1 and answer_times[-1] > answer_times[0]
        else float("nan")
    )
    counted = list(range(warmup, sent_count))
    measured = [latencies[i] for i in counted if i in latencies]
    worker_ms = [results[i]["latency_ms"] for i in counted if i in results]
    problems = collections.Counter()
    for i in counted:
        result = results.get(i)
        if result is None:
            problems["missing"] += 1
            continue
        ids = [item["item_id"] for item in result["items"]]
        expected = {c["item_id"] for c in bodies[i]["candidates"]}
        if len(ids) != len(expected) or set(ids) != expected:
            problems["wrong items"] += 1
        if result.get("degraded"):
            problems["degraded"] += 1
    # Where the slow answers were: a stall shows as one or two seconds of slow answers,
    # an overloaded worker as a latency that climbs through the run.
    by_second: dict[int, list[float]] = collections.defaultdict(list)
    first = sent_at[warmup] if warmup < len(sent_at) else 0.0
    for i in counted:
        if i in latencies:
            by_second[int(sent_at[i] - first)].append(latencies[i])
    worst_seconds = sorted(
        ((second, max(values), statistics.median(values)) for second, values in by_second.items()),
        key=lambda entry: -entry[1],
    )[:3]
    return {
        "e2e": summarize(measured),
        "worst_seconds": worst_seconds,
        "worker_reported": summarize(worker_ms),
        "send_lateness": summarize(lateness[warmup:] or lateness),
        "sent": sent_count,
        "stopped_early_at": stopped_at,
        "achieved_rate": sent_count / send_seconds if send_seconds > 0 else float("nan"),
        # Answers per second while they came back: below the offered rate, the worker could
        # not keep up and this is its capacity (the backlog, and the latency, grew meanwhile).
        "answered_rate": answered_rate,
        "request_bytes": sorted(len(orjson.dumps(b)) for b in bodies)[len(bodies) // 2],
        "problems": dict(problems),
        "results": [results.get(i) for i in range(len(bodies))],
    }


# --- interactions per second -----------------------------------------------------------------


def make_interactions(
    rng: random.Random, ranked: list[dict], shop, n: int, prefix: str
) -> tuple[list[tuple[bytes, str]], dict[str, int]]:
    """(payload, key) pairs: 80% clicks on ranked results (request_id, position), 15%
    add-to-carts, 5% purchases, each with a unique event id; and the count per counter."""
    events: list[tuple[bytes, str]] = []
    expected = {"clk": 0, "cart": 0, "buy": 0}
    now = time.time()
    for number in range(n):
        result = rng.choice(ranked)
        items = result["items"]
        # shoppers click near the top: positions 1, 2, 3 ... with geometric odds
        position = min(len(items), 1 + int(rng.expovariate(1 / 3.0)))
        item_id = items[position - 1]["item_id"]
        draw = rng.random()
        body: dict = {
            "event_id": f"{prefix}x-{number}",
            "user_id": result["user_id"],
            "item_id": item_id,
            "ts": now + number * 1e-3,
        }
        if draw < 0.80:
            body |= {"type": "click", "request_id": result["request_id"], "position": position}
            expected["clk"] += 1
        elif draw < 0.95:
            body["type"] = "add_to_cart"
            if rng.random() < 0.5:
                body["request_id"] = result["request_id"]
            expected["cart"] += 1
        else:
            body |= {"type": "purchase", "value": shop.item_price[item_id]}
            expected["buy"] += 1
        events.append((orjson.dumps(body), result["user_id"]))
    return events, expected


async def counter_sums(r: aioredis.Redis, keys: list[str]) -> dict[str, float]:
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, "clk", "cart", "buy")
    sums = {"clk": 0.0, "cart": 0.0, "buy": 0.0}
    for clk, cart, buy in await pipe.execute():
        sums["clk"] += float(clk or 0)
        sums["cart"] += float(cart or 0)
        sums["buy"] += float(buy or 0)
    return sums


class PySpy:
    """py-spy record on a pid between start() and stop(); summary() of where time went."""

    def __init__(self, pid: int | None, args) -> None:
        self.pid, self.args = pid, args
        self.dir = Path(tempfile.mkdtemp(prefix="streamrank-pyspy-"))
        self.path = self.dir / "stacks.txt"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        if self.pid is not None:
            self.proc = start_py_spy(
                self.pid, self.path, self.args.py_spy_rate, self.args.py_spy_gil
            )
            await asyncio.sleep(0.5)  # attached

    def stop(self) -> dict:
        err = stop_py_spy(self.proc)
        try:
            if self.path.exists():
                return summarize_py_spy(self.path, self.args.py_spy_top)
            return {"error": err.strip()[-2000:] or "py-spy wrote nothing"}
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_py_spy(pid: int, path: Path, rate: int, gil: bool = False) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("py-spy not found (pip install py-spy); not profiling", flush=True)
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(path),
            "--nonblocking",
            *(["--gil"] if gil else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_py_spy(proc: subprocess.Popen | None) -> str:
    if proc is None:
        return ""
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def summarize_py_spy(path: Path, top: int) -> dict:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            if match:
                where = match["file"].split("site-packages/")[-1].replace(str(Path.cwd()), "")
                names.append(f"{match['func']} ({where.lstrip('/')})")
            else:
                names.append(frame)
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}
    # Frames every stack passes through (the event loop, click, runpy, thread start-up) say
    # nothing about where the time goes: leave them out of the inclusive list.
    boring = re.compile(
        r"\((asyncio/|click/|<frozen|faust/cli/|mode/worker|mode/threads|"
        r"threading\.py|faust/__main__|faust/agents/agent\.py|redis/retry)"
    )
    interesting = [(name, n) for name, n in inclusive.most_common() if not boring.search(name)]
    return {
        "samples": total,
        "self": [(name, 100.0 * n / total) for name, n in own.most_common(top)],
        "inclusive": [(name, 100.0 * n / total) for name, n in interesting[: top * 2]],
    }


async def throughput(
    client: SearchLayerClient,
    r: aioredis.Redis,
    shop,
    args,
    prefix: str,
    rng: random.Random,
    cpu: MachineLoad,
    worker: Worker,
) -> dict:
    pool = rng.sample(shop.items, args.pool)
    keys = [f"{prefix}i:{item_id}" for item_id in pool]
    # Rank requests over the pool through the worker (fast, not timed), to click on.
    bodies = [
        request_body(shop, rng, min(args.tp_candidates, len(pool)), f"{prefix}t-{n}", pool=pool)
        for n in range(args.tp_requests)
    ]
    ranked_run = await open_loop(
        client, bodies, rate=args.tp_request_rate, warmup=0, alive=lambda: worker.running
    )
    ranked = [res for res in ranked_run["results"] if res is not None]
    if not ranked:
        raise RuntimeError("no ranked results came back for the throughput phase")
    events, expected = make_interactions(rng, ranked, shop, args.interactions, prefix)
    await asyncio.sleep(1.0)  # let the impressions' remember() and any stragglers settle
    before = await counter_sums(r, keys)
    target = {name: before[name] + expected[name] for name in before}
    target_total = sum(target.values())
    before_total = sum(before.values())

    observations: list[tuple[float, float]] = []  # (perf_counter, processed so far)
    done = asyncio.Event()

    async def poll() -> None:
        last_progress = time.perf_counter()
        last_value = 0.0
        while True:
            sums = await counter_sums(r, keys)
            now = time.perf_counter()
            processed = sum(sums.values()) - before_total
            observations.append((now, processed))
            if processed != last_value:
                last_value, last_progress = processed, now
            if sum(sums.values()) >= target_total:
                done.set()
                return
            if now - last_progress > args.stall_s or not worker.running:
                done.set()
                return
            await asyncio.sleep(0.1)

    spy = PySpy(worker.pid, args) if args.py_spy else None
    if spy is not None:
        await spy.start()
    cpu.start()
    produce_start = time.perf_counter()
    poller = asyncio.create_task(poll())
    for payload, key in events:
        await client.send_raw("interactions", payload, key)
    await client.flush()
    produce_end = time.perf_counter()
    await done.wait()
    cpu_use = cpu.stop()
    profile = spy.stop() if spy is not None else None
    with contextlib.suppress(asyncio.CancelledError):
        await poller
    after = await counter_sums(r, keys)

    processed = sum(after.values()) - before_total
    first = next(((t, v) for t, v in observations if v > 0), None)
    last_t = next((t for t, v in observations if v >= processed), observations[-1][0])
    out: dict = {
        "ranked_requests": len(ranked),
        "pool_items": len(pool),
        "interactions": len(events),
        "expected": expected,
        "applied": {name: after[name] - before[name] for name in after},
        "processed": processed,
        "complete": processed >= len(events),
        "produce_s": produce_end - produce_start,
        "produce_rate": len(events) / (produce_end - produce_start),
        "window_from_produce_start_s": last_t - produce_start,
        "rate_from_produce_start": processed / (last_t - produce_start),
        "cpu": cpu_use,
    }
    if first is not None and last_t > first[0]:
        out["window_from_first_applied_s"] = last_t - first[0]
        out["rate_from_first_applied"] = (processed - first[1]) / (last_t - first[0])
        out["first_applied_after_s"] = first[0] - produce_start
    # steady state: between the polls that first saw 10% and 90% done
    lo = next(((t, v) for t, v in observations if v >= 0.1 * len(events)), None)
    hi = next(((t, v) for t, v in observations if v >= 0.9 * len(events)), None)
    if lo and hi and hi[0] > lo[0]:
        out["rate_10_to_90"] = (hi[1] - lo[1]) / (hi[0] - lo[0])
    version = await r.get(f"{prefix}m:online:v")
    out["model_version_after"] = int(version) if version else 0
    if profile is not None:
        out["py_spy"] = profile
    return out


# --- the run ---------------------------------------------------------------------------------


async def run(args, broker: Broker, redis_server: RedisServer, worker: Worker, prefix: str) -> dict:
    results: dict = {}
    rng = random.Random(args.seed + 3)
    shop = make_shop(n_items=args.items, n_users=args.users, seed=args.seed)
    r = aioredis.Redis.from_url(redis_server.url)
    cpu = MachineLoad({"worker": worker.pid, "redis": redis_server.pid, "broker": broker.pid})
    overall = MachineLoad({"worker": worker.pid, "redis": redis_server.pid, "broker": broker.pid})
    client = SearchLayerClient(broker.bootstrap, topic_prefix=prefix)
    await client.start()
    try:
        seconds = await seed_catalog(client, r, shop, prefix, timeout=120.0)
        print(f"catalog: {len(shop.items)} items through the worker in {seconds:.1f} s", flush=True)
        store = RedisStore(redis_server.url, key_prefix=prefix, timeout_s=2.0)
        history = await asyncio.to_thread(
            build_history, shop, store, args.history, seed=args.seed + 1
        )
        if args.deep:
            # A deep model of the default size serving beside the online one, as after the
            # learner's first training: published to the registry, loaded by the worker.
            registry = ModelRegistry(store)
            model = DeepCTR(DeepConfig())
            version = registry.publish(model.to_bytes(), {"auc": 0.5}, (0.0, 0.0))
            await wait_for_deep_model(client, shop, rng, version)
            results["deep_model_version"] = version
            print(f"deep model version {version} serving", flush=True)
        store.client.close()
        results["state"] = {"catalog_items": len(shop.items), "catalog_s": seconds, **vars(history)}
        print(f"history (in-process, engine on the worker's Redis): {vars(history)}", flush=True)

        cpu.start()
        hop = await measure_raw_hop(
            broker.bootstrap,
            f"{prefix}raw-hop",
            n=args.hop_requests,
            rate=args.rate,
            payload_bytes=args.hop_payload_bytes,
        )
        results["raw_hop"] = {
            **summarize(hop),
            "payload_bytes": args.hop_payload_bytes,
            "cpu": cpu.stop(),
        }
        print(
            f"raw hop: p50 {results['raw_hop']['p50']:.2f} ms, "
            f"p99 {results['raw_hop']['p99']:.2f} ms",
            flush=True,
        )

        results["e2e"] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            bodies = [
                request_body(shop, rng, size, f"{prefix}{size}-{n}")
                for n in range(args.warmup + args.requests)
            ]
            spy = PySpy(worker.pid, args) if args.py_spy and size == args.py_spy_size else None
            if spy is not None:
                await spy.start()
            cpu.start()
            run_stats = await open_loop(
                client,
                bodies,
                args.rate,
                args.warmup,
                max_backlog_s=args.max_backlog_s,
                alive=lambda: worker.running,
            )
            run_stats["cpu"] = cpu.stop()
            if spy is not None:
                run_stats["py_spy"] = spy.stop()
            run_stats.pop("results")
            results["e2e"][size] = run_stats
            e2e = run_stats["e2e"]
            print(
                f"e2e {size} candidates: p50 {e2e['p50']:.2f} ms, p99 {e2e['p99']:.2f} ms, "
                f"worker-reported p50 {run_stats['worker_reported']['p50']:.2f} ms, "
                f"problems {run_stats['problems'] or 'none'}",
                flush=True,
            )

        if args.interactions > 0:
            results["throughput"] = await throughput(
                client, r, shop, args, prefix, rng, cpu, worker
            )
            tp = results["throughput"]
            print(
                f"throughput: {tp['processed']:.0f} of {tp['interactions']} applied, "
                f"{tp['rate_from_produce_start']:.0f}/s from produce start",
                flush=True,
            )
        results["dead_letters"] = client.dead_letters.qsize()
        results["load"] = overall.stop()
    finally:
        await client.stop()
        await r.aclose()
    return results


async def wait_for_deep_model(
    client: SearchLayerClient, shop, rng: random.Random, version: int, timeout: float = 30.0
) -> None:
    """Rank until results name the deep model version (the worker polls once a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await client.rank(request_body(shop, rng, 10, f"deep-wait-{uuid.uuid4().hex}"))
        if result["model_version"].endswith(f"+deep:{version}"):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the worker did not load deep model version {version}")


def worker_log_findings(text: str) -> dict:
    lines = text.splitlines()
    bad = [
        line
        for line in lines
        if re.search(r"\b(ERROR|CRITICAL|Traceback|Exception)\b|\[W\]|WARNING", line)
    ]
    return {"lines": len(lines), "problem_lines": len(bad), "first_problems": bad[:15]}


def print_py_spy(spy: dict, phase: str) -> None:
    if "error" in spy:
        print(f"\npy-spy during {phase} failed: {spy['error']}")
        return
    print(
        f"\n### py-spy on the worker during {phase} ({spy['samples']} samples, "
        "non-idle stacks of all threads)\n"
    )
    print(
        markdown_table(
            ["own time (leaf function)", "% samples"], [[f"`{n}`", p] for n, p in spy["self"]]
        )
    )
    print()
    print(
        markdown_table(
            ["inclusive (function and all it calls)", "% samples"],
            [[f"`{n}`", p] for n, p in spy["inclusive"]],
        )
    )


def report(results: dict, args) -> None:
    hop = results.get("raw_hop")
    print("\n## Streaming benchmark (bench/streaming.py)\n")
    print(machine_lines(results["machine"]))
    if "load" in results:
        print(load_line(results["load"]))
    print(
        f"Stack: tansu broker, Redis, one `faust -A streams.app worker`; rate {args.rate:g} "
        f"req/s open loop; {args.requests} measured requests per size after {args.warmup} "
        f"warm-up; catalog {args.items} items, {args.history} history requests; "
        f"{'online + deep model' if args.deep else 'online model alone'}.\n"
    )
    headers = [
        "path",
        "candidates",
        "request bytes",
        "n",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p50 / hop p50",
        "p99 / hop p99",
        "worker-reported p50 ms",
        "answered /s",
        "worker cpu %",
        "other procs (cores)",
    ]
    rows = []
    if hop:
        rows.append(
            [
                "raw broker hop (baseline)",
                "",
                hop["payload_bytes"],
                int(hop["n"]),
                hop["p50"],
                hop["p90"],
                hop["p99"],
                hop["max"],
                1.0,
                1.0,
                "",
                "",
                hop["cpu"].get("worker cpu %", float("nan")),
                hop["cpu"].get("other_processes_cores", float("nan")),
            ]
        )
    for size, s in results.get("e2e", {}).items():
        e = s["e2e"]
        rows.append(
            [
                "request -> ranked result",
                size,
                s["request_bytes"],
                int(e["n"]),
                e["p50"],
                e["p90"],
                e["p99"],
                e["max"],
                ratio(e["p50"], hop["p50"]) if hop else float("nan"),
                ratio(e["p99"], hop["p99"]) if hop else float("nan"),
                s["worker_reported"]["p50"],
                s["answered_rate"],
                s["cpu"].get("worker cpu %"),
                s["cpu"].get("other_processes_cores"),
            ]
        )
    print(markdown_table(headers, rows))
    for size, s in results.get("e2e", {}).items():
        if s["problems"]:
            print(f"  {size} candidates: problems {s['problems']}")
        if s["stopped_early_at"] is not None:
            print(
                f"  {size} candidates: STOPPED EARLY after {s['sent']} of "
                f"{args.warmup + args.requests} requests: a request waited over "
                f"{args.max_backlog_s:g} s for its answer"
            )
        if s["answered_rate"] < 0.95 * args.rate:
            print(
                f"  {size} candidates: the worker answered {s['answered_rate']:.1f} req/s, "
                f"below the offered {args.rate:g}/s: overloaded, its backlog (and the "
                "latency) grew through the run"
            )
        worst = ", ".join(
            f"second {second}: max {peak:.0f} ms, median {median:.0f} ms"
            for second, peak, median in s.get("worst_seconds", [])
        )
        print(f"  {size} candidates, slowest seconds of the run: {worst}")
        if s["send_lateness"]["p99"] > 5.0:
            print(
                f"  {size} candidates: sender ran late (p99 {s['send_lateness']['p99']:.1f} ms"
                f" behind schedule); achieved {s['achieved_rate']:.1f} req/s"
            )
    target = results.get("e2e", {}).get(LATENCY_TARGET_SIZE)
    if target and hop:
        r99 = ratio(target["e2e"]["p99"], hop["p99"])
        met = r99 <= LATENCY_TARGET_RATIO
        results["latency_target"] = {"size": LATENCY_TARGET_SIZE, "ratio": r99, "met": met}
        print(
            f"\ntarget: e2e p99 at {LATENCY_TARGET_SIZE} candidates within "
            f"{LATENCY_TARGET_RATIO:g}x the raw hop p99: {target['e2e']['p99']:.2f} ms / "
            f"{hop['p99']:.2f} ms = {r99:.2f}x -> {'MET' if met else 'NOT MET'}"
            + (
                ""
                if met
                else f" (allowed {LATENCY_TARGET_RATIO * hop['p99']:.2f} ms, over by "
                f"{target['e2e']['p99'] - LATENCY_TARGET_RATIO * hop['p99']:.2f} ms)"
            )
        )

    tp = results.get("throughput")
    if tp:
        print(
            "\n"
            + markdown_table(
                [
                    "interactions",
                    "applied",
                    "produce s",
                    "produce /s",
                    "window s (produce start)",
                    "interactions/s (produce start -> all applied)",
                    "window s (first applied)",
                    "interactions/s (first applied -> all applied)",
                    "interactions/s (10%->90%)",
                    "worker cpu %",
                    "redis cpu %",
                    "other procs (cores)",
                ],
                [
                    [
                        tp["interactions"],
                        int(tp["processed"]),
                        tp["produce_s"],
                        tp["produce_rate"],
                        tp["window_from_produce_start_s"],
                        tp["rate_from_produce_start"],
                        tp.get("window_from_first_applied_s", float("nan")),
                        tp.get("rate_from_first_applied", float("nan")),
                        tp.get("rate_10_to_90", float("nan")),
                        tp["cpu"].get("worker cpu %"),
                        tp["cpu"].get("redis cpu %"),
                        tp["cpu"].get("other_processes_cores"),
                    ]
                ],
            )
        )
        print(
            f"  mix expected {tp['expected']}, applied {tp['applied']}; "
            f"{tp['ranked_requests']} requests ranked over {tp['pool_items']} pool items "
            f"first; online model version after: {tp['model_version_after']}"
        )
        if not tp["complete"]:
            print(
                f"  INCOMPLETE: {tp['processed']:.0f} of {tp['interactions']} applied before "
                f"progress stalled for {args.stall_s} s"
            )
        if tp["processed"] > tp["interactions"]:
            print(f"  OVERCOUNT: {tp['processed'] - tp['interactions']:.0f} more than produced")
        rate = tp.get("rate_from_first_applied", tp["rate_from_produce_start"])
        met = rate >= THROUGHPUT_TARGET
        results["throughput_target"] = {"rate": rate, "met": met}
        print(
            f"\ntarget: at least {THROUGHPUT_TARGET:.0f} interactions/s per worker "
            f"(first applied -> all applied): {rate:.0f}/s -> {'MET' if met else 'NOT MET'}"
            + ("" if met else f" ({rate / THROUGHPUT_TARGET:.2f}x the target)")
        )
    for size, s in results.get("e2e", {}).items():
        if s.get("py_spy"):
            print_py_spy(s["py_spy"], f"the e2e run at {size} candidates")
    if tp and tp.get("py_spy"):
        print_py_spy(tp["py_spy"], "the throughput phase")
    print(f"\ndead letters seen by the client: {results.get('dead_letters', 'n/a')}")
    log = results.get("worker_log", {})
    print(
        f"worker log: {log.get('lines', 0)} lines, {log.get('problem_lines', 0)} "
        "warning/error lines"
    )
    for line in log.get("first_problems", []):
        print(f"    {line[:220]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=1500, help="measured requests per size")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests per size")
    parser.add_argument("--sizes", default="25,100,300", help="candidate counts, comma list")
    parser.add_argument(
        "--max-backlog-s",
        type=float,
        default=3.0,
        help="stop a size's run early when a request waits this long for its "
        "answer (the worker is overloaded); 0: never",
    )
    parser.add_argument(
        "--hop-requests", type=int, default=1500, help="raw hop messages measured (at --rate)"
    )
    parser.add_argument("--hop-payload-bytes", type=int, default=512)
    parser.add_argument("--items", type=int, default=5000, help="catalog size")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument(
        "--history",
        type=int,
        default=1500,
        help="past requests and their engagement written in-process",
    )
    parser.add_argument(
        "--interactions",
        type=int,
        default=20000,
        help="interactions produced for the throughput phase (0: skip it)",
    )
    parser.add_argument(
        "--tp-requests",
        type=int,
        default=300,
        help="requests ranked through the worker before the interactions",
    )
    parser.add_argument("--tp-candidates", type=int, default=25)
    parser.add_argument("--tp-request-rate", type=float, default=300.0)
    parser.add_argument("--pool", type=int, default=200, help="items the interactions touch")
    parser.add_argument(
        "--stall-s",
        type=float,
        default=20.0,
        help="give up when the counters do not move for this long",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the worker with py-spy during the e2e run at "
        "--py-spy-size candidates and during the throughput phase",
    )
    parser.add_argument("--py-spy-size", type=int, default=LATENCY_TARGET_SIZE)
    parser.add_argument("--py-spy-rate", type=int, default=250, help="samples per second")
    parser.add_argument("--py-spy-top", type=int, default=15)
    parser.add_argument(
        "--py-spy-gil",
        action="store_true",
        help="sample only the thread holding the GIL: where the worker's Python CPU goes "
        "(without it, threads waiting on Redis or the broker are sampled too)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep-worker-log", metavar="PATH", help="copy the worker log here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: 300 requests per size, 300 hop messages, 4000 "
        "interactions, 2000 catalog items, 300 history requests",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="a longer run: 4000 requests per size and hop, 50000 interactions",
    )
    parser.add_argument(
        "--learner",
        choices=("separate", "embedded"),
        default="embedded",
        help="embedded: one worker does everything (STREAMRANK_ROLE=all); separate: the "
        "measured worker serves (STREAMRANK_ROLE=serve) and a second process learns, as "
        "docker/compose.yml deploys them (on 2 cores the two processes compete for CPU)",
    )
    parser.add_argument(
        "--deep",
        action="store_true",
        help="rank with a deep CTR model (default size) serving beside the online model",
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the worker, e.g. shared_state_max_age=5 for "
        "STREAMRANK_SHARED_STATE_MAX_AGE (upper-case names pass as they are; repeatable)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.hop_requests, args.warmup = 300, 300, 50
        args.interactions, args.items, args.history = 4000, 2000, 300
    if args.long:
        args.requests = args.hop_requests = 4000
        args.interactions = 50000

    started = time.perf_counter()
    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    results: dict = {"machine": machine(), "config": vars(args).copy(), "prefix": prefix}
    workdir = Path(tempfile.mkdtemp(prefix="streamrank-bench-worker-"))
    worker: Worker | None = None
    learner: Worker | None = None
    try:
        with Broker() as broker, RedisServer() as redis_server:
            role = "serve" if args.learner == "separate" else "all"
            env = worker_env(
                broker,
                redis_server,
                prefix=prefix,
                web_port=free_port(),
                datadir=workdir / "data",
                role=role,
                **dict(setting.split("=", 1) for setting in args.worker_env),
            )
            worker = Worker(env, workdir=workdir)
            if args.learner == "separate":
                # The learner may wait for examples: a short long-poll (what the rankers
                # need from tansu) would only burn the CPU they share.
                learner_env = {**env, "STREAMRANK_ROLE": "learn"}
                learner_env["STREAMRANK_FETCH_MAX_WAIT_MS"] = "100"
                learner_env["STREAMRANK_WEB_PORT"] = str(free_port())
                learner_env["STREAMRANK_DATADIR"] = str(workdir / "learner-data")
                learner = Worker(learner_env, workdir=workdir / "learner")
            try:
                t0 = time.perf_counter()
                if learner is not None:
                    learner.start(timeout=90.0)
                worker.start(timeout=90.0)
                results["worker_start_s"] = time.perf_counter() - t0
                print(f"stack up (worker ready in {results['worker_start_s']:.1f} s)", flush=True)
                results.update(asyncio.run(run(args, broker, redis_server, worker, prefix)))
            except Exception:
                print(
                    f"\nFAILED; worker {'running' if worker.running else 'exited'}, "
                    f"its log tail:\n{worker.log_tail(60)}",
                    file=sys.stderr,
                )
                raise
            finally:
                worker.stop()
                results["worker_exit_code"] = worker.returncode
                if learner is not None:
                    learner.stop()
    finally:
        if worker is not None:
            text = worker.log_text()
            results["worker_log"] = worker_log_findings(text)
            if args.keep_worker_log:
                Path(args.keep_worker_log).write_text(text)
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    report(results, args)
    print(f"\n(run took {results['elapsed_s']} s)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
